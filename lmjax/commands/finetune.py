"""lmjax finetune --config=FILE[:VARIANT] --workdir=OUT --init=RUN: SFT or classification."""
from __future__ import annotations

from lmjax.commands.common import add_config_flags

HELP = "SFT or classification, full or LoRA, from a trained or converted run (--init)"


def add_arguments(p) -> None:
  add_config_flags(p, config_required=False)  # default: the workdir's config.json (resume)
  p.add_argument("--init", default=None, metavar="RUN_DIR", help="the run (lmjax train or lmjax "
                 "convert --from_hf workdir) to start from; sets finetune.init")
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def run(args, overrides) -> int:
  from lmjax import distributed
  from lmjax import finetune
  from lmjax import workdir as workdir_lib
  cfg = finetune.resolve_config(args.config, args.workdir, args.init, overrides)
  distributed.initialize_distributed(cfg)
  result = finetune.finetune(cfg, args.workdir, progress=not args.no_progress)
  if result["exported"] is not None:
    merged = " (adapters merged)" if cfg.finetune.lora_rank else ""
    print(f"Wrote the final params{merged} as step {result['exported']} of a plain run in "
          f"{args.workdir}" + (
              f"; the classifier head is in {workdir_lib.classifier_path(args.workdir)}."
              if cfg.finetune.task == "classification" else
              f": `lmjax generate --workdir={args.workdir}` samples from it."))
  return 0
