"""What a run reports: metrics.jsonl, TensorBoard events, Weights & Biases, profiler traces, and
the FLOP/s peaks behind MFU."""
from __future__ import annotations

import json
import math
import time
import uuid

import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError

# Dense bf16 peak FLOP/s per chip (vendor datasheets; no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}

_cpu_peak_cache: dict = {}


def measured_cpu_peak(n: int = 1024, min_repeats: int = 5, min_seconds: float = 0.25) -> float:
  """CPU has no datasheet peak: use the best float32 matmul rate of this machine (all cores).

  The best of at least `min_repeats` matmuls and `min_seconds` of them, so that a moment of
  contention on a shared machine does not lower the peak (and inflate every MFU after it).
  """
  if "peak" not in _cpu_peak_cache:
    import jax.numpy as jnp
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best, repeats, until = math.inf, 0, time.perf_counter() + min_seconds
    while repeats < min_repeats or time.perf_counter() < until:
      t = time.perf_counter()
      f(x).block_until_ready()
      best = min(best, time.perf_counter() - t)
      repeats += 1
    _cpu_peak_cache["peak"] = 2 * n**3 / best
  return _cpu_peak_cache["peak"]


def peak_flops_per_device(device) -> float:
  kind = getattr(device, "device_kind", "") or ""
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest match first: "TPU v5 lite"
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  if device.platform == "cpu":
    return measured_cpu_peak()
  return float("nan")  # unknown accelerator: MFU is reported as NaN rather than guessed


def peak_flops_total(devices) -> float:
  """The mesh's peak FLOP/s; a CPU's measured peak already covers all its cores."""
  peak = peak_flops_per_device(devices[0])
  return peak if devices[0].platform == "cpu" else peak * len(devices)


class MetricsWriter:
  """Appends one JSON object a line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

  Only the writing process (process 0) writes; the others get a writer that does nothing. A
  bucket (gs://...) cannot append, so there the lines go to parts, metrics.jsonl, metrics.jsonl.1,
  ..., of at most PART_LINES lines: a write rewrites only the current part (each line is durable
  at once, and the cost of a write stays bounded instead of growing with the run).
  """
  PART_LINES = 100

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               appendable: bool | None = None, cfg=None):
    """With `cfg` whose train.wandb_project is set, the records also go to W&B."""
    self.enabled = enabled
    self.path = workdir_lib.metrics_path(workdir)
    self._append = "://" not in str(workdir) if appendable is None else appendable
    self._part, self._lines = None, []
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=str(workdir), flush_secs=10)
    self._wandb = None
    if enabled and cfg is not None and cfg.train.wandb_project:
      self._wandb = wandb_run(cfg, workdir)

  def write(self, step: int, split: str, **scalars) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _plain(v) for k, v in scalars.items()})
    line = json.dumps(record) + "\n"
    if self._append:
      with self.path.open("a") as f:
        f.write(line)
    else:
      if self._part is None or len(self._lines) >= self.PART_LINES:  # a new part
        self._part, self._lines = metric_parts(self.path, new=True)[-1], []
      self._lines.append(line)
      self._part.write_text("".join(self._lines))
    numbers = {f"{split}/{k}": v for k, v in record.items()
               if k not in ("step", "split") and isinstance(v, (int, float))}
    if self._tb is not None:
      for tag, v in numbers.items():
        self._tb.add_scalar(tag, v, int(step))
    if self._wandb is not None:
      self._wandb.log(numbers, step=int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self, failed: bool = False) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish(exit_code=1 if failed else 0)  # a failed run shows as failed in W&B
      self._wandb = None


def wandb_run(cfg, workdir: str):
  """The W&B run of a workdir (train.wandb_project), with the whole config. Its id is kept in
  WORKDIR/wandb_id, so a resumed run continues the same W&B run; WANDB_MODE=offline keeps it on
  disk (in WORKDIR/wandb, or WANDB_DIR for a workdir in a bucket) for `wandb sync`."""
  import wandb
  id_path = workdir_lib.join(workdir, workdir_lib.WANDB_ID)
  run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:12]
  id_path.write_text(run_id)
  local = not workdir_lib.is_remote(workdir)
  try:
    return wandb.init(project=cfg.train.wandb_project, entity=cfg.train.wandb_entity or None,
                      name=workdir_lib.join(workdir).name, id=run_id, resume="allow",
                      config=cfg.to_dict(), dir=str(workdir) if local else None)
  except Exception as e:  # no login, no network: say how to go on
    raise ConfigError(f"W&B could not start a run in project {cfg.train.wandb_project} ({e}). "
                      "Log in with `wandb login`, set WANDB_MODE=offline to keep the run on disk "
                      "for `wandb sync`, or set train.wandb_project='' to train without W&B."
                      ) from e


class Profiler:
  """train.profile_steps="START:END": process 0 writes a JAX profiler trace of those steps
  (numbered as in the logs, both included) to WORKDIR/plugins/profile/TIME/, where TensorBoard's
  profile plugin and XProf (`xprof --logdir WORKDIR`) find it. Each step is annotated as
  "train N" (XProf's step view)."""

  def __init__(self, spec: str, workdir: str, enabled: bool):
    self.range = config_lib.profile_range(spec) if enabled else None
    self.workdir, self.active = str(workdir), False

  def start(self, step: int) -> None:
    """Before step `step` runs: starts the trace at the first step in the range."""
    if self.range and not self.active and self.range[0] <= step <= self.range[1]:
      jax.profiler.start_trace(self.workdir)
      self.active, self.first, self.last = True, step, step

  def stop(self, step: int | None = None, outputs=None) -> bool:
    """After step `step` was dispatched: at the range's end, waits for its `outputs` and writes
    the trace (True); with no step (the loop ended early), writes what it has."""
    if not self.active:
      return False
    if step is not None:
      self.last = step
      if step < self.range[1]:
        return False
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active, self.range = False, None
    log(f"Wrote a profile of steps {self.first}-{self.last} to {self.workdir}/plugins/profile "
        f"(view it with `xprof --logdir {self.workdir}` or in TensorBoard's profile tab).")
    return True


def metric_parts(path, new: bool = False) -> list:
  """metrics.jsonl and its parts metrics.jsonl.1, .2, ... that exist, in order; with `new`, the
  name of the next part after them."""
  parts, k = [], 0
  while (part := path if k == 0 else path.with_name(f"{path.name}.{k}")).exists():
    parts.append(part)
    k += 1
  return parts + [part] if new else parts


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item()
  if hasattr(v, "item") and getattr(v, "size", 2) == 1:
    v = v.item()
  return v


def read_metrics(workdir: str) -> list[dict]:
  """Every record of a run's metrics.jsonl (and its parts, in a bucket), in order."""
  return [record for part in metric_parts(workdir_lib.metrics_path(str(workdir)))
          for record in workdir_lib.read_json(part, "the run's metrics", lines=True)]


def log(msg: str) -> None:
  """A progress line, printed by process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)
