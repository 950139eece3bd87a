"""Benchmarks of a config: compile time, step time, tokens/s, MFU, memory, loader speed.

  lmjax bench --config=configs/quickstart.py [--steps 20] [--json bench.json]

The timed steps run the config's real train step (`Run.jit_train_step`: same shardings, same
donation) on one synthetic batch already on the devices, so no data loading is timed; the loader
is measured on its own and compared. The memory estimate beside the measurements is memory.py's.
"""
from __future__ import annotations

import resource
import statistics
import tempfile
import time

import jax
import numpy as np

from lmjax import builder
from lmjax import data as data_lib
from lmjax import metrics as metrics_lib
from lmjax.flops import flops_per_token
from lmjax.memory import GiB, estimate_memory


# --- timing the train step --------------------------------------------------------------------

def synthetic_batch(run, seed: int = 0) -> dict:
  """Random tokens {"tokens": [batch, seq_len + 1]}, placed like a real batch (this process's
  rows)."""
  cfg = run.cfg
  tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size,
                                                 (cfg.train.batch_size, cfg.data.seq_len + 1),
                                                 dtype=np.int32)
  return run.put_batch({"tokens": tokens[run.process_rows]})


def compile_train_step(run, batch):
  """Ahead-of-time trace + compile of the real train step; returns (compiled, seconds)."""
  train_step = run.jit_train_step()
  start = time.perf_counter()
  with run.context():
    compiled = train_step.lower(run.abstract_state, batch).compile()
  return compiled, time.perf_counter() - start


def time_steps(step_fn, state, batch, steps: int):
  """Runs `steps` steps, waiting for each; returns (state, [seconds per step])."""
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
  return state, seconds


def peak_memory(devices) -> tuple[int, str]:
  """(bytes, what was measured): the allocator's peak on accelerators, peak RSS on CPU."""
  stats = [d.memory_stats() for d in devices]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use (max over devices)"
  # Linux reports ru_maxrss in KiB; it covers the whole process (Python, XLA, the compiler too)
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (CPU)"


def xla_memory(compiled) -> dict:
  """XLA's own buffer assignment of the compiled step, per device, where the backend has one."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # some backends do not implement it
    analysis = None
  if analysis is None:
    return {}
  result = {"xla_argument_bytes": int(analysis.argument_size_in_bytes),
            "xla_output_bytes": int(analysis.output_size_in_bytes),
            "xla_alias_bytes": int(analysis.alias_size_in_bytes),
            "xla_temp_bytes": int(analysis.temp_size_in_bytes)}
  # live at once: inputs, outputs not written over donated inputs, temporaries
  result["xla_total_bytes"] = (result["xla_argument_bytes"] + result["xla_output_bytes"] -
                               result["xla_alias_bytes"] + result["xla_temp_bytes"])
  return result


def spread(values) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- the input pipeline -----------------------------------------------------------------------

def measure_loader(cfg, workdir: str, process_rows=None, batches: int = 50) -> dict:
  """Tokens/s the config's train iterator delivers (after its first batch, which starts it)."""
  prepare_seconds = 0.0
  if cfg.data.source != "synthetic" and not data_lib.is_prepared(cfg, workdir):
    start = time.perf_counter()
    data_lib.prepare(cfg, workdir)
    prepare_seconds = time.perf_counter() - start
  iterator = data_lib.make_iterator(cfg, workdir, "train", process_rows)
  try:
    first = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    seconds = time.perf_counter() - start
  finally:
    iterator.close()
  rows, window = first["tokens"].shape
  tokens = batches * rows * (window - 1)  # inputs per row: seq_len
  return {"loader_tokens_per_second": tokens / seconds, "loader_batches": batches,
          "prepare_seconds": prepare_seconds, "loader_source": cfg.data.source}


# --- the benchmark ----------------------------------------------------------------------------

