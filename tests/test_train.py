import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, latest_step, tiny_config
from lmjax import builder
from lmjax import train as train_lib
from lmjax.errors import ConfigError, TrainingError
from lmjax.metrics import read_metrics


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


def test_loss_falls_and_metrics_are_written(tmp_path):
  cfg = tiny_config("train.steps=30", "train.log_every=5", "train.eval_every=15")
  result = train_lib.train(cfg, str(tmp_path), progress=False)
  records = read_metrics(tmp_path)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in val] == [15, 30]
  for key in ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "step_time"):
    assert key in train[-1]
  assert train[-1]["loss"] < train[0]["loss"] - 0.5  # the synthetic sequences are learnable
  assert val[-1]["loss"] < 3.5 < np.log(64)
  assert result["step"] == 30
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["train"]["steps"] == 30 and saved["model"]["d_model"] == 32


def read_tensorboard_scalars(path):
  """Minimal TFRecord reader (no TensorFlow): tag -> [(step, value)]."""
  from tensorboardX.proto import event_pb2
  out = {}
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tensorboard_events(tmp_path):
  train_lib.train(tiny_config("train.steps=4", "train.log_every=2"), str(tmp_path), progress=False)
  (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  scalars = read_tensorboard_scalars(events)
  assert [s for s, _ in scalars["train/loss"]] == [2, 4]
  assert "val/loss" in scalars and "train/tokens_per_second" in scalars


def test_resume_matches_uninterrupted_run(tmp_path):
  straight = tiny_config("train.steps=8", "train.checkpoint_every=4")
  train_lib.train(straight, str(tmp_path / "a"), progress=False)
  first = train_lib.train(straight, str(tmp_path / "b"), progress=False, stop_at_step=3)
  assert first["step"] == 3  # not a multiple of checkpoint_every: the stop itself saves
  resumed = train_lib.train(straight, str(tmp_path / "b"), progress=False)
  assert resumed["step"] == 8
  a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in a:  # identical, not merely close: same batches, same RNG, same optimizer state
    assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), step


