"""lmjax bench --config=FILE[:VARIANT] [--steps=N] [--json=PATH]: how fast, how big."""
from __future__ import annotations

from lmjax.commands import common

import json

from lmjax.commands.common import add_config_flags, resolve_config

HELP = "compile time, step time, tokens/s, MFU, memory, loader speed"


def add_arguments(p) -> None:
  add_config_flags(p, workdir_required=False)
  p.add_argument("--steps", type=common.at_least(1), default=20, help="timed train steps")
  p.add_argument("--warmup", type=common.at_least(0),
                 default=3, help="untimed steps after compiling")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
  p.add_argument("--no_loader", action="store_true", help="skip the data loader measurement")


def run(args, overrides) -> int:
  import jax

  from lmjax import bench
  result = bench.benchmark(resolve_config(args, overrides), args.steps, args.warmup,
                           loader=not args.no_loader, workdir=args.workdir)
  if jax.process_index() == 0:
    print(bench.format_table(result))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
  return 0
