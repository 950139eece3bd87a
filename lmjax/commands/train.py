"""lmjax train --config=FILE[:VARIANT] --workdir=DIR: train, or resume the run in DIR."""
from __future__ import annotations

from lmjax.commands.common import add_config_flags, resolve_config
from lmjax.errors import ConfigError

HELP = "train (or resume) a model in --workdir"


def add_arguments(p) -> None:
  add_config_flags(p, config_required=False)  # default: the workdir's config.json (resume)
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def run(args, overrides) -> int:
  from lmjax import train as train_lib
  from lmjax import workdir as workdir_lib
  if not args.config and not workdir_lib.has_run(args.workdir):
    raise ConfigError("lmjax train needs --config=FILE.py[:VARIANT] (or a --workdir that holds "
                      "a run's config.json, to resume it).")
  cfg = resolve_config(args, overrides)  # config errors surface here, before anything is touched
  print_sample(train_lib.train(cfg, args.workdir, progress=not args.no_progress))
  return 0


def print_sample(result) -> None:
  if result["stopped_by"] is None and result.get("sample"):
    print(f"\nSample (temperature 0.8, top-p 0.95), prompt {result['sample']['prompt']!r}:\n"
          f"{result['sample']['text']}")
