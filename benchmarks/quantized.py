"""Quantized runs side by side with their float source: size, memory, val loss, decode speed.

  python benchmarks/quantized.py RUN [RUN_INT8 RUN_INT4 ...] [--tokens 64] [--batch 1] [--repeats 3]

For each run (made by `lmjax quantize` from the first): the bytes of its params in memory and of
a params-only Orbax checkpoint of them, its validation loss (as `lmjax eval` computes it), and greedy
decode tokens/s (decode.generate, one jitted loop; the first call compiles and is not timed;
the runs alternate across repeats and the median is kept). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("runs", nargs="+")
  p.add_argument("--tokens", type=int, default=64)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import jax
  from lmjax import builder, compress, decode, prune
  from lmjax import checkpoint as ckpt_lib
  loaded = {}
  for run in args.runs:
    cfg, r, params, step = builder.load_params(run)
    with tempfile.TemporaryDirectory() as tmp:  # params alone, as Orbax writes them, for all
      with ckpt_lib.open_checkpoints(tmp, 1) as checkpoints:
        checkpoints.save_params(step, params)
      loaded[run] = (cfg, r, params, compress.directory_bytes(tmp))
  prompt = [[1] + [5] * 7] * args.batch
  times = {run: [] for run in args.runs}
  for run in args.runs:  # compile
    decode.generate(loaded[run][1].model, loaded[run][2], prompt, max_new_tokens=args.tokens)
  for _ in range(args.repeats):
    for run in args.runs:
      start = time.perf_counter()
      out = decode.generate(loaded[run][1].model, loaded[run][2], prompt,
                            max_new_tokens=args.tokens)
      jax.block_until_ready(out)
      times[run].append(time.perf_counter() - start)
  base = None
  print("| run | weights | params in memory | checkpoint (params) | val loss | vs float | "
        "decode tokens/s | vs float |")
  print("|---|---|---|---|---|---|---|---|")
  for run in args.runs:
    cfg, _, params, ckpt = loaded[run]
    loss = prune.evaluate(run)["loss"]
    speed = args.batch * args.tokens / statistics.median(times[run])
    base = base or (loss, speed)
    kind = cfg.model.quantize if cfg.model.quantize != "none" else cfg.model.param_dtype
    if cfg.model.quantize == "int4":
      kind += f" (groups of {cfg.model.quant_group})"
    print(f"| {run} | {kind} | {compress.nbytes(params) / 2**20:.2f} MiB | {ckpt / 2**20:.2f} MiB"
          f" | {loss:.4f} | {100 * (loss / base[0] - 1):+.2f}% | {speed:.0f} | "
          f"{speed / base[1]:.2f}x |")


if __name__ == "__main__":
  main()
