"""Running a sweep: every unfinished point, one after another, each a `lmjax train` run; a
resumed point goes on from its checkpoint, a finished one is skipped."""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from etils import epath

from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import lock
from lmjax import metrics as metrics_lib
from lmjax import train as train_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError
from lmjax.metrics import log
from lmjax.sweep.plan import Point, make_plan
from lmjax.sweep.state import check_point_config, read_result, status, write_results


def _format_count(x: float) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= size:
      return f"{x / size:.3g}{unit}"
  return f"{x:.3g}"


def format_duration(seconds: float) -> str:
  seconds = round(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def format_plan(points: list[Point], left_out: list[str], statuses: dict) -> str:
  lines = [(f"{'point':<22}{'N (non-emb.)':>13}{'N (all)':>9}{'D (tokens)':>11}"
            f"{'C (FLOPs)':>11}{'steps':>8}{'D/N':>7}  status")]
  for p in points:
    lines.append(f"{p.name:<22}{_format_count(p.params_nonembedding):>13}"
                 f"{_format_count(p.params):>9}{_format_count(p.tokens):>11}{p.flops:>11.3g}"
                 f"{p.steps:>8}{p.tokens / p.params_nonembedding:>7.3g}  {statuses[p.name]}")
  total = sum(p.flops for p in points)
  lines.append(f"{len(points)} points, {total:.3g} training FLOPs in all.")
  if left_out:
    lines.append("Left out: " + "; ".join(left_out))
  return "\n".join(lines)


class Eta:
  """Time left: each point costs a fixed overhead (compiling, evaluating, checkpointing: the median
  over finished points) plus its FLOPs at the measured training rate (the runs' step times)."""

  def __init__(self):
    self.samples: list[tuple[float, float, float]] = []  # (FLOPs, training s, overhead s)

  def add(self, flops: float, seconds: float, train_seconds: float | None) -> None:
    if train_seconds is None or not 0 < train_seconds <= seconds:
      train_seconds = seconds
    self.samples.append((flops, train_seconds, seconds - train_seconds))

  def seconds_for(self, flops_list) -> float | None:
    if not self.samples:
      return None
    c, t, overhead = np.array(self.samples).T
    return float(sum(np.median(overhead) + f * t.sum() / c.sum() for f in flops_list))


def _train_seconds(point: Point) -> float | None:
  """Time spent in train steps (compiling and evaluating excluded), from the run's step times."""
  times = [r["step_time"] for r in metrics_lib.read_metrics(point.workdir)
           if r.get("split") == "train" and "step_time" in r]
  return float(np.median(times)) * point.steps if times else None


def _final_val(point: Point, result: dict) -> dict:
  """The final validation numbers: from this invocation, else from the run's metrics.jsonl (a
  sweep killed after the point's last step), else evaluated from its last checkpoint."""
  if result.get("val"):
    return result["val"]
  vals = [r for r in metrics_lib.read_metrics(point.workdir)
          if r.get("split") == "val" and r["step"] == point.steps]
  if vals:
    return vals[-1]
  return evaluate_lib.evaluate_checkpoint(point.workdir)[1]


def _epochs(point: Point) -> float | None:
  if point.cfg.data.source == "synthetic":
    return None
  train_tokens = data_lib.read_index(point.cfg, point.workdir)["splits"]["train"]["tokens"]
  return point.tokens / train_tokens


def _start(s, spec: str, workdir: str, overrides, only: str | None):
  """The plan, checked against the sweep directory, written (sweep.json) and shown; the shared
  data prepared. Returns (points, their statuses)."""
  points, left_out = make_plan(s, workdir)
  if only is not None and only not in [p.name for p in points]:
    raise ConfigError(f"No point '{only}' in this sweep; its points are: "
                      f"{', '.join(p.name for p in points)}.")
  for p in points:
    check_point_config(p)
  statuses = {p.name: status(p) for p in points}
  lock.check_kind(workdir, "sweep")  # each point's run locks its own directory
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    workdir_lib.sweep_plan_path(workdir).write_text(json.dumps(
        {"config": spec, "overrides": list(overrides),
         "points": [p.summary() for p in points], "left_out": left_out}, indent=1))
  log(format_plan(points, left_out, statuses))
  if any(statuses[p.name] != "done" for p in points) and not data_ready(points[0].cfg):
    log(f"Preparing the data every point reads ({points[0].cfg.data.prepared_dir}).")
    prepare_data(s, workdir, points[0].cfg)
  return points, statuses


def _train_point(p: Point, resuming: bool, progress: bool) -> dict | None:
  """Trains one point; its result record (written to its result.json), or None if stopped."""
  start = time.perf_counter()
  result = train_lib.train(p.cfg, p.workdir, progress=progress)
  seconds = time.perf_counter() - start
  # the point's params and optimizer state leave the devices now, before the next point starts
  for x in jax.tree_util.tree_leaves(result.pop("state")):
    x.delete()
  if result["stopped_by"]:
    log(f"Sweep stopped during {p.name} ({result['stopped_by']}); its checkpoint is saved. "
        "Rerun the same command to resume.")
    return None
  val = _final_val(p, result)
  record = {**p.summary(), "val_loss": val["loss"],
            "bits_per_byte": val.get("bits_per_byte"), "val_perplexity": val.get("perplexity"),
            "train_loss": result["train"].get("loss"), "epochs": _epochs(p),
            "seconds": seconds, "train_seconds": _train_seconds(p), "resumed": resuming}
  if jax.process_index() == 0:
    workdir_lib.result_path(p.workdir).write_text(json.dumps(record, indent=1))
  return record


def run(s, spec: str, workdir: str, overrides=(), progress: bool = True,
        only: str | None = None) -> dict:
  """Trains every unfinished point (or only the point named `only`), one after another.
  Returns {"results": [...], "stopped": bool, "points": [...]}."""
  points, statuses = _start(s, spec, workdir, overrides, only)
  eta = Eta()
  for p in points:
    r = read_result(p)
    if r and not r.get("resumed") and r.get("seconds"):
      eta.add(r["flops"], r["seconds"], r.get("train_seconds"))
  todo = [p for p in points if statuses[p.name] != "done" and (only is None or p.name == only)]
  done = sum(statuses[p.name] == "done" for p in points)
  stopped = False
  for i, p in enumerate(todo):
    left = eta.seconds_for([q.flops for q in todo[i:]])
    log(f"[sweep {done + 1}/{len(points)}] {p.name}: N {_format_count(p.params_nonembedding)} "
        f"non-embedding ({_format_count(p.params)} in all), D {_format_count(p.tokens)} tokens, "
        f"C {p.flops:.3g} FLOPs, {p.steps} steps" +
        (" (resuming)" if statuses[p.name] == "partial" else "") +
        (f"; about {format_duration(left)} left" if left is not None else ""))
    record = _train_point(p, statuses[p.name] == "partial", progress)
    if record is None:
      stopped = True
      break
    if jax.process_index() == 0:
      write_results(points, workdir)
    if not record["resumed"]:
      eta.add(p.flops, record["seconds"], record["train_seconds"])
    done += 1
    bpb, left = record["bits_per_byte"], eta.seconds_for([q.flops for q in todo[i + 1:]])
    log(f"[sweep {done}/{len(points)}] {p.name} done in {format_duration(record['seconds'])}: "
        f"val loss {record['val_loss']:.4f}" + (f", {bpb:.4f} bits/byte" if bpb is not None else "")
        + (f"; about {format_duration(left)} left" if left and i + 1 < len(todo) else ""))
  return _finish(points, workdir, stopped, only)


def _finish(points, workdir: str, stopped: bool, only: str | None) -> dict:
  is_writer = jax.process_index() == 0
  results = write_results(points, workdir) if is_writer else []
  if not stopped and only is None:
    missing = [p.name for p in points if read_result(p) is None] if is_writer else []
    log(f"Sweep finished: {len(results)} of {len(points)} points in "
        f"{workdir_lib.sweep_results_path(workdir)}" +
        (f" (missing: {', '.join(missing)})" if missing else "") +
        f". Fit the scaling law: lmjax fit --workdir={workdir}")
  return {"results": results, "stopped": stopped, "points": points}


def data_ready(cfg) -> bool:
  return cfg.data.source == "synthetic" or data_lib.is_prepared(cfg, "")


def prepare_data(s, workdir: str, cfg=None) -> None:
  """Tokenizer and token shards for every point (they share data.prepared_dir), made once."""
  cfg = cfg or make_plan(s, workdir)[0][0].cfg
  if cfg.data.source != "synthetic":
    data_lib.prepare_once(cfg, workdir)
  log(f"Data ready in {cfg.data.prepared_dir}.")
