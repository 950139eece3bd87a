"""lmjax config [--config=FILE[:VARIANT]] [--keys]: the resolved config."""
from __future__ import annotations

from lmjax.commands.common import add_config_flags, resolve_config

HELP = "print the resolved config (every key)"


def add_arguments(p) -> None:
  add_config_flags(p, workdir_required=False, config_required=False)
  p.add_argument("--keys", action="store_true", help="one key a line with its value and, where "
                 "enumerated, its allowed values (instead of JSON)")


def run(args, overrides) -> int:
  from lmjax import config as config_lib
  cfg = resolve_config(args, overrides)
  print(config_lib.describe(cfg) if args.keys else config_lib.to_json(cfg))
  return 0
