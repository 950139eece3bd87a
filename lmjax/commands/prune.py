"""lmjax prune --workdir=RUN --out=DIR --target=heads=N,mlp=F,layers=L: structured pruning."""
from __future__ import annotations

HELP = "remove attention heads, MLP channels and layers by importance: a smaller run in --out"


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the trained run to prune")
  p.add_argument("--out", required=True, help="a new workdir for the pruned run")
  p.add_argument("--target", required=True,
                 help="the sizes to keep: heads=N,mlp=F,layers=L (any of them)")
  p.add_argument("--calibration_batches", type=int, default=8,
                 help="training batches whose activations score the heads, channels and layers")
  p.add_argument("--no_eval", action="store_true", help="skip the val loss before and after")


def run(args, overrides) -> int:
  from lmjax import distributed, prune
  from lmjax import workdir as workdir_lib
  from lmjax.errors import ConfigError
  if overrides:
    raise ConfigError(f"lmjax prune takes no --config overrides, got {' '.join(overrides)}.")
  if args.calibration_batches < 1:
    raise ConfigError("--calibration_batches must be >= 1.")
  distributed.initialize_distributed(workdir_lib.load_config(args.workdir))
  prune.prune(args.workdir, args.out, args.target, args.calibration_batches)
  if not args.no_eval:
    before, after = prune.evaluate(args.workdir), prune.evaluate(args.out)
    print(f"val loss {before['loss']:.4f} before pruning, {after['loss']:.4f} after. "
          f"`lmjax distill --workdir={args.out} --teacher={args.workdir}` trains it toward the "
          "unpruned model.")
  return 0
