"""Scaling laws from a sweep's results (Hoffmann et al. 2022, "Training Compute-Optimal LLMs").

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as the paper does: in log space,
log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), minimizing
the Huber loss (delta = 1e-3) of the log residuals with L-BFGS from a grid of starting points;
intervals from refits on bootstrap resamples of the points.
Approach 2: for each FLOP budget, a parabola of the loss in log N through that budget's runs; its
minimum is the compute-optimal size N*(C) at that budget.

N is the non-embedding parameter count by default (Kaplan et al. 2020: the input and position
tables are lookups, which dominate small models without computing much); D the training tokens;
C the training FLOPs of the README's formula. A model's FLOPs per token are not exactly 6N (the
output layer and attention add to it), so the compute-optimal split uses C = f(N) x D with f a power
law fitted to the sweep's own shapes; approaches 2 and 3 then agree on what a budget buys.
"""
from __future__ import annotations

import math

import numpy as np

from lmjax.errors import DataError, UsageError
from lmjax.scaling.lbfgs import lbfgs

# Hoffmann et al.'s grid of initial values (4,500 starts).
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
        "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.01, 5.0),
        "b": np.arange(0.0, 25.01, 5.0)}
HUBER_DELTA = 1e-3
NAMES = ("E", "A", "alpha", "B", "beta")


def law(theta, n, d):
  """L(N, D) for theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  return np.exp(e) + np.exp(a - alpha * np.log(n)) + np.exp(b - beta * np.log(d))


def constants(theta) -> dict:
  a, b, e, alpha, beta = (float(x) for x in theta)
  with np.errstate(over="ignore"):  # a resample's fit may run away: its A or B is then inf
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": alpha, "B": float(np.exp(b)),
            "beta": beta}


def _objective(theta, log_n, log_d, log_l, weights, delta=HUBER_DELTA):
  """Weighted mean Huber loss of the log residuals for many parameter vectors at once, divided by
  delta (the same minimum, better scaled), and its gradient. theta [S, 5] = (a, b, e, alpha, beta);
  log_n, log_d, log_l [n] the data; weights [S or 1, n] (bootstrap resamples are counts)."""
  a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape[:1] +
                                                                         log_n.shape)])
  top = terms.max(axis=0)
  soft = np.exp(terms - top)
  total = soft.sum(axis=0)
  soft /= total  # d LSE / d term
  r = top + np.log(total) - log_l  # [S, n]
  abs_r = np.abs(r)
  w = weights / weights.sum(axis=1, keepdims=True)
  loss = (w * np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))).sum(1) / delta
  g = w * np.clip(r, -delta, delta) / delta
  grad = np.stack([(g * soft[0]).sum(1), (g * soft[1]).sum(1), (g * soft[2]).sum(1),
                   -(g * soft[0] * log_n).sum(1), -(g * soft[1] * log_d).sum(1)], axis=1)
  return loss, grad


def _grid_starts() -> np.ndarray:
  mesh = np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=1)


def fit_law(n, d, loss, extra_starts=()) -> dict:
  """Approach 3 from all of Hoffmann et al.'s 4,500 grid starts (and `extra_starts`)."""
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  if len(loss) < 5:
    raise DataError(f"Fitting L(N, D) needs at least 5 finished points (5 unknowns); there are "
                    f"{len(loss)}.")
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  starts = np.concatenate([np.reshape(extra_starts, (-1, 5)), _grid_starts()])
  ones = np.ones((1, len(loss)))
  with np.errstate(over="ignore", invalid="ignore"):  # starts that run away: inf, then dropped
    x, f = lbfgs(lambda t, rows: _objective(t, log_n, log_d, log_l, ones), starts)
  theta = x[int(np.argmin(f))]
  residuals = np.log(law(theta, n, d)) - log_l
  return {"theta": theta.tolist(), **constants(theta), "objective": float(f.min()),
          "rms_log_residual": float(np.sqrt(np.mean(residuals ** 2))), "starts": len(starts)}


