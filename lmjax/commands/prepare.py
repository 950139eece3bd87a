"""lmjax prepare --config=FILE --workdir=DIR: corpus -> tokenizer -> token shards."""
from __future__ import annotations

import json

from lmjax.commands.common import add_config_flags, resolve_config

HELP = "corpus -> tokenizer -> token shards (WORKDIR/data)"


def add_arguments(p) -> None:
  add_config_flags(p)


def run(args, overrides) -> int:
  from lmjax import data as data_lib
  index = data_lib.prepare_once(resolve_config(args, overrides), args.workdir)
  print(json.dumps({k: v for k, v in index.items() if k != "shards"}, indent=2, default=str))
  return 0