def test_other_model_in_workdir_is_refused(tmp_path):
  train_lib.train(tiny_config("train.steps=2"), str(tmp_path), progress=False)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ConfigError, match="model.d_model: 32 there, 64 now"):
    train_lib.train(tiny_config("train.steps=4", "model.d_model=64"), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == before
  assert latest_step(tmp_path) == 2


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  # warmup starts at lr 0, so step 1 is sound and the huge peak blows up a step or two later
  cfg = tiny_config("train.steps=40", "train.checkpoint_every=1", "optim.learning_rate=1e12",
                    "optim.grad_clip=0.0", "optim.warmup_steps=10")
  with pytest.raises(TrainingError, match="diverged") as info:
    train_lib.train(cfg, str(tmp_path), progress=False)
  kept = latest_step(tmp_path)
  assert kept is not None and kept < 40
  assert f"the last checkpoint, from before it, is step {kept}" in str(info.value)
  # the kept checkpoint restores to finite params
  _, _, params, _ = builder.load_params(str(tmp_path))
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_half_written_checkpoint_is_ignored(tmp_path):
  cfg = tiny_config("train.steps=4", "train.checkpoint_every=4")
  train_lib.train(cfg, str(tmp_path), progress=False)
  ckpt_dir = tmp_path / "checkpoints"
  # what a process killed mid-save leaves behind: a temporary directory orbax never renamed
  partial = ckpt_dir / "8.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  assert latest_step(tmp_path) == 4
  result = train_lib.train(tiny_config("train.steps=6", "train.checkpoint_every=4"), str(tmp_path),
                           progress=False)
  assert result["step"] == 6


def test_sigterm_saves_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "lmjax", "train", "--config=configs/quickstart.py",
          f"--workdir={workdir}", "--no_progress", "--config.data.source=synthetic",
          "--config.train.steps=100000",
          "--config.train.checkpoint_every=100000", "--config.train.log_every=1",
          "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.model.mlp_dim=64", "--config.model.vocab_size=64", "--config.data.seq_len=16",
          "--config.train.batch_size=4"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline:  # wait until it is really training
    if any(r["step"] >= 3 for r in read_metrics(workdir)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "Stopped by SIGTERM" in out
  saved = latest_step(workdir)
  assert saved >= 3
  last_logged = max(r["step"] for r in read_metrics(workdir))
  assert saved == last_logged
  # the same command resumes from there
  args[args.index("--config.train.steps=100000")] = f"--config.train.steps={saved + 2}"
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert f"Resuming from step {saved}" in proc.stdout
  steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
  assert steps[-2:] == [saved + 1, saved + 2]


def test_resume_on_text_data_sees_the_same_batches(tmp_path):
  from test_data import write_txt_corpus
  write_txt_corpus(tmp_path / "corpus", num_docs=60)
  text = (f"data.source=text:{tmp_path}/corpus/*.txt", "model.vocab_size=512",
          "data.vocab_size=400", "data.val_fraction=0.1", "train.steps=6",
          "train.checkpoint_every=100", f"data.prepared_dir={tmp_path}/data")
  train_lib.train(tiny_config(*text), str(tmp_path / "a"), progress=False)
  train_lib.train(tiny_config(*text), str(tmp_path / "b"), progress=False, stop_at_step=4)
  train_lib.train(tiny_config(*text), str(tmp_path / "b"), progress=False)
  a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-6)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A tiny run of 2 steps with its checkpoint at step 2 (copy it before changing it)."""
  workdir = tmp_path_factory.mktemp("two_steps")
  train_lib.train(tiny_config("train.steps=2", "train.checkpoint_every=2"), str(workdir),
                  progress=False)
  return workdir


def test_resume_check_covers_the_objective_and_causal(two_steps, tmp_path):
  """Resuming a causal LM as a masked LM (or under another fine-tuning) would train another run
  on top of the first: refused, with nothing written."""
  import shutil
  workdir = shutil.copytree(two_steps, tmp_path / "run")
  before = sorted(os.listdir(workdir))
  with pytest.raises(ConfigError, match="(?s)model.causal: True there, False now.*"
                     "train.objective: 'causal_lm' there, 'masked_lm' now"):
    train_lib.train(tiny_config("train.steps=4", "model.causal=false",
                                "train.objective=masked_lm"), str(workdir))
  with pytest.raises(ConfigError, match="finetune.init: '' there, '/elsewhere' now"):
    train_lib.train(tiny_config("train.steps=4", "finetune.init=/elsewhere"), str(workdir))
  assert sorted(os.listdir(workdir)) == before and latest_step(workdir) == 2
  # what only says how the model runs may change: dtype, dropout, remat, attention
  result = train_lib.train(tiny_config("train.steps=3", "model.remat=full", "model.dropout=0.1"),
                           str(workdir), progress=False)
  assert result["step"] == 3


def test_checkpoint_errors_say_what_is_wrong(two_steps, tmp_path):
  """A checkpoint of another shape names the params that differ; one whose files are damaged says
  it cannot be read (not that it is another model); both are CheckpointErrors, one message."""
  import shutil

  from conftest import build
  from lmjax import checkpoint as ckpt_lib
  from lmjax import workdir as workdir_lib
  from lmjax.errors import CheckpointError
  workdir = shutil.copytree(two_steps, tmp_path / "run")
  directory = workdir_lib.checkpoint_dir(str(workdir))
  wider = build(tiny_config("model.mlp_dim=128"))
  with ckpt_lib.open_checkpoints(directory, read_only=True) as checkpoints:
    with pytest.raises(CheckpointError, match=r"(?s)holds another model.*"
                       r"params/layer_0/mlp/up/kernel: \(32, 64\) in the checkpoint, \(32, 128\)"):
      checkpoints.restore(2, wider.abstract_state)
    with pytest.raises(CheckpointError, match="No checkpoint for step 7 .* available: \\[2\\]"):
      checkpoints.restore_params(7, wider.abstract_state.params)
  # damage every data file of the step: unreadable, and said so
  run = build(tiny_config())
  for path in glob.glob(os.path.join(directory, "2", "state", "**", "*"), recursive=True):
    if os.path.isfile(path) and "ocdbt.process" in path:
      with open(path, "r+b") as f:
        f.truncate(8)
  with ckpt_lib.open_checkpoints(directory, read_only=True) as checkpoints:
    with pytest.raises(CheckpointError, match="step 2 .* cannot be read .* damaged or incomplete"):
      checkpoints.restore(2, run.abstract_state)


def test_commands_that_read_a_model_restore_only_its_params(two_steps, monkeypatch):
  from lmjax import checkpoint as ckpt_lib
  from lmjax import evaluate as evaluate_lib

  def no_full_restore(*args, **kwargs):
    raise AssertionError("the optimizer state was read")
  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", no_full_restore)
  step, result = evaluate_lib.evaluate_checkpoint(str(two_steps))
  assert step == 2 and np.isfinite(result["loss"])
  _, _, params, _ = builder.load_params(str(two_steps))
  assert set(params) >= {"embed", "layer_0", "final_norm"}


def test_metrics_in_a_bucket_go_to_parts_each_write_bounded(tmp_path, monkeypatch):
  """Where files cannot be appended to (gs://), a write rewrites only the current part."""
  from etils import epath

  from lmjax import metrics as metrics_lib
  written = []
  real_write = epath.Path.write_text
  monkeypatch.setattr(epath.Path, "write_text",
                      lambda self, text, **kw: written.append(len(text)) or real_write(self, text,
                                                                                          **kw))
  for run in range(2):  # a resumed run starts a new part, never rewrites the old ones
    writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, appendable=False)
    for step in range(250):
      writer.write(run * 1000 + step, "train", loss=float(step))
    writer.close()
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [r * 1000 + s for r in range(2) for s in range(250)]
  assert len(metrics_lib.metric_parts(metrics_lib.workdir_lib.metrics_path(str(tmp_path)))) == 6
  longest = max(len(json.dumps(r)) + 1 for r in records)
  assert max(written) <= metrics_lib.MetricsWriter.PART_LINES * longest  # a part, not the run
  assert sum(written) < 60 * sum(len(json.dumps(r)) + 1 for r in records)