def bootstrap(n, d, loss, theta, samples: int = 200, seed: int = 0, starts: int = 8) -> dict:
  """Refits on `samples` resamples of the points (drawn with replacement), each from the full
  fit's optimum and the `starts` grid points best for that resample, all in one L-BFGS batch;
  {name: [2.5th, 97.5th percentile]} (and "a" for beta / (alpha + beta))."""
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  rng = np.random.default_rng(seed)
  counts = np.stack([np.bincount(rng.integers(0, len(loss), len(loss)), minlength=len(loss))
                     for _ in range(samples)]).astype(np.float64)
  counts = counts[(counts > 0).sum(1) >= 5]  # 5 unknowns need 5 distinct points
  if not len(counts):
    return {}
  grid = _grid_starts()
  rows, weights = [], []
  for c in counts:
    before, _ = _objective(grid, log_n, log_d, log_l, c[None])
    rows += [np.asarray(theta)] + list(grid[np.argsort(before, kind="stable")[:starts]])
    weights += [c] * (starts + 1)
  weights = np.array(weights)
  with np.errstate(over="ignore", invalid="ignore"):
    x, f = lbfgs(lambda t, r: _objective(t, log_n, log_d, log_l, weights[r]), np.array(rows))
  best = x.reshape(len(counts), starts + 1, 5)[np.arange(len(counts)),
                                                np.argmin(f.reshape(len(counts), -1), axis=1)]
  fits = np.array([[constants(t)[k] for k in NAMES] for t in best])
  def interval(x):  # "nearest": no interpolation between runaway (inf) fits
    return [float(np.percentile(x, q, method="nearest")) for q in (2.5, 97.5)]
  out = {k: interval(fits[:, i]) for i, k in enumerate(NAMES)}
  out["a"] = interval(fits[:, 4] / (fits[:, 2] + fits[:, 4]))
  out["samples"] = len(fits)
  return out


def flops_per_token_law(n, flops_per_token) -> tuple[float, float]:
  """(k, c) with flops_per_token ~ k N^c over the sweep's shapes (log-log least squares)."""
  n, f = np.asarray(n, np.float64), np.asarray(flops_per_token, np.float64)
  if len(set(n.tolist())) < 2:
    return float(np.mean(f / n)), 1.0
  c, log_k = np.polyfit(np.log(n), np.log(f), 1)
  return float(math.exp(log_k)), float(c)


