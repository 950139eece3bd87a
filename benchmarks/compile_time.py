"""Compile time of the train step against depth, with and without `model.scan_layers`.

  python benchmarks/compile_time.py [--config configs/gpt2.py:124m] [--layers 2 24] [--repeats 2]

Ahead-of-time trace + XLA compile (`lmjax.bench.compile_train_step`) of the config's real train
step for each depth, scanned and unrolled, in alternating order, each in a fresh process (so no
cache is shared); prints the best time of each and the ratio deepest / shallowest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config: str, layers: int, scan: bool, overrides) -> float:
  code = (
      "import json, sys\n"
      "from lmjax import bench, builder, config as config_lib\n"
      f"cfg = config_lib.get_config({config!r}, {list(overrides)!r} + "
      f"['model.num_layers={layers}', 'model.scan_layers={scan}'])\n"
      "run = builder.build(cfg, builder.pretraining_objective(cfg))\n"
      "_, seconds = bench.compile_train_step(run, bench.synthetic_batch(run))\n"
      "print(json.dumps({'seconds': seconds, 'params': run.num_params}))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")),
                       check=False)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/gpt2.py:124m")
  p.add_argument("--layers", type=int, nargs="+", default=[2, 24])
  p.add_argument("--repeats", type=int, default=2)
  args, rest = p.parse_known_args()
  overrides = ["data.source=synthetic", "train.batch_size=8", "data.seq_len=256"]
  overrides += [a[len("--config."):] for a in rest if a.startswith("--config.")]
  best = {}
  for _ in range(args.repeats):
    for scan in (True, False):
      for layers in args.layers:
        seconds = child(args.config, layers, scan, overrides)
        best[scan, layers] = min(best.get((scan, layers), float("inf")), seconds)
        print(f"scan_layers={scan!s:5} {layers:3d} layers: {seconds:6.2f} s", flush=True)
  lo, hi = min(args.layers), max(args.layers)
  for scan in (True, False):
    print(f"scan_layers={scan}: best {best[scan, lo]:.2f} s ({lo} layers), {best[scan, hi]:.2f} s "
          f"({hi} layers), ratio {best[scan, hi] / best[scan, lo]:.2f}")
  print(json.dumps({"config": args.config, "overrides": overrides,
                    "best_seconds": {f"scan={s},layers={n}": t for (s, n), t in best.items()}}))


if __name__ == "__main__":
  main()