def benchmark(cfg, steps: int = 20, warmup: int = 3, loader: bool = True,
              workdir: str | None = None, loader_batches: int = 50) -> dict:
  """Compile time, step time, tokens/s, MFU, memory (measured, XLA's, estimated), loader speed."""
  run = builder.build(cfg, builder.own_step_objective(cfg, workdir, "lmjax bench"))
  devices = list(run.mesh.devices.flatten())
  batch = synthetic_batch(run)
  compiled, compile_seconds = compile_train_step(run, batch)
  start = time.perf_counter()
  state = jax.block_until_ready(run.init())
  init_seconds = time.perf_counter() - start
  with run.context():
    state, warmup_seconds = time_steps(compiled, state, batch, max(warmup, 1))
    state, step_seconds = time_steps(compiled, state, batch, steps)
  del state

  step_time = statistics.median(step_seconds)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  tokens_per_second = tokens_per_step / step_time
  model_flops = flops_per_token(run.model.cfg, cfg.data.seq_len)
  peak = metrics_lib.peak_flops_total(devices)
  measured_bytes, measured_what = peak_memory(devices)
  result = {
      "model": {k: cfg.model[k] for k in ("style", "num_layers", "d_model", "num_heads",
                                           "mlp_dim", "vocab_size", "dtype", "remat",
                                           "scan_layers", "attention")},
      "num_params": run.num_params,
      "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size,
      "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "platform": devices[0].platform, "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "compile_seconds": compile_seconds, "init_seconds": init_seconds,
      "first_step_seconds": warmup_seconds[0],
      "steps": steps, "step_time_seconds": spread(step_seconds),
      "tokens_per_second": tokens_per_second,
      "flops_per_token": model_flops,
      "peak_flops": peak,
      "peak_flops_source": ("measured float32 matmul" if devices[0].platform == "cpu" else
                            "datasheet dense bf16 x devices"),
      "mfu": model_flops * tokens_per_second / peak,
      "peak_memory_bytes": measured_bytes, "peak_memory_source": measured_what,
      **xla_memory(compiled),
      "estimate": estimate_memory(cfg, len(devices), devices[0]),
  }
  if loader:
    with tempfile.TemporaryDirectory(prefix="lmjax_bench_") as tmp:
      result.update(measure_loader(cfg, workdir or tmp, run.process_rows, loader_batches))
    result["loader_over_training"] = result["loader_tokens_per_second"] / tokens_per_second
  return result


def format_table(r: dict) -> str:
  """The result as an aligned two-column table for the terminal."""
  m, e = r["model"], r["estimate"]
  steps = r["step_time_seconds"]
  rows = [
      ("model", f"{m['style']}, {m['num_layers']} layers, d_model {m['d_model']}, "
                f"{r['num_params'] / 1e6:.2f}M params, {m['dtype']}, remat {m['remat']}"),
      ("batch", f"{r['batch_size']} x {r['seq_len']} tokens, mesh {r['mesh']} on "
                f"{r['num_devices']} {r['platform']} device(s) ({r['device_kind']})"),
      ("compile (trace + XLA)", f"{r['compile_seconds']:.2f} s"),
      ("init (compile + run)", f"{r['init_seconds']:.2f} s"),
      ("step time", f"{steps['median'] * 1e3:.1f} ms median of {r['steps']} "
                    f"(min {steps['min'] * 1e3:.1f}, max {steps['max'] * 1e3:.1f})"),
      ("tokens/s", f"{r['tokens_per_second']:,.0f}"),
      ("MFU", f"{r['mfu']:.1%} ({r['flops_per_token'] / 1e6:.1f} MFLOP/token; peak "
              f"{r['peak_flops'] / 1e12:.2f} TFLOP/s, {r['peak_flops_source']})"),
      ("peak memory", f"{r['peak_memory_bytes'] / GiB:.2f} GiB ({r['peak_memory_source']})"),
  ]
  if "xla_temp_bytes" in r:
    rows.append(("XLA buffers / device", f"{r['xla_total_bytes'] / GiB:.3f} GiB "
                 f"({r['xla_argument_bytes'] / GiB:.3f} arguments, "
                 f"{r['xla_temp_bytes'] / GiB:.3f} temporaries)"))
  rows.append(("estimate / device", ", ".join(
      f"{k} {e[k] / GiB:.3f}" for k in ("params", "optimizer", "gradients", "activations",
                                         "workspace", "total")) + " GiB"))
  if "loader_tokens_per_second" in r:
    rows.append(("loader", f"{r['loader_tokens_per_second']:,.0f} tokens/s "
                           f"({r['loader_source']}) = {r['loader_over_training']:.1f}x training"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