def compute_optimal(theta, c_budgets, fpt_law) -> list[dict]:
  """Approach 3's allocation: for each budget C, N* = argmin_N L(N, C / f(N)) (a fine grid in log N
  from 1e2 to 1e13, then refined), D* = C / f(N*)."""
  from scipy import optimize
  k, c = fpt_law
  out = []
  for budget in c_budgets:
    def loss_at(log_n, budget=budget):
      n = math.exp(log_n)
      return float(law(theta, n, budget / (k * n ** c)))
    grid = np.linspace(math.log(1e2), math.log(1e13), 2000)
    i = int(np.argmin([loss_at(x) for x in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    log_n = optimize.minimize_scalar(loss_at, bounds=(lo, hi), method="bounded").x
    n_opt = math.exp(log_n)
    d_opt = budget / (k * n_opt ** c)
    out.append({"flops": float(budget), "params": n_opt, "tokens": d_opt,
                "tokens_per_param": d_opt / n_opt, "loss": loss_at(log_n),
                "at_grid_edge": i in (0, len(grid) - 1)})
  return out


def power_law_exponent(xs, ys) -> float | None:
  """d log y / d log x by least squares, None with fewer than two distinct x."""
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if len(set(xs.tolist())) < 2:
    return None
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def isoflop_fits(results: list[dict], params_key: str, fpt_law) -> list[dict]:
  """Approach 2: for each FLOP budget with at least 3 sizes, L = p2 x^2 + p1 x + p0 in x = log N;
  its vertex gives N*(C): flagged when outside the sizes trained, not claimed when the parabola
  opens downwards or its vertex is more than 10x beyond them."""
  k, c = fpt_law
  groups: dict[float, list[dict]] = {}
  for r in results:
    if r.get("budget_kind") == "flops":
      groups.setdefault(float(r["budget"]), []).append(r)
  fits = []
  for budget, rows in sorted(groups.items()):
    n = np.array([r[params_key] for r in rows], np.float64)
    loss = np.array([r["val_loss"] for r in rows], np.float64)
    fit = {"flops": budget, "points": len(rows), "params": n.tolist(), "loss": loss.tolist()}
    if len(set(n.tolist())) >= 3:
      p2, p1, p0 = np.polyfit(np.log(n), loss, 2)
      fit["parabola"] = [float(p2), float(p1), float(p0)]
      log_lo, log_hi = math.log(n.min()) - math.log(10), math.log(n.max()) + math.log(10)
      if p2 > 0 and log_lo <= -p1 / (2 * p2) <= log_hi:
        n_opt = math.exp(-p1 / (2 * p2))
        fit.update(params_opt=n_opt, tokens_opt=budget / (k * n_opt ** c),
                   loss_opt=float(p0 - p1 * p1 / (4 * p2)),
                   inside=bool(n.min() <= n_opt <= n.max()))
        fit["tokens_per_param"] = fit["tokens_opt"] / n_opt
    fits.append(fit)
  return fits


def fit(results: list[dict], params_key: str = "params_nonembedding", bootstrap_samples: int = 200,
        extrapolate: int = 2, seed: int = 0) -> dict:
  """Everything `lmjax fit` prints and plots, as one JSON-serializable dict."""
  if params_key not in ("params_nonembedding", "params"):
    raise UsageError(f"--params must be nonembedding or total, got '{params_key}'.")
  results = [r for r in results if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
  n = [r[params_key] for r in results]
  d = [r["tokens"] for r in results]
  loss = [r["val_loss"] for r in results]
  law3 = fit_law(n, d, loss)
  intervals = (bootstrap(n, d, loss, law3["theta"], samples=bootstrap_samples, seed=seed)
               if bootstrap_samples else {})
  by_size = {}
  for r in results:
    by_size[r[params_key]] = r["flops_per_token"]
  fpt_law = flops_per_token_law(list(by_size), list(by_size.values()))
  budgets = sorted({float(r["budget"]) for r in results if r.get("budget_kind") == "flops"} or
                   {float(r["flops"]) for r in results})
  budgets_all = budgets + [budgets[-1] * 10.0 ** (i + 1) for i in range(extrapolate)]
  optimal = compute_optimal(law3["theta"], budgets_all, fpt_law)
  isoflops = isoflop_fits(results, params_key, fpt_law)
  minima = [f for f in isoflops if "params_opt" in f]
  predicted = law(law3["theta"], np.array(n, np.float64), np.array(d, np.float64))
  return {
      "points": len(results), "params_key": params_key, "law": law3, "intervals": intervals,
      "exponent_a": law3["beta"] / (law3["alpha"] + law3["beta"]),
      "flops_per_token_law": {"k": fpt_law[0], "c": fpt_law[1]},
      "compute_optimal": optimal,
      "compute_optimal_exponents": {
          "params": power_law_exponent([o["flops"] for o in optimal], [o["params"] for o in optimal]),
          "tokens": power_law_exponent([o["flops"] for o in optimal], [o["tokens"] for o in optimal])},
      "isoflop": isoflops,
      "isoflop_exponents": {
          "params": power_law_exponent([f["flops"] for f in minima], [f["params_opt"] for f in minima]),
          "tokens": power_law_exponent([f["flops"] for f in minima], [f["tokens_opt"] for f in minima])},
      "observed": [{"name": r.get("name"), "params": r[params_key], "tokens": r["tokens"],
                    "flops": r["flops"], "loss": r["val_loss"], "predicted": float(p),
                    "bits_per_byte": r.get("bits_per_byte")}
                   for r, p in zip(results, predicted)],
      "max_epochs": max((r.get("epochs") or 0.0) for r in results),
  }
