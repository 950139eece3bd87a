"""lmjax convert --from_hf=DIR --workdir=OUT | --to_hf=DIR --workdir=RUN [--step=N]."""
from __future__ import annotations

from lmjax.commands import common

from lmjax.errors import UsageError

HELP = "Hugging Face checkpoint <-> lmjax run"


def add_arguments(p) -> None:
  p.add_argument("--from_hf", default=None, metavar="DIR", help="import this HF directory")
  p.add_argument("--to_hf", default=None, metavar="DIR", help="export --workdir's run here")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=common.at_least(0), default=None, help="checkpoint step to export")


def check_arguments(args, overrides) -> None:
  if (args.from_hf is None) == (args.to_hf is None):
    raise UsageError("Pass exactly one of --from_hf=HF_DIR (import into --workdir) or "
                     "--to_hf=OUT_DIR (export --workdir).")
  if args.from_hf is not None and args.step is not None:
    raise UsageError("--step applies to --to_hf (which checkpoint to export) only.")
  if args.to_hf is not None and overrides:
    raise UsageError("--config.* overrides apply to --from_hf only; export writes the run as "
                     "trained.")


def run(args, overrides) -> int:
  check_arguments(args, overrides)
  from lmjax import hf
  from lmjax import workdir as workdir_lib
  if args.from_hf is not None:
    cfg = hf.import_hf(args.from_hf, args.workdir, config_overrides=overrides)
    m = cfg.model
    print(f"Imported {args.from_hf} ({m.style} style, {m.num_layers} layers, d_model "
          f"{m.d_model}, vocab {m.vocab_size}) into {args.workdir}:\n"
          f"  {workdir_lib.config_path(args.workdir)}\n"
          f"  {workdir_lib.checkpoint_dir(args.workdir)}/0 (step 0, fresh {cfg.optim.name} state)")
    if cfg.data.tokenizer:
      print(f"  {cfg.data.tokenizer} (data.tokenizer; data.source={cfg.data.source})")
    else:
      print("  No tokenizer.json or tokenizer.model in the HF directory: the run uses synthetic "
            "data. Set --config.data.tokenizer=PATH and --config.data.source=... to use text.")
    return 0
  written = hf.export_hf(args.workdir, args.to_hf, args.step)
  print(f"Exported step {written.pop('step')} of {args.workdir} to {args.to_hf}:")
  for path in written.values():
    print(f"  {path}")
  return 0
