"""lmjax quantize --workdir=RUN --out=DIR --bits=8|4 [--group_size=128]: weight-only PTQ."""
from __future__ import annotations

HELP = "int8 (per channel) or int4 (group-wise) weights of a trained run, as a new run in --out"


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the trained run to quantize")
  p.add_argument("--out", required=True, help="a new workdir for the quantized run")
  p.add_argument("--bits", type=int, required=True, choices=(8, 4),
                 help="8: int8 per output channel; 4: int4 in groups along the input axis")
  p.add_argument("--group_size", type=int, default=128,
                 help="int4: inputs per scale (shrinks to divide the axis, e.g. a head's width)")
  p.add_argument("--no_eval", action="store_true", help="skip the val loss before and after")


def run(args, overrides) -> int:
  from lmjax import compress, distributed, prune
  from lmjax import workdir as workdir_lib
  from lmjax.errors import ConfigError
  if overrides:
    raise ConfigError(f"lmjax quantize takes no --config overrides, got {' '.join(overrides)}.")
  if args.group_size < 2 or args.group_size % 2:
    raise ConfigError(f"--group_size must be an even number >= 2, got {args.group_size}.")
  distributed.initialize_distributed(workdir_lib.load_config(args.workdir))
  sizes = compress.quantize_run(args.workdir, args.out, args.bits, args.group_size)
  print(f"checkpoint of the quantized run: {sizes['checkpoint_bytes'] / 2**20:.2f} MiB")
  if not args.no_eval:
    before, after = prune.evaluate(args.workdir), prune.evaluate(args.out)
    print(f"val loss {before['loss']:.4f} before quantization, {after['loss']:.4f} after "
          f"({100 * (after['loss'] / before['loss'] - 1):+.2f}%).")
  return 0
