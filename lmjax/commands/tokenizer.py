"""lmjax tokenizer train --config=FILE --workdir=DIR: train (or find) the run's tokenizer."""
from __future__ import annotations

from lmjax.commands.common import add_config_flags, resolve_config

HELP = "tokenizer tools"


def add_arguments(p) -> None:
  sub = p.add_subparsers(dest="tokenizer_command", required=True)
  add_config_flags(sub.add_parser("train", help="train the config's tokenizer on its corpus "
                                  "(SentencePiece, or data.tokenizer_type=byte_bpe); prints "
                                  "its path"))


def run(args, overrides) -> int:
  from lmjax import data as data_lib
  print(data_lib.resolve_tokenizer(resolve_config(args, overrides), args.workdir))
  return 0
