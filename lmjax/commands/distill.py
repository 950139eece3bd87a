"""lmjax distill --config=STUDENT --teacher=RUN --workdir=OUT: train a student toward a teacher."""
from __future__ import annotations

from lmjax.commands.common import add_config_flags, resolve_config
from lmjax.commands.train import print_sample
from lmjax.errors import ConfigError

HELP = "train a student model (--config) to match a trained --teacher run (knowledge distillation)"


def add_arguments(p) -> None:
  add_config_flags(p, config_required=False)  # default: the workdir's config.json (resume)
  p.add_argument("--teacher", help="workdir of the trained teacher (an lmjax run or an HF import);"
                 " default: the one the --workdir's run was distilled from")
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def run(args, overrides) -> int:
  from lmjax import train as train_lib
  from lmjax import workdir as workdir_lib
  if not args.config and not workdir_lib.has_run(args.workdir):
    raise ConfigError("lmjax distill needs --config=STUDENT.py[:VARIANT] and --teacher=RUN (or a "
                      "--workdir that holds a distillation's config.json, to resume it).")
  if args.teacher:
    overrides = [*overrides, f"distill.teacher={workdir_lib.absolute(args.teacher)}"]
  cfg = resolve_config(args, overrides)
  if not cfg.distill.teacher:
    raise ConfigError("lmjax distill needs --teacher=RUN: the trained model to distill from.")
  cfg = train_lib.with_teacher(cfg)
  print_sample(train_lib.train(cfg, args.workdir, progress=not args.no_progress))
  return 0
