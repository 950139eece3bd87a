"""Fitting a sweep (`lmjax fit`): its results.jsonl in, the fits (scaling/law.py), fit.json and the
plots out."""
from __future__ import annotations

import json

from lmjax import workdir as workdir_lib
from lmjax.errors import UsageError
from lmjax.plotting import pyplot
from lmjax.scaling import law, plots as plots_lib
from lmjax.sweep import read_results

PARAMS = {"nonembedding": "params_nonembedding", "total": "params"}


def fit_sweep(workdir: str, params: str = "nonembedding", bootstrap_samples: int = 200,
              plots: bool = True) -> tuple[dict, list[str]]:
  """(the fit, the files written): WORKDIR/fit.json and, with `plots`, WORKDIR/plots/*.png."""
  if params not in PARAMS:
    raise UsageError(f"--params must be one of {', '.join(PARAMS)}, got '{params}'.")
  if plots:  # errors before the fit, not after
    pyplot()
    if "://" in workdir:
      raise UsageError("Plots are written to a local directory: copy results.jsonl to one and "
                       "fit there, or pass --no_plots.")
  f = law.fit(read_results(workdir), params_key=PARAMS[params],
              bootstrap_samples=bootstrap_samples)
  workdir_lib.fit_path(workdir).write_text(json.dumps(f, indent=1))
  written = [str(workdir_lib.fit_path(workdir))]
  if plots:
    written += plots_lib.plot(f, workdir_lib.plots_dir(workdir))
  return f, written
