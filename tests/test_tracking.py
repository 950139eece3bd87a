"""Tracking: Weights & Biases (offline mode, read back from its run file) and profiler traces
(read back with XProf)."""
import glob
import json
import struct
import sys

import pytest

from conftest import tiny_config
from lmjax import config as config_lib
from lmjax import train as train_lib
from lmjax.errors import ConfigError
from lmjax.metrics import read_metrics


def wandb_records(path):
  """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf records)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, chunks = 7, 32768, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      pos += block - pos % block
      continue
    chunks += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last chunk of one
      yield wandb_internal_pb2.Record.FromString(chunks)
      chunks = b""


def wandb_run(path):
  """(run id, config, {step: {key: value}}) of a W&B run file."""
  run_id, config, history = None, {}, {}
  for r in wandb_records(path):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run_id = r.run.run_id
      config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    elif kind == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(items["_step"], {}).update(items)
  return run_id, config, history


def test_wandb_offline_gets_config_and_metrics_and_a_resume_continues_the_run(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = tiny_config("train.steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                    "train.wandb_project=lmjax-test")
  train_lib.train(cfg, str(tmp_path), progress=False, stop_at_step=3)
  train_lib.train(cfg, str(tmp_path), progress=False)
  runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(runs) == 2  # the first part and the resumed one
  (first_id, config, first), (second_id, _, second) = sorted(map(wandb_run, runs),
                                                             key=lambda run: min(run[2]))
  run_id = (tmp_path / "wandb_id").read_text()
  assert first_id == second_id == run_id  # the resume continues the same W&B run
  assert config["model"]["d_model"] == 32 and config["train"]["steps"] == 6
  assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
  history = {**first, **second}
  for record in read_metrics(tmp_path):  # every number metrics.jsonl has, at its step
    for key, value in record.items():
      if key not in ("step", "split"):
        assert history[record["step"]][f"{record['split']}/{key}"] == pytest.approx(value)
  assert "val/loss" in history[3] and "val/loss" in history[6]


def test_profile_steps_write_a_trace_that_xprof_reads(tmp_path, capsys):
  from xprof.convert import raw_to_tool_data
  train_lib.train(tiny_config("train.steps=6", "train.profile_steps=4:5"), str(tmp_path),
                  progress=False)
  assert "Wrote a profile of steps 4-5" in capsys.readouterr().out
  traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1
  data, _ = raw_to_tool_data.xspace_to_tool_data(traces, "trace_viewer", {})
  names = {e.get("name") for e in json.loads(data)["traceEvents"]}
  assert {"train 4", "train 5"} <= names  # the steps asked for, annotated, and only those
  assert not {"train 3", "train 6"} & names
  assert any("train_step" in str(n) for n in names)  # the jitted step's execution


@pytest.mark.parametrize("spec", ["5", "3:2", "0:2", "a:b"])
def test_bad_profile_steps_are_refused(spec):
  with pytest.raises(ConfigError, match="train.profile_steps must be START:END"):
    tiny_config(f"train.profile_steps={spec}")


def test_wandb_project_without_wandb_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
  cfg = tiny_config("train.wandb_project=p")  # a run's config still reads (eval, generate)
  with pytest.raises(ConfigError, match=r"pip install 'lmjax\[wandb\]'"):
    config_lib.check_tracking_installed(cfg.train)  # a loop refuses to start
