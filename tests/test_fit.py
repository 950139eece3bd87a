"""`lmjax fit`: the scaling-law fitter recovers the constants of a known law from noisy losses,
IsoFLOP parabolas find their minima, the plots are written."""
import json
import math
import os

import numpy as np
import pytest
from conftest import run_cli

from lmjax import fit as fit_app
from lmjax.errors import DataError, UsageError
from lmjax.scaling import law as scaling
from lmjax.scaling.lbfgs import lbfgs

CHINCHILLA = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def chinchilla_loss(n, d):
  c = CHINCHILLA
  return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def synthetic_results(noise=0.004, seed=0):
  """An IsoFLOP grid (as a sweep makes it) with losses from Hoffmann et al.'s law, times
  exp(N(0, noise)); flops_per_token = 6 N exactly."""
  rng = np.random.default_rng(seed)
  rows = []
  for budget in (1e18, 1e19, 1e20, 1e21):
    for n in np.geomspace(2e7, 1e10, 10):
      d = budget / (6 * n)
      if not 2 <= d / n <= 300:
        continue
      loss = chinchilla_loss(n, d) * math.exp(rng.normal(0, noise))
      rows.append({"name": f"n{n:.3g}_c{budget:.0e}", "budget_kind": "flops", "budget": budget,
                   "params_nonembedding": n, "params": n * 1.1, "flops_per_token": 6 * n,
                   "tokens": d, "flops": budget, "val_loss": loss, "bits_per_byte": None})
  return rows


def test_lbfgs_matches_scipy_on_one_start():
  rows = synthetic_results()
  n, d, loss = (np.array([r[k] for r in rows]) for k in ("params_nonembedding", "tokens",
                                                         "val_loss"))
  args = (np.log(n), np.log(d), np.log(loss), np.ones((1, len(n))))
  x0 = np.array([5.0, 5.0, 0.5, 0.5, 0.5])
  x, f = lbfgs(lambda t, rows: scaling._objective(t, *args), x0[None])
  from scipy import optimize
  ref = optimize.minimize(lambda t: tuple(v[0] for v in scaling._objective(t[None], *args)), x0,
                          jac=True, method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-10})
  assert f[0] <= ref.fun * (1 + 1e-6) + 1e-12
  np.testing.assert_allclose(scaling.law(x[0], n, d), scaling.law(ref.x, n, d), rtol=1e-4)


def test_fit_recovers_known_constants_with_intervals():
  rows = synthetic_results()
  f = scaling.fit(rows, bootstrap_samples=40)
  law = f["law"]
  assert law["starts"] == 4500
  assert abs(law["alpha"] - 0.34) < 0.03 and abs(law["beta"] - 0.28) < 0.03
  assert abs(law["E"] - 1.69) < 0.1
  assert abs(math.log(law["A"] / 406.4)) < 0.5 and abs(math.log(law["B"] / 410.7)) < 0.5
  assert law["rms_log_residual"] < 0.01  # the noise is 0.4%
  for k in ("E", "alpha", "beta"):  # the bootstrap intervals are real intervals around the fit
    lo, hi = f["intervals"][k]
    assert lo < law[k] < hi and hi - lo < 0.5 * law[k]
  # compute-optimal: with C = 6ND, N* grows as C^(beta / (alpha + beta)) = C^0.45
  assert abs(f["compute_optimal_exponents"]["params"] - 0.28 / 0.62) < 0.05
  assert f["flops_per_token_law"]["c"] == pytest.approx(1.0)
  for o in f["compute_optimal"]:
    n_opt = o["params"]
    assert o["tokens"] == pytest.approx(o["flops"] / (6 * n_opt), rel=1e-6)
    # it is the minimum along the budget: nearby sizes predict a higher loss
    for other in (n_opt * 0.8, n_opt * 1.25):
      assert scaling.law(law["theta"], other, o["flops"] / (6 * other)) > o["loss"]
  # approach 2 agrees with the law it was sampled from, within the grid's resolution
  minima = [g for g in f["isoflop"] if "params_opt" in g]
  assert len(minima) == 4
  for g in minima:
    truth = min(np.geomspace(1e6, 1e11, 4000),
                key=lambda n, c=g["flops"]: chinchilla_loss(n, c / (6 * n)))
    assert abs(math.log(g["params_opt"] / truth)) < 0.5


def test_isoflop_parabola_vertex():
  rows = [{"budget_kind": "flops", "budget": 1e15, "params_nonembedding": n,
           "val_loss": 3.0 + 0.2 * (math.log(n) - math.log(5e6)) ** 2}
          for n in (1e6, 2e6, 5e6, 1e7, 3e7)]
  (g,) = scaling.isoflop_fits(rows, "params_nonembedding", (6.0, 1.0))
  assert g["params_opt"] == pytest.approx(5e6, rel=1e-6) and g["inside"]
  assert g["loss_opt"] == pytest.approx(3.0) and g["tokens_opt"] == pytest.approx(1e15 / 3e7)
  rows = [dict(r, val_loss=5.0 - 0.1 * math.log(r["params_nonembedding"])) for r in rows]
  (g,) = scaling.isoflop_fits(rows, "params_nonembedding", (6.0, 1.0))
  assert "params_opt" not in g  # monotone: no minimum claimed


def test_cli_fit_prints_writes_json_and_plots(tmp_path):
  rows = synthetic_results(seed=1)
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = run_cli("fit", f"--workdir={tmp_path}", "--bootstrap=20", timeout=300)
  assert out.returncode == 0, out.stderr
  assert "Approach 3" in out.stdout and "Approach 2" in out.stdout and "95% intervals" in out.stdout
  alpha = float(next(line for line in out.stdout.splitlines()
                     if line.strip().startswith("alpha")).split()[1])
  assert abs(alpha - 0.34) < 0.03
  saved = json.loads((tmp_path / "fit.json").read_text())
  assert saved["points"] == len(rows)
  for name in ("isoflop", "loss_vs_compute", "predicted_vs_observed", "summary"):
    path = tmp_path / "plots" / f"{name}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_fit_errors(tmp_path, monkeypatch):
  out = run_cli("fit", f"--workdir={tmp_path}")
  assert out.returncode == 2 and "results.jsonl" in out.stderr and "lmjax sweep" in out.stderr
  with pytest.raises(DataError, match="at least 5 finished points"):
    scaling.fit(synthetic_results()[:4])
  import builtins
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name == "matplotlib" or name.startswith("matplotlib."):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  (tmp_path / "results.jsonl").write_text("")
  with pytest.raises(UsageError, match=r"pip install -e \"\.\[plots\]\".*--no_plots"):
    fit_app.fit_sweep(str(tmp_path))
  assert not os.path.exists(tmp_path / "fit.json")  # nothing written
