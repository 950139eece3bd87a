"""`lmjax <command>`: one module per command, each with `HELP`, `add_arguments(parser)` and
`run(args, overrides) -> exit status`. A command parses its flags, calls the library and prints
what it returns; the library under it never reads sys.argv or prints results.

Every command that takes a config accepts `--config=FILE.py[:VARIANT]` and any number of
`--config.a.b=VALUE` overrides; the commands that read a trained run (eval, generate) use its
WORKDIR/config.json, with the overrides on top.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from lmjax.commands import (bench, compile, config, convert, coordcheck, distill, eval, finetune,
                            fit, generate, prepare, prune, quantize, serve, sweep, tokenizer,
                            train)
from lmjax.errors import LmjaxError

COMMANDS = {"train": train, "distill": distill, "eval": eval, "generate": generate, "prepare": prepare,
            "tokenizer": tokenizer, "bench": bench, "compile": compile, "convert": convert, "finetune": finetune, "prune": prune, "quantize": quantize, "serve": serve,
            "sweep": sweep, "fit": fit, "coordcheck": coordcheck, "config": config}


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line, like every other lmjax error."""

  def error(self, message):
    self.exit(2, f"lmjax: error: {message} (see `{self.prog} --help`).\n")


def parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="lmjax", description="Pretrain, evaluate, fine-tune and sample Transformer language "
      "models.", epilog="Override any config key with --config.SECTION.KEY=VALUE, e.g. "
      "--config.train.steps=100. `lmjax config --keys` lists every key.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  for name, module in COMMANDS.items():
    module.add_arguments(sub.add_parser(name, help=module.HELP))
  return p


def split_overrides(argv):
  """(other arguments, ["a.b=v", ...] from every --config.a.b=v)."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return rest, overrides


def run(argv) -> int:
  argv, overrides = split_overrides(argv)
  args = parser().parse_args(argv)
  return COMMANDS[args.command].run(args, overrides)


def _say_last(message: str) -> None:
  """Prints an error as the last thing the process says: the aftermath of the same failure in
  other threads (Orbax's savers and their native threads, asyncio tasks collected at exit) is
  silenced first, stderr included, so that nothing follows or interleaves with the line."""
  import logging
  import threading
  import warnings
  sys.unraisablehook = lambda *_: None
  threading.excepthook = lambda *_: None
  warnings.simplefilter("ignore")  # e.g. a save's coroutine never awaited, collected at exit
  for name in ("asyncio", "absl"):
    logging.getLogger(name).disabled = True
  sys.stderr.flush()
  err = os.dup(sys.stderr.fileno())
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
  os.write(err, f"lmjax: error: {message}\n".encode())
  os.close(err)


def main(argv=None) -> None:
  """The `lmjax` entry point: an LmjaxError, or a full disk, is printed as one message (exit 2);
  anything else is a bug or a platform failure and shows its traceback."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = run(argv)
  except LmjaxError as e:
    _say_last(str(e))
    code = 2
  except KeyboardInterrupt:
    print("lmjax: interrupted", file=sys.stderr)
    code = 130
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    _say_last(f"no space left on device ({e.filename or e}). Free space, then rerun: a run "
              "resumes from its last complete checkpoint.")
    code = 2
  sys.exit(code)
