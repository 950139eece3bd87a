"""lmjax fit --workdir=SWEEP_DIR: scaling laws from a sweep's results.jsonl."""
from __future__ import annotations

from lmjax.commands import common

from lmjax.errors import UsageError

HELP = "fit scaling laws to a sweep's results: constants, compute-optimal N and D, plots"


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the sweep directory (its results.jsonl)")
  p.add_argument("--params", choices=("nonembedding", "total"), default="nonembedding",
                 help="N: non-embedding parameters (default) or all of them")
  p.add_argument("--bootstrap", type=common.at_least(0),
                 default=200, help="resamples for the intervals (0: none)")
  p.add_argument("--no_plots", action="store_true", help="no PNG plots (no matplotlib needed)")


def run(args, overrides) -> int:
  if overrides:
    raise UsageError("lmjax fit takes no --config.* overrides: it reads the sweep's results.")
  from lmjax import fit
  from lmjax.scaling import report
  f, written = fit.fit_sweep(args.workdir, params=args.params, bootstrap_samples=args.bootstrap,
                             plots=not args.no_plots)
  print(report.format_report(f))
  print("")
  for path in written:
    print(f"Wrote {path}")
  return 0
