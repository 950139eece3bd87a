"""The training loop of `lmjax train` and `lmjax finetune`: everything stateful around the pure step
(the data iterator, the checkpoint manager, the metrics writer, the progress bar, signals).

  restore the latest checkpoint (data position included), or `run.init()`
  for each step: place the next batch while this one computes; check the previous step's numbers;
    log every train.log_every, evaluate every train.eval_every, checkpoint every
    train.checkpoint_every and when asked to stop (SIGTERM / Ctrl-C / any host's preemption notice,
    agreed without a device collective / stop_at_step)
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp

from lmjax import checkpoint as ckpt_lib
from lmjax import distributed
from lmjax import metrics as metrics_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import CheckpointError, TrainingError
from lmjax.evaluate import format_result
from lmjax.flops import flops_per_token

log = metrics_lib.log


class StopRequest:
  """SIGTERM / Ctrl-C: finish the current step, save, exit cleanly.

  With several processes SIGTERM is left to JAX's preemption notifier (installed by
  `jax.distributed.initialize`), which tells every host; `distributed.reached_preemption_sync_point`
  then stops them all at the same step. Ctrl-C there is turned into a SIGTERM of this process."""

  def __init__(self, multi_process: bool = False):
    self.requested = None
    self.multi_process = multi_process
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    if self._interrupted and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self._interrupted = True
    if self.multi_process:  # every host stops at the step the preemption sync agrees on
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = signal.Signals(signum).name

  _interrupted = False

  def check(self, step: int) -> None:
    """Once any host got SIGTERM, all of them stop after the same step."""
    if self.multi_process and distributed.reached_preemption_sync_point(step):
      self.requested = self.requested or "a preemption notice (SIGTERM) to one of the hosts"

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Progress:
  """What the loop reports: metrics.jsonl and TensorBoard (process 0), a tqdm bar or log lines,
  and the speed of the steps since the clock last restarted (compiling, evals and checkpoints
  are not timed)."""

  def __init__(self, run, workdir: str, start: int, progress: bool):
    cfg = run.cfg
    self.is_writer = jax.process_index() == 0
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_writer, cfg=cfg)
    self.profiler = metrics_lib.Profiler(cfg.train.profile_steps, workdir, self.is_writer)
    self.bar = None
    if progress and self.is_writer:
      from tqdm import tqdm
      self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                      dynamic_ncols=True)
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    self.flops_per_step = flops_per_token(run.model.cfg, cfg.data.seq_len) * self.tokens_per_step
    self.peak_flops = metrics_lib.peak_flops_total(run.mesh.devices.flatten())
    self.clock, self.steps = None, 0

  def say(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg)
    else:
      log(msg)

  def restart_clock(self) -> None:
    self.clock, self.steps = time.perf_counter(), 0

  def stepped(self, step: int, metrics) -> None:
    # the first step compiles, a profile's last step writes the trace: time from their end
    if self.profiler.stop(step, metrics) or self.clock is None:
      jax.block_until_ready(metrics)
      self.restart_clock()
    else:
      self.steps += 1

  def train_record(self, done: int, metrics, extra: dict | None = None) -> dict:
    """Writes (and shows) a step's metrics with the speed since the clock last restarted, and
    `extra` (a mixture's tokens per source)."""
    record = {k: float(v) for k, v in metrics.items()}
    record.update(extra or {})
    now = time.perf_counter()
    if self.steps:
      step_time = (now - self.clock) / self.steps
      record.update(step_time=step_time, tokens_per_second=self.tokens_per_step / step_time,
                    mfu=self.flops_per_step / step_time / self.peak_flops)
    self.writer.write(done, "train", **record)
    self.clock, self.steps = now, 0
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                           tok_s=f"{record.get('tokens_per_second', 0):.0f}")
    else:
      self.say(format_train(done, record))
    return record

  def close(self, failed: bool = False) -> None:
    self.profiler.stop()
    self.writer.close(failed)
    if self.bar is not None:
      self.bar.close()


# what the objectives report besides the loss (masked LM; classification and DPO; DPO; distill)
SHOWN = {"masked_accuracy": "masked accuracy", "accuracy": "accuracy", "margin": "reward margin",
         "ce": "cross-entropy", "kl": "KL"}


def format_train(step: int, record: dict) -> str:
  text = f"step {step}: loss {record['loss']:.4f}"
  text += "".join(f", {name} {record[k]:.3f}" for k, name in SHOWN.items() if k in record)
  text += f", lr {record['lr']:.2e}, grad norm {record['grad_norm']:.3f}"
  if "step_time" in record:
    text += (f", {record['tokens_per_second']:.0f} tokens/s, MFU {record['mfu']:.1%}, "
             f"{record['step_time'] * 1000:.0f} ms/step")
  return text


