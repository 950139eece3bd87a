"""lmjax vs a plain PyTorch loop, same model and training math, on this machine's CPU.

  python benchmarks/compare_cpu.py [--runs 5] [--steps 10] [--threads 2] [--torch_compile]
  python benchmarks/compare_cpu.py --profile   # where each framework's step time goes

Shape: GPT-2 style, 6 layers, d_model 384, 6 heads, MLP 1536, vocabulary 8192, sequence 256,
global batch 16, float32, AdamW with global-norm clipping (13.9M parameters). Each run is a fresh
process (lmjax through `lmjax.bench.benchmark`, torch through benchmarks/torch_gpt.py), and the
frameworks alternate (lmjax, torch, lmjax, torch, ...) so that load from other processes on a
shared machine falls on both. Both get the same cores: each child is pinned to the first
`--threads` cores (XLA sizes its thread pool from the process's CPU affinity) and torch also
calls `torch.set_num_threads`. torch runs eagerly with its best CPU settings (fused AdamW,
`F.scaled_dot_product_attention`), or through `torch.compile` with `--torch_compile`; lmjax with
its defaults (no XLA flags). Prints each run, then the median tokens/s of each, their ratio and
the spread, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"layers": 6, "d_model": 384, "heads": 6, "vocab": 8192, "seq_len": 256, "batch": 16}

LMJAX_OVERRIDES = [
    "model.style=gpt2", f"model.num_layers={SHAPE['layers']}", f"model.d_model={SHAPE['d_model']}",
    f"model.num_heads={SHAPE['heads']}", f"model.mlp_dim={4 * SHAPE['d_model']}",
    f"model.vocab_size={SHAPE['vocab']}", f"model.max_len={SHAPE['seq_len']}",
    f"data.seq_len={SHAPE['seq_len']}", f"train.batch_size={SHAPE['batch']}",
    "model.dtype=float32", "model.param_dtype=float32", "optim.name=adamw", "data.source=synthetic",
]


def lmjax_config(extra=()):
  from lmjax import config as config_lib
  return config_lib.get_config(None, LMJAX_OVERRIDES + list(extra))


def run_lmjax_here(steps: int, warmup: int, extra=()) -> dict:
  from lmjax import bench
  r = bench.benchmark(lmjax_config(extra), steps=steps, warmup=warmup, loader=False)
  return {"framework": "lmjax", "num_params": r["num_params"],
          "tokens_per_second": r["tokens_per_second"], "step_time_s": r["step_time_seconds"],
          "compile_seconds": r["compile_seconds"]}


def profile_lmjax(steps: int, warmup: int, extra=(), top: int = 12) -> None:
  """Where lmjax's step spends its time: the XLA CPU ops (thunks) run inside the executable over
  `steps` steps under the JAX profiler (XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true, set by
  --profile; no Python tracer), summed by op name and by kind."""
  import bisect
  import collections
  import glob
  import gzip
  import tempfile

  import jax
  from lmjax import bench
  cfg = lmjax_config(extra)
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as d:
    bench.benchmark(cfg, steps=1, warmup=warmup, loader=False)  # compile caches warm
    with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=options):
      bench.benchmark(cfg, steps=steps, warmup=0, loader=False)
    with gzip.open(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"),
                             recursive=True)[0]) as f:
      events = json.load(f)
  events = [e for e in (events["traceEvents"] if isinstance(events, dict) else events)
            if e.get("ph") == "X" and "dur" in e]
  runs = collections.defaultdict(list)  # per thread: the executable's runs, (start, end)
  for e in events:
    if e["name"] == "ThunkExecutor::Execute":
      runs[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
  for r in runs.values():
    r.sort()
  by_op = collections.Counter()
  for e in events:  # an op is an event inside a run on its thread, named after its HLO
    r = runs.get((e["pid"], e["tid"]), [])
    i = bisect.bisect_right(r, (e["ts"], float("inf"))) - 1
    if e["name"] != "ThunkExecutor::Execute" and i >= 0 and e["ts"] + e["dur"] <= r[i][1]:
      by_op[e["name"].split(".")[0]] += e["dur"] / 1e6
  kinds = collections.Counter()
  for name, t in by_op.items():
    kinds[op_kind(name)] += t
  total = sum(kinds.values())
  print(f"lmjax: XLA CPU op time over the profiled run (init and {steps} step(s)): {total:.2f} s")
  for kind, t in kinds.most_common():
    print(f"  {kind:<22} {t:6.2f} s  {t / total:6.1%}")
  print("largest op kinds:")
  for name, t in by_op.most_common(top):
    print(f"  {name:<40} {t * 1e3:8.1f} ms")


def op_kind(name: str) -> str:
  """ynn_fusion is XNNPACK's matmul fusion on XLA CPU; dot is XLA's own (Eigen) matmul."""
  if name.startswith(("ynn_fusion", "dot", "onednn", "custom-call")):
    return "matmuls (dot)"
  if "transpose" in name or name.startswith(("copy", "bitcast_copy")):
    return "transposes/copies"
  return "everything else"


def child(framework: str, steps: int, warmup: int, threads: int, extra=(),
          torch_compile: bool = False) -> dict:
  """One run in a fresh process pinned to `threads` cores."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if framework == "lmjax":
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--warmup", str(warmup)]
    cmd += [f"--config.{o}" for o in extra]
  else:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_gpt.py"), "--steps", str(steps),
           "--warmup", str(warmup), "--threads", str(threads)]
    cmd += [f"--{k}={v}" for k, v in SHAPE.items()] + (["--compile"] if torch_compile else [])
  cores = sorted(os.sched_getaffinity(0))[:threads]
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False,
                       preexec_fn=lambda: os.sched_setaffinity(0, cores))
  if out.returncode:
    raise RuntimeError(f"{framework} run failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(values) -> str:
  return (f"median {statistics.median(values):,.0f} (min {min(values):,.0f}, "
          f"max {max(values):,.0f}, n={len(values)})")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", type=int, default=5, help="runs of each framework, alternating")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="cores/threads each framework may use")
  p.add_argument("--torch_compile", action="store_true", help="torch.compile the torch model")
  p.add_argument("--profile", action="store_true",
                 help="instead: lmjax's step under the JAX profiler, time per XLA op kind")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args, rest = p.parse_known_args()
  extra = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  if args.child:
    print(json.dumps(run_lmjax_here(args.steps, args.warmup, extra)))
    return
  if args.profile:
    if "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):  # must be set before JAX starts
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=(
          os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip())
      sys.exit(subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode)
    profile_lmjax(args.steps, args.warmup, extra)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_gpt.py"), "--profile",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    subprocess.run(cmd + [f"--{k}={v}" for k, v in SHAPE.items()], check=True,
                   stdout=subprocess.DEVNULL)
    return
  results = {"lmjax": [], "torch": []}
  load_before = os.getloadavg()
  print(f"load average before: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min)",
        flush=True)
  for i in range(args.runs):
    for framework in ("lmjax", "torch"):
      r = child(framework, args.steps, args.warmup, args.threads, extra, args.torch_compile)
      results[framework].append(r["tokens_per_second"])
      print(f"run {i + 1} {framework:>5}: {r['tokens_per_second']:8,.0f} tokens/s "
            f"({r['num_params']:,} params)", flush=True)
  load_after = os.getloadavg()
  print(f"load average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")
  ratios = [j / t for j, t in zip(results["lmjax"], results["torch"])]
  print(f"lmjax tokens/s: {summarize(results['lmjax'])}")
  print(f"torch tokens/s: {summarize(results['torch'])}")
  ratio = statistics.median(results["lmjax"]) / statistics.median(results["torch"])
  print(f"lmjax / torch: {ratio:.2f}x (ratio of medians); per-pair ratios "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")
  print(json.dumps({"shape": SHAPE, "threads": args.threads, "steps": args.steps,
                    "torch_compile": args.torch_compile,
                    "overrides": extra, **results, "pair_ratios": ratios,
                    "ratio_of_medians": ratio,
                    "load_before": load_before[:2], "load_after": load_after[:2]}))


if __name__ == "__main__":
  main()
