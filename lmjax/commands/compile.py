"""lmjax compile --config=FILE[:VARIANT] --topology=v5p-64 [--num_slices=N] [--json=PATH]:
does a config fit a TPU slice, and with how much to spare, from any machine (aot.py)."""
from __future__ import annotations

import json
import os

from lmjax.commands import common
from lmjax.commands.common import add_config_flags, resolve_config

HELP = "AOT-compile a config's train/eval/decode steps for a TPU slice: per-chip memory, collectives"
STEPS = ("train", "eval", "decode")


def add_arguments(p) -> None:
  add_config_flags(p, workdir_required=False, config_required=False)
  p.add_argument("--topology", required=True, metavar="SLICE",
                 help="a Cloud TPU slice (v4-32, v5p-64, v5e-16, v6e-8: TensorCores for v4/v5p, "
                 "chips for v5e/v6e) or a chip layout (v5p:2x4x4)")
  p.add_argument("--num_slices", type=common.at_least(1), default=1,
                 help="slices joined over DCN (set mesh.dcn_* to use them)")
  p.add_argument("--steps", default=",".join(STEPS),
                 help=f"which steps to compile, comma-separated from {', '.join(STEPS)}")
  p.add_argument("--decode_batch", type=common.at_least(0), default=0,
                 help="prompts in the compiled decode step (0: one per chip)")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")


def run(args, overrides) -> int:
  # The compiler needs no local accelerator: keep JAX off any TPU this machine might have, so a
  # compile never competes with (or fails beside) a run that holds it.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from lmjax import aot
  from lmjax.errors import UsageError
  steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
  unknown = sorted(set(steps) - set(STEPS))
  if unknown or not steps:
    raise UsageError(f"--steps takes {', '.join(STEPS)} (comma-separated), got {args.steps!r}.")
  target = aot.parse_slice(args.topology, args.num_slices)
  result = aot.compile_run(resolve_config(args, overrides), target, steps, args.workdir,
                           args.decode_batch)
  print(aot.format_report(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