def restore_or_init(run, checkpoints, train_iter, workdir: str):
  """(state, start step): the newest checkpoint that is whole, with its data position, else
  `run.init()`. Damaged steps (their files do not match their checksums, or cannot be read) are
  moved aside and reported, and the next older one is used. A checkpoint of params alone (an
  import) starts the run from those params with a fresh optimizer state, at its step."""
  while True:
    start, moved = checkpoints.newest_good_step()
    for line in moved:
      log(line)
    if start is None:
      if moved:
        raise CheckpointError(f"No checkpoint in {checkpoints.directory} is whole (each was "
                              "moved aside, above). Rerun to train from scratch, or move a "
                              "step back from there.")
      return run.init(), 0
    try:
      return _restore(run, checkpoints, train_iter, workdir, start)
    except CheckpointError as e:
      if not e.damaged or jax.process_count() > 1:
        raise
      log(f"Checkpoint step {start} is damaged ({e}): moved to "
          f"{checkpoints.move_aside(start, str(e))}.")


def _restore(run, checkpoints, train_iter, workdir: str, start: int):
  if checkpoints.params_only(start):
    state = run.init_from(checkpoints.restore_params(start, run.abstract_state.params))
    state = state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32),
                                              run.state_shardings.step))
    log(f"Starting from the params at step {start} in {workdir} (the checkpoint has no "
        "optimizer state: it starts fresh).")
    return state, start
  state, data_state = checkpoints.restore(start, run.abstract_state)
  if data_state:
    train_iter.set_state(data_state)
  log(f"Resuming from step {start} in {workdir}.")
  return state, start


class Guard:
  """Stops a diverging run before anything after the divergence is saved: a loss or gradient
  norm that is not finite (an exploding gradient overflows, or makes the loss spike), a gradient
  norm of exactly 0 (the model collapsed), or, with train.spike_factor > 0, a loss over
  spike_factor times the mean of the last train.spike_window losses and at least 1 nat above it.
  (A large but finite gradient norm alone is not a divergence: fine-tuning a fresh head gives
  norms 30x their early mean; clipping bounds its update.) Each step is checked once, one step
  late (the host reads step N's metrics while N+1 computes), and always before a checkpoint of
  it is written."""

  def __init__(self, cfg, checkpoints):
    self.factor, self.window = cfg.train.spike_factor, cfg.train.spike_window
    self.checkpoints = checkpoints
    self.losses = collections.deque(maxlen=self.window)
    self.checked = -1

  def check(self, step: int, metrics) -> None:
    if step <= self.checked:
      return
    self.checked = step
    loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
    problem = None
    if not math.isfinite(loss) or not math.isfinite(norm):
      bad = [f"{name} became {value}" for name, value in (("the loss", loss),
             ("the gradient norm", norm)) if not math.isfinite(value)]
      problem = " and ".join(bad)
    elif norm == 0.0:
      problem = f"the gradient norm became 0 (loss {loss:.4g}): the model collapsed"
    elif self.factor > 0 and self.losses:
      mean_loss = sum(self.losses) / len(self.losses)
      if loss > max(self.factor * mean_loss, mean_loss + 1.0):
        problem = (f"the loss spiked to {loss:.4g}, {loss / mean_loss:.1f}x the mean of the last "
                   f"{len(self.losses)} steps ({mean_loss:.4g}; train.spike_factor="
                   f"{self.factor})")
    if problem is None:
      self.losses.append(loss)
      return
    # step N's loss is that of the params after N - 1 updates: a checkpoint of step N - 1 holds
    # the params that diverged, so it is moved aside (not deleted) and the rerun starts before it
    self.checkpoints.wait()
    moved = ""
    for bad in [s for s in self.checkpoints.all_steps() if s >= step - 1]:
      where = self.checkpoints.move_aside(bad, f"training diverged at step {step} ({problem}); "
                                          f"step {bad} holds the params that did")
      moved = f" The checkpoint of step {bad}, whose params gave it, was moved to {where}."
    last = self.checkpoints.latest_step()
    saved = (f"the last checkpoint, from before it, is step {last} in "
             f"{self.checkpoints.directory}: rerun (it resumes from there)" if last is not None
             else "no checkpoint from before it remains: rerun to start from scratch")
    raise TrainingError(
        f"Training diverged at step {step}: {problem}.{moved} Nothing after it was saved; "
        f"{saved} after lowering optim.learning_rate, raising optim.warmup_steps or setting "
        "optim.grad_clip. train.spike_factor=0 turns the spike check off.")


def log_start(run) -> None:
  c, devices = run.model.cfg, run.mesh.devices.flatten()
  tokens_per_step = run.cfg.train.batch_size * run.cfg.data.seq_len
  log(f"Model: {run.num_params / 1e6:.2f}M params ({c.style}, {c.num_layers} layers, d_model "
      f"{c.d_model}); mesh {dict(run.mesh.shape)} on {len(devices)} {devices[0].platform} "
      f"device(s); {tokens_per_step} tokens/step.")


