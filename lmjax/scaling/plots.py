"""Plots of a scaling-law fit: IsoFLOP profiles, loss against compute, predicted against observed."""
from __future__ import annotations

import math
import os

import numpy as np

from lmjax.plotting import no_minor_labels, pyplot
from lmjax.scaling.law import compute_optimal


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
  no_minor_labels(ax)
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
  no_minor_labels(ax)
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
