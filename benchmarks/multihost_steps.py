"""The per-step stop check of a 2-process CPU run (2 JAX processes on this machine, gloo): how long
the host waits in it while a step is in flight, and the loop's step time for code trees.

  python benchmarks/multihost_steps.py [--code DIR ...] [--runs 3] [--steps 200]

First, in 2 processes: a jitted step of ~50 ms is dispatched, then the host times the check that
`lmjax train` makes every step, the old one (a host all-gather of the stop flag,
`multihost_utils.process_allgather`, as `distributed.any_process` did) and the new one
(`multihost_utils.reached_preemption_sync_point`); median of 10, each with a step in flight.
Then:

Each `--code` directory (default: this checkout) is a tree of lmjax whose `python -m lmjax train`
is launched as 2 processes x 1 CPU device on a small synthetic-data model (2 layers, d_model 64,
batch 16 x 32 tokens), logging every 20 steps. The trees alternate run by run (A, B, A, B, ...), so
that load from elsewhere falls on both. Prints each run's median step time (from the run's
metrics.jsonl: wall time between log points / steps, compiling excluded) and the wall time of the
whole loop, then the median of each tree and their ratios.

What it shows: a per-step host-level all-gather (as `any_process()` did for preemption) makes
each host wait for step N before it dispatches step N+1; JAX's preemption sync point does not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/quickstart.py", "--no_progress", "--config.data.source=synthetic",
        "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
        "--config.model.mlp_dim=128", "--config.model.vocab_size=128", "--config.data.seq_len=32",
        "--config.train.batch_size=16", "--config.train.log_every=20",
        "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000",
        "--config.optim.warmup_steps=2", "--config.train.sample_prompt="]


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_once(code: str, steps: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    port, procs = free_port(), []
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=code)
    for i in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "lmjax", "train", *ARGS, f"--config.train.steps={steps}",
           f"--workdir={tmp}/run", f"--config.distributed.coordinator_address=localhost:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
          cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
      _, err = p.communicate(timeout=900)
      if p.returncode:
        raise SystemExit(f"{code}: exit {p.returncode}\n{err[-2000:]}")
    with open(f"{tmp}/run/metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
  times = [r["step_time"] for r in records if r["split"] == "train" and "step_time" in r]
  return {"step_ms": 1000 * statistics.median(times)}


def check_child(port: int, process_id: int) -> None:
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", 2, process_id)
  from jax.experimental import multihost_utils
  busy = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ y), x))
  x = jnp.ones((512, 512)) / 512
  busy(x).block_until_ready()
  start = time.perf_counter()
  busy(x).block_until_ready()
  step = time.perf_counter() - start
  checks = {"all-gather (old)": lambda s: np.asarray(
                multihost_utils.process_allgather(np.int32(False))).max(),
            "preemption sync point (new)": multihost_utils.reached_preemption_sync_point}
  out = {}
  for name, check in checks.items():
    check(0)
    seconds = []
    for s in range(1, 11):
      y = busy(x)  # a step in flight
      start = time.perf_counter()
      check(s)
      seconds.append(time.perf_counter() - start)
      y.block_until_ready()
    out[name] = statistics.median(seconds)
  if process_id == 0:
    print(f"a step takes {step * 1e3:.1f} ms; the host waits in the check, with a step in flight: " +
          ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in out.items()), flush=True)


def check() -> None:
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, __file__, "--check_child", str(port), str(i)],
                            env=env, stderr=subprocess.DEVNULL) for i in range(2)]
  for p in procs:
    p.wait(timeout=300)


def main() -> None:
  if sys.argv[1:2] == ["--check_child"]:
    return check_child(int(sys.argv[2]), int(sys.argv[3]))
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--code", action="append", help="an lmjax tree (repeatable)")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  codes = args.code or [ROOT]
  results = {c: [] for c in codes}
  print(f"load average before: {os.getloadavg()}")
  check()
  for r in range(args.runs):
    for code in codes:
      out = run_once(os.path.abspath(code), args.steps)
      results[code].append(out["step_ms"])
      print(f"run {r + 1} {code}: median step {out['step_ms']:.2f} ms", flush=True)
  medians = {c: statistics.median(v) for c, v in results.items()}
  for c, m in medians.items():
    print(f"{c}: median of runs {m:.2f} ms/step ({', '.join(f'{x:.2f}' for x in results[c])}); "
          f"vs the first: {m / medians[codes[0]]:.3f}x")
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