def run_loop(run, workdir: str, train_step, train_iter, evaluate: Callable | None = None, *,
             progress: bool = True, stop_at_step: int | None = None,
             checkpoint_dir: str | None = None, format_eval: Callable | None = None) -> dict:
  """Trains `run` from its latest checkpoint in `checkpoint_dir` (default WORKDIR/checkpoints)
  up to train.steps on `train_iter`'s batches, writing metrics to `workdir`, calling
  `evaluate(params) -> dict` every train.eval_every steps and at the end. Returns the last train
  and val metrics, the final state and why it stopped early (None if it did not)."""
  cfg = run.cfg
  checkpoint_dir = checkpoint_dir or workdir_lib.checkpoint_dir(workdir)
  report = None
  try:
    # the checkpoints close (waiting for async saves) when the block ends, however it ends
    with ckpt_lib.open_checkpoints(checkpoint_dir, cfg.train.keep_checkpoints) as checkpoints:
      state, start = restore_or_init(run, checkpoints, train_iter, workdir)
      if jax.process_index() == 0:
        workdir_lib.write_config(cfg, workdir)
      log_start(run)
      report = Progress(run, workdir, start, progress)
      state, last = _steps(run, state, start, train_step, train_iter, evaluate, checkpoints,
                           report, stop_at_step, format_eval)
  except BaseException:
    with contextlib.suppress(Exception):  # (a full disk fails these too) the error in flight
      _close(report, train_iter, failed=True)  # is the one to report
    raise
  _close(report, train_iter)
  final_step = int(jax.device_get(state.step))
  if last["stopped_by"]:
    log(f"Stopped by {last['stopped_by']} at step {final_step}; checkpoint saved. Rerun the same "
        "command to resume.")
  elif start >= cfg.train.steps:
    log(f"{workdir} already finished {start} of {cfg.train.steps} steps; raise "
        "--config.train.steps to train further.")
  return {"step": final_step, **last, "sample": None, "state": state, "run": run}


def _close(report, train_iter, failed: bool = False) -> None:
  if report is not None:
    report.close(failed)
  if hasattr(train_iter, "close"):
    train_iter.close()


def _steps(run, state, start, train_step, train_iter, evaluate, checkpoints, report,
           stop_at_step, format_eval):
  """The step loop itself; returns (state, {train, val, stopped_by})."""
  t = run.cfg.train
  last = {"train": {}, "val": {}, "stopped_by": None}
  pending = None  # (step, metrics) of the previous step, checked one step late to keep async
  guard = Guard(run.cfg, checkpoints)

  def next_batch():  # (the batch placed on the devices, the data position after it)
    batch = run.put_batch(next(train_iter))
    return batch, train_iter.get_state()

  with StopRequest(jax.process_count() > 1) as stop:
    upcoming = next_batch() if start < t.steps else None
    for step in range(start, t.steps):
      (batch, data_state), upcoming = upcoming, None
      done = step + 1
      report.profiler.start(done)
      # the mesh for tracing; checkpoints save outside it (Orbax's copies)
      with run.context(), jax.profiler.StepTraceAnnotation("train", step_num=done):
        state, metrics = train_step(state, batch)
      if done < t.steps:  # the next batch loads and transfers while this step computes
        upcoming = next_batch()
      if pending is not None:
        guard.check(*pending)
      pending = (done, metrics)
      report.stepped(done, metrics)
      if done % t.log_every == 0 or done == t.steps:
        metrics = jax.device_get(metrics)
        guard.check(done, metrics)
        checkpoints.check_for_errors()  # a background save that failed, reported now
        counts = getattr(train_iter, "log_counts", None)
        last["train"] = report.train_record(done, metrics, counts and counts(data_state))
      if report.bar is not None:
        report.bar.update(1)
      if evaluate and (done % t.eval_every == 0 or done == t.steps):
        last["val"] = evaluate(state.params)
        report.writer.write(done, "val", **last["val"])
        report.say((format_eval or format_result)(done, last["val"]))
        report.restart_clock()
      if stop_at_step is not None and done >= stop_at_step and not stop.requested:
        stop.requested = f"stop_at_step={stop_at_step}"
      stop.check(done)  # every host saves at the same step (no device work: no wait)
      if done % t.checkpoint_every == 0 or done == t.steps or stop.requested:
        guard.check(*pending)
        checkpoints.save(done, state, data_state, force=True)  # position after `batch`
        report.restart_clock()
      if stop.requested:
        last["stopped_by"] = stop.requested
        break
    if pending is not None:
      guard.check(*pending)
  return state, last

