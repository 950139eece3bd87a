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

from lmjax.config import ConfigError

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


def lbfgs(fun_grad, x0, memory: int = 10, max_iter: int = 500, gtol: float = 1e-7,
          ftol: float = 1e-12):
  """L-BFGS (Nocedal & Wright, algorithm 7.4: the two-loop recursion) from many starting points at
  once: x0 [S, P]; `fun_grad(x [s, P], rows [s]) -> (f [s], g [s, P])` for the starts `rows`. A
  backtracking (Armijo) line search; each start stops by itself when its gradient or its progress
  is below tolerance, and only the starts still running are computed. Vectorized so that Hoffmann
  et al.'s 4,500 starts, and the refits of every bootstrap resample, run together in seconds.
  Returns (x, f)."""
  x = np.array(x0, np.float64)
  starts, dims = x.shape
  f, g = fun_grad(x, np.arange(starts))
  s_hist, y_hist = np.zeros((memory, starts, dims)), np.zeros((memory, starts, dims))
  rho = np.zeros((memory, starts))  # 0 marks an empty or skipped slot: it then adds nothing
  gamma = np.ones(starts)  # initial inverse-Hessian scale: s.y / y.y of the newest pair
  active = np.abs(g).max(1) > gtol
  for it in range(max_iter):
    rows = np.flatnonzero(active)
    if not len(rows):
      break
    xa, fa, ga = x[rows], f[rows], g[rows]
    q = ga.copy()
    order = [(it - 1 - j) % memory for j in range(min(it, memory))]  # newest first
    alphas = []
    for i in order:
      alpha = rho[i, rows] * (s_hist[i, rows] * q).sum(1)
      q -= alpha[:, None] * y_hist[i, rows]
      alphas.append(alpha)
    r = gamma[rows, None] * q
    for i, alpha in zip(reversed(order), reversed(alphas)):
      beta = rho[i, rows] * (y_hist[i, rows] * r).sum(1)
      r += s_hist[i, rows] * (alpha - beta)[:, None]
    p = -r
    slope = (ga * p).sum(1)
    uphill = slope >= 0  # not a descent direction (numerical trouble): use the gradient
    p[uphill], slope[uphill] = -ga[uphill], -(ga[uphill] ** 2).sum(1)
    step = np.ones(len(rows)) if it else np.minimum(1.0, 1.0 / np.abs(ga).sum(1))
    accepted = np.zeros(len(rows), bool)
    x_new, f_new, g_new = xa.copy(), fa.copy(), ga.copy()
    for _ in range(60):
      todo = np.flatnonzero(~accepted)
      x_try = xa[todo] + step[todo, None] * p[todo]
      f_try, g_try = fun_grad(x_try, rows[todo])
      ok = f_try <= fa[todo] + 1e-4 * step[todo] * slope[todo]
      done = todo[ok]
      x_new[done], f_new[done], g_new[done] = x_try[ok], f_try[ok], g_try[ok]
      accepted[done] = True
      if accepted.all():
        break
      step[todo[~ok]] *= 0.5
    s_new, y_new = x_new - xa, g_new - ga
    sy, yy = (s_new * y_new).sum(1), (y_new * y_new).sum(1)
    keep = accepted & (sy > 1e-12 * yy) & (yy > 0)
    slot = it % memory
    s_hist[slot], y_hist[slot], rho[slot] = 0.0, 0.0, 0.0
    s_hist[slot, rows], y_hist[slot, rows] = s_new, y_new
    rho[slot, rows] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
    gamma[rows] = np.where(keep, sy / np.where(keep, yy, 1.0), gamma[rows])
    x[rows], f[rows], g[rows] = x_new, f_new, g_new
    small_progress = (fa - f_new) <= ftol * np.maximum(np.maximum(np.abs(fa), np.abs(f_new)), 1.0)
    # a start stops when the line search finds no decrease (as good as it gets), when it barely
    # moves, or when its gradient vanishes
    active[rows] = accepted & ~small_progress & (np.abs(g_new).max(1) > gtol)
  return x, np.where(np.isfinite(f), f, np.inf)


def _grid_starts() -> np.ndarray:
  mesh = np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=1)


def fit_law(n, d, loss, extra_starts=()) -> dict:
  """Approach 3 from all of Hoffmann et al.'s 4,500 grid starts (and `extra_starts`)."""
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  if len(loss) < 5:
    raise ConfigError(f"Fitting L(N, D) needs at least 5 finished points (5 unknowns); there are "
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
    raise ConfigError(f"--params must be nonembedding or total, got '{params_key}'.")
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


def _fmt(x: float) -> str:
  return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}".replace("e+0", "e").replace("e+", "e")


