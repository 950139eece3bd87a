"""lmjax fit --workdir=SWEEP_DIR: scaling laws from a sweep's results.jsonl."""
from __future__ import annotations

import json

from lmjax.errors import UsageError

HELP = "fit scaling laws to a sweep's results: constants, compute-optimal N and D, plots"
PARAMS = {"nonembedding": "params_nonembedding", "total": "params"}


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the sweep directory (its results.jsonl)")
  p.add_argument("--params", choices=tuple(PARAMS), default="nonembedding",
                 help="N: non-embedding parameters (default) or all of them")
  p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (0: none)")
  p.add_argument("--no_plots", action="store_true", help="no PNG plots (no matplotlib needed)")


def fit(workdir: str, params: str = "nonembedding", bootstrap_samples: int = 200,
        plots: bool = True) -> dict:
  """Reads WORKDIR/results.jsonl, prints the fits, writes WORKDIR/fit.json and the plots in
  WORKDIR/plots/."""
  from lmjax import workdir as workdir_lib
  from lmjax.plotting import pyplot
  from lmjax.scaling import law, plots as plots_lib, report
  from lmjax.sweep import read_results
  if plots:  # errors before the fit, not after
    pyplot()
    if "://" in workdir:
      raise UsageError("Plots are written to a local directory: copy results.jsonl to one and "
                       "fit there, or pass --no_plots.")
  f = law.fit(read_results(workdir), params_key=PARAMS[params],
              bootstrap_samples=bootstrap_samples)
  print(report.format_report(f))
  workdir_lib.fit_path(workdir).write_text(json.dumps(f, indent=1))
  print(f"\nWrote {workdir_lib.fit_path(workdir)}")
  if plots:
    for path in plots_lib.plot(f, workdir_lib.plots_dir(workdir)):
      print(f"Wrote {path}")
  return f


def run(args, overrides) -> int:
  if overrides:
    raise UsageError("lmjax fit takes no --config.* overrides: it reads the sweep's results.")
  fit(args.workdir, params=args.params, bootstrap_samples=args.bootstrap,
      plots=not args.no_plots)
  return 0
