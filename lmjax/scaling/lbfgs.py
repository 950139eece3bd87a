"""L-BFGS from many starting points at once, in NumPy (the scaling-law fits' optimizer)."""
from __future__ import annotations

import numpy as np


def _inverse_hessian_times(g, s_hist, y_hist, rho, gamma, rows, it: int, memory: int):
  """The two-loop recursion: the inverse-Hessian estimate times `g`, for the starts `rows`."""
  q = g.copy()
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
  return r


def _line_search(fun_grad, rows, xa, fa, ga, p, slope, step, tries: int = 60):
  """Backtracking (Armijo): halves each start's step until its loss falls enough.
  Returns (accepted, x, f, g); a start that never decreases keeps its point."""
  accepted = np.zeros(len(rows), bool)
  x_new, f_new, g_new = xa.copy(), fa.copy(), ga.copy()
  for _ in range(tries):
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
  return accepted, x_new, f_new, g_new


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
    r = _inverse_hessian_times(ga, s_hist, y_hist, rho, gamma, rows, it, memory)
    p = -r
    slope = (ga * p).sum(1)
    uphill = slope >= 0  # not a descent direction (numerical trouble): use the gradient
    p[uphill], slope[uphill] = -ga[uphill], -(ga[uphill] ** 2).sum(1)
    step = np.ones(len(rows)) if it else np.minimum(1.0, 1.0 / np.abs(ga).sum(1))
    accepted, x_new, f_new, g_new = _line_search(fun_grad, rows, xa, fa, ga, p, slope, step)
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