def format_report(f: dict) -> str:
  law3, iv = f["law"], f["intervals"]
  n_name = "non-embedding parameters" if f["params_key"] == "params_nonembedding" else "parameters"
  lines = [f"{f['points']} points; N = {n_name}, D = training tokens, C = training FLOPs.", "",
           "Approach 3: L(N, D) = E + A / N^alpha + B / D^beta (Huber loss on log residuals, "
           f"L-BFGS from Hoffmann et al.'s grid of {law3['starts']} starts" +
           (f"; 95% intervals from {iv['samples']} bootstrap resamples)" if iv else ")")]
  for k in NAMES:
    interval = f"   [{_fmt(iv[k][0])}, {_fmt(iv[k][1])}]" if k in iv else ""
    lines.append(f"  {k:<6}{_fmt(law3[k]):>10}{interval}")
  lines.append(f"  RMS log residual {law3['rms_log_residual']:.4f} "
               f"(the fit's typical error: {100 * (math.exp(law3['rms_log_residual']) - 1):.2f}% "
               "of the loss)")
  fl = f["flops_per_token_law"]
  lines += ["", (f"Compute-optimal allocation from the law (C = f(N) D, f(N) = {fl['k']:.3g} "
                 f"N^{fl['c']:.3f} FLOPs per token over the sweep's shapes):"),
            f"  {'C (FLOPs)':>10}{'N*':>11}{'D* (tokens)':>13}{'D*/N*':>8}{'L*':>8}"]
  for o in f["compute_optimal"]:
    lines.append(f"  {o['flops']:>10.3g}{_fmt(o['params']):>11}{_fmt(o['tokens']):>13}"
                 f"{o['tokens_per_param']:>8.3g}{o['loss']:>8.4f}" +
                 ("  (at the search's edge)" if o["at_grid_edge"] else ""))
  ex = f["compute_optimal_exponents"]
  a_iv = f"  (95% interval of beta / (alpha + beta): [{iv['a'][0]:.3f}, {iv['a'][1]:.3f}])" \
      if "a" in iv else ""
  if ex["params"] is not None:
    lines.append(f"  N* ~ C^{ex['params']:.3f}, D* ~ C^{ex['tokens']:.3f}{a_iv}")
  lines += ["", "Approach 2: IsoFLOP parabolas in log N"]
  if not f["isoflop"]:
    lines.append("  (needs FLOP budgets: this sweep has token budgets)")
  else:
    lines.append(f"  {'C (FLOPs)':>10}{'runs':>6}{'N*':>11}{'D* (tokens)':>13}{'D*/N*':>8}"
                 f"{'L*':>8}")
  for g in f["isoflop"]:
    if "params_opt" in g:
      lines.append(f"  {g['flops']:>10.3g}{g['points']:>6}{_fmt(g['params_opt']):>11}"
                   f"{_fmt(g['tokens_opt']):>13}{g['tokens_per_param']:>8.3g}"
                   f"{g['loss_opt']:>8.4f}" + ("" if g["inside"] else
                                              "  (outside the sizes trained: extrapolated)"))
    else:
      why = ("fewer than 3 sizes" if "parabola" not in g else
             "no minimum near the sizes trained (add smaller or larger models)")
      lines.append(f"  {g['flops']:>10.3g}{g['points']:>6}  {why}")
  ex2 = f["isoflop_exponents"]
  if ex2["params"] is not None:
    lines.append(f"  N* ~ C^{ex2['params']:.3f}, D* ~ C^{ex2['tokens']:.3f}")
  if f["max_epochs"] > 1:
    lines += ["", (f"Note: some points saw their data {f['max_epochs']:.2f} times; repeated "
                   "data bends scaling laws (Muennighoff et al. 2023).")]
  return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------------

def pyplot():
  """matplotlib.pyplot on the Agg backend (files only), or a clear error."""
  try:
    import matplotlib
  except ImportError:
    raise ConfigError("lmjax draws plots with matplotlib, which is not installed: "
                      "pip install -e \".[plots]\" (or pass --no_plots for the numbers alone).") \
        from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _no_minor_labels(ax):  # a log axis spanning less than a decade labels its minor ticks, overlapping
  from matplotlib.ticker import NullFormatter
  ax.xaxis.set_minor_formatter(NullFormatter())


