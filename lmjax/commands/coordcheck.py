"""lmjax coordcheck --config=FILE [--widths=64,128,256,512]: the muP coordinate check."""
from __future__ import annotations

from lmjax.commands import common

from lmjax.commands.common import resolve_config
from lmjax.errors import UsageError

HELP = ("muP coordinate check: how much a few steps change each layer's activations at several "
        "widths, sp against mup")


def add_arguments(p) -> None:
  p.add_argument("--config", default=None, metavar="FILE.py[:VARIANT]", help="the model to vary "
                 "(its d_model is replaced; default: the default config)")
  p.add_argument("--widths", default="64,128,256,512", help="d_model values, comma-separated")
  p.add_argument("--steps", type=common.at_least(1),
                 default=3, help="optimizer steps before measuring")
  p.add_argument("--plot", default=None, metavar="PATH.png", help="also plot the changes here")


def run(args, overrides) -> int:
  try:
    widths = tuple(int(w) for w in args.widths.split(","))
  except ValueError:
    raise UsageError(f"--widths must be comma-separated integers, got '{args.widths}'.") from None
  if len(widths) < 2 or args.steps < 1:
    raise UsageError("The coordinate check needs at least two --widths and --steps >= 1.")
  cfg = resolve_config(args, overrides)
  from lmjax import mup
  from lmjax.plotting import pyplot
  for width in widths:  # every width's config is checked before anything is compiled
    mup.width_config(cfg, width, "mup", cfg.model.mup_base_width or min(widths))
  if args.plot:
    pyplot()
  result = mup.coord_check(cfg, widths, args.steps)
  print(mup.format_table(result))
  if args.plot:
    mup.plot(result, args.plot)
    print(f"\nWrote {args.plot}")
  return 0
