"""Multi-host on one machine: two processes with 4 CPU devices each, gloo collectives."""
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from conftest import ROOT, latest_step
from lmjax.metrics import read_metrics

COMMON = ["--config=configs/quickstart.py", "--no_progress", "--config.data.source=synthetic",
          "--config.train.log_every=1", "--config.train.eval_batches=2",
          "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.vocab_size=128",
          "--config.data.seq_len=32", "--config.train.batch_size=16", "--config.optim.warmup_steps=2"]


def env_with(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def launch(command, args, logdir, processes=2, devices=4):
  """Starts `lmjax COMMAND` in `processes` processes that form one JAX cluster; their output goes
  to files (pipes could fill up and stall one process, and with it the collectives)."""
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(processes):
    log = open(os.path.join(logdir, f"{command}.{len(os.listdir(logdir))}.log"), "w+")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "lmjax", command, *args,
         f"--config.distributed.coordinator_address=localhost:{port}",
         f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env_with(devices), stdout=log, stderr=subprocess.STDOUT, text=True), log))
  return procs


def finish(procs, timeout=300):
  outs = []
  for proc, log in procs:
    proc.wait(timeout=timeout)
    log.seek(0)
    outs.append(log.read())
    assert proc.returncode == 0, outs[-1][-3000:]
  return outs


def single(command, args, devices=8):
  proc = subprocess.run([sys.executable, "-m", "lmjax", command, *args], cwd=ROOT,
                        env=env_with(devices), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def losses(workdir, split="train"):
  return [r["loss"] for r in read_metrics(workdir) if r["split"] == split]


def test_two_processes_equal_one_and_restore_in_one(tmp_path):
  args = COMMON + ["--config.train.steps=6", "--config.train.eval_every=6",
                   "--config.train.checkpoint_every=3"]
  finish(launch("train", args + [f"--workdir={tmp_path / 'two'}"], tmp_path))
  single("train", args + [f"--workdir={tmp_path / 'one'}"])
  two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert len(two) == 6 and two == pytest.approx(one, rel=1e-5, abs=1e-5)
  # only process 0 wrote metrics: one record per step
  assert [r["step"] for r in read_metrics(tmp_path / "two") if r["split"] == "train"] == list(
      range(1, 7))
  # the checkpoint written collectively by two processes restores in one process on one device
  out = single("eval", [f"--workdir={tmp_path / 'two'}", "--config.mesh.data=-1"], devices=1)
  assert f"val loss {losses(tmp_path / 'two', 'val')[-1]:.4f}" in out


def test_sigterm_on_one_host_stops_all_at_the_same_step(tmp_path):
  workdir = tmp_path / "run"
  args = COMMON + ["--config.train.steps=100000", "--config.train.checkpoint_every=100000",
                   "--config.train.eval_every=100000", f"--workdir={workdir}"]
  procs = launch("train", args, tmp_path)
  deadline = time.time() + 180
  while time.time() < deadline and not any(r["step"] >= 3 for r in read_metrics(workdir)):
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGTERM)  # a maintenance event on the second host only
  outs = finish(procs)
  saved = latest_step(workdir)
  assert saved >= 3 and saved == max(r["step"] for r in read_metrics(workdir))
  assert "Stopped by" in outs[0]
  # rerunning the same launch resumes
  args[args.index("--config.train.steps=100000")] = f"--config.train.steps={saved + 2}"
  outs = finish(launch("train", args, tmp_path))
  assert f"Resuming from step {saved}" in outs[0]
  steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
  assert steps[-2:] == [saved + 1, saved + 2]