def _isoflop_axes(ax, f):
  from matplotlib import cm
  groups = f["isoflop"]
  colors = cm.viridis(np.linspace(0, 0.9, max(len(groups), 1)))
  for g, color in zip(groups, colors):
    ax.scatter(g["params"], g["loss"], color=color, s=14, label=f"C = {g['flops']:.2g}")
    if "parabola" in g:
      x = np.linspace(math.log(min(g["params"])) - 0.3, math.log(max(g["params"])) + 0.3, 100)
      ax.plot(np.exp(x), np.polyval(g["parabola"], x), color=color, lw=1)
    if "params_opt" in g:
      ax.scatter([g["params_opt"]], [g["loss_opt"]], color=color, marker="*", s=90,
                 edgecolor="black", linewidth=0.5, zorder=3)
  ax.set(xscale="log", ylabel="validation loss", title="IsoFLOP profiles (* = minimum)",
         xlabel="N (non-embedding parameters)" if f["params_key"] == "params_nonembedding"
         else "N (parameters)")
  _no_minor_labels(ax)
  if groups:
    ax.legend(fontsize=7)


def _compute_axes(ax, f):
  from matplotlib import cm
  sizes = sorted({o["params"] for o in f["observed"]})
  colors = cm.plasma(np.linspace(0, 0.85, max(len(sizes), 1)))
  for size, color in zip(sizes, colors):
    rows = sorted((o["flops"], o["loss"]) for o in f["observed"] if o["params"] == size)
    ax.plot(*zip(*rows), marker="o", ms=3, lw=1, color=color, label=f"N = {size:.3g}")
  c_lo = min(o["flops"] for o in f["observed"]) / 2
  c_hi = max(o["flops"] for o in f["observed"]) * 2
  frontier = compute_optimal(f["law"]["theta"], np.geomspace(c_lo, c_hi, 40),
                             (f["flops_per_token_law"]["k"], f["flops_per_token_law"]["c"]))
  ax.plot([o["flops"] for o in frontier], [o["loss"] for o in frontier], "k--", lw=1.2,
          label="fitted frontier L*(C)")
  ax.set(xscale="log", xlabel="C (training FLOPs)", ylabel="validation loss",
         title="Loss against compute, per model size")
  _no_minor_labels(ax)
  ax.legend(fontsize=7)


def _predicted_axes(ax, f):
  obs = np.array([o["loss"] for o in f["observed"]])
  pred = np.array([o["predicted"] for o in f["observed"]])
  ax.scatter(obs, pred, s=14)
  lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
  pad = 0.03 * (hi - lo)
  ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
  law3 = f["law"]
  ax.set(xlabel="observed validation loss", ylabel="predicted by L(N, D)",
         title=f"L = {law3['E']:.2f} + {law3['A']:.3g}/N^{law3['alpha']:.2f} + "
               f"{law3['B']:.3g}/D^{law3['beta']:.2f}")
  ax.title.set_fontsize(9)


def plot(f: dict, out_dir: str) -> list[str]:
  """isoflop.png, loss_vs_compute.png, predicted_vs_observed.png and all three side by side in
  summary.png; returns the paths."""
  import os
  plt = pyplot()
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, draw in (("isoflop", _isoflop_axes), ("loss_vs_compute", _compute_axes),
                     ("predicted_vs_observed", _predicted_axes)):
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    draw(ax, f)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{name}.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=80)
  for ax, draw in zip(axes, (_isoflop_axes, _compute_axes, _predicted_axes)):
    draw(ax, f)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "summary.png"))
  fig.savefig(paths[-1])
  plt.close(fig)
  return paths


def main_fit(workdir: str, params: str = "nonembedding", bootstrap_samples: int = 200,
             plots: bool = True) -> dict:
  """`lmjax fit`: reads WORKDIR/results.jsonl, prints the fits, writes WORKDIR/fit.json and the
  plots in WORKDIR/plots/."""
  import json
  import os

  from etils import epath

  from lmjax import sweep
  if plots:  # errors before the fit, not after
    pyplot()
    if "://" in workdir:
      raise ConfigError("Plots are written to a local directory: copy results.jsonl to one and "
                        "fit there, or pass --no_plots.")
  results = sweep.read_results(workdir)
  params_key = {"nonembedding": "params_nonembedding", "total": "params"}.get(params)
  if params_key is None:
    raise ConfigError(f"--params must be nonembedding or total, got '{params}'.")
  f = fit(results, params_key=params_key, bootstrap_samples=bootstrap_samples)
  print(format_report(f))
  (epath.Path(workdir) / "fit.json").write_text(json.dumps(f, indent=1))
  print(f"\nWrote {os.path.join(workdir, 'fit.json')}")
  if plots:
    for path in plot(f, os.path.join(workdir, "plots")):
      print(f"Wrote {path}")
  return f
