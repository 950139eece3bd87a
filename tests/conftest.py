"""Shared helpers: tiny configs, and running code in a subprocess with N simulated CPU devices."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

# Tests run on the CPU, also where libtpu (the test extra's TPU compiler) or a GPU is installed;
# their subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.mlp_dim=64",
    "model.vocab_size=64", "model.max_len=32", "data.seq_len=16", "train.batch_size=8",
    "train.steps=8", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
    "train.checkpoint_every=4", "optim.warmup_steps=2", "optim.learning_rate=1e-2",
]


def tiny_config(*overrides, base=None):
  from lmjax import config as config_lib
  return config_lib.get_config(base, TINY + list(overrides))


def build(cfg, devices=None, workdir=None):
  """The pretraining run of `cfg` (its train.objective), as `lmjax train` builds it."""
  from lmjax import builder
  return builder.build(cfg, builder.pretraining_objective(cfg, workdir), devices=devices)


def latest_step(workdir):
  """The latest checkpoint step of a run directory (None if it has none)."""
  from lmjax import checkpoint, workdir as workdir_lib
  return checkpoint.latest_step(workdir_lib.checkpoint_dir(str(workdir)))


def run_python(code: str, devices: int = 1, timeout: int = 600) -> dict:
  """Runs `code` in a fresh interpreter with `devices` CPU devices; it must print one JSON line
  last, which is returned."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(*args, timeout: int = 600, env=None):
  return subprocess.run([sys.executable, "-m", "lmjax", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs:// served from a local directory (tests/fake_gcs.py), with this host's cache of bucket
  files in tmp_path/cache; returns the directory that holds the buckets."""
  import fake_gcs
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "cache"))
  fake_gcs.install(str(root))
  yield root
  fake_gcs.uninstall()
