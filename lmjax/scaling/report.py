"""The text report of a scaling-law fit (`lmjax fit`'s output)."""
from __future__ import annotations

import math

from lmjax.scaling.law import NAMES


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
