"""What several commands share: the config flags and how a command finds its config."""
from __future__ import annotations

import argparse


def at_least(low: float, kind=int):
  """An argparse type: a number >= `low` (argparse's one-line usage error otherwise)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
    return value
  return parse


def add_config_flags(p: argparse.ArgumentParser, workdir_required: bool = True,
                     config_required: bool = True) -> None:
  p.add_argument("--config", required=config_required, metavar="FILE.py[:VARIANT]",
                 help="config file and optional variant, e.g. configs/gpt2.py:124m")
  p.add_argument("--workdir", required=workdir_required, help="run directory")


def resolve_config(args, overrides):
  """--config (a file) with the overrides, else the workdir's config.json (to resume), else the
  defaults; then joins the cluster (multi-host runs meet their peers here, before any JAX
  work)."""
  from lmjax import config as config_lib
  from lmjax import distributed
  from lmjax import workdir as workdir_lib
  if args.config:
    cfg = config_lib.get_config(args.config, overrides)
  elif getattr(args, "workdir", None):
    cfg = workdir_lib.load_config(args.workdir, overrides)
  else:
    cfg = config_lib.get_config(None, overrides)
  distributed.initialize_distributed(cfg)
  return cfg
