"""Shared helpers: tiny configs, and running code in a subprocess with N simulated CPU devices."""
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

# Tests run on the CPU, also where libtpu (the test extra's TPU compiler) or a GPU is installed;
# their subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile the same small programs many times, here and in the processes they start:
# JAX's persistent compilation cache (keyed by the program, the devices, flags and versions, so a
# hit is the same executable) compiles each once. LMJAX_TEST_JAX_CACHE="" turns it off.
_CACHE = os.environ.setdefault("LMJAX_TEST_JAX_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_test_cache"))
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The longest tests (a minute or more on a 2-core machine: TPU compiles, several processes) go
# first, so that `pytest -n 2` does not end with one worker running a long test alone.
SLOW_FIRST = ("test_attention.py::test_splash_compiles",
              "test_multihost.py::test_fine_tuning", "test_multihost.py::test_every_mesh",
              "test_multihost.py::test_hosts", "test_multihost.py::test_two_processes",
              "test_multihost.py::test_sigterm", "test_sharding.py::test_meshes",
              "test_attention.py::test_the_model_with_splash", "test_attention.py::test_splash_shards",
              "test_reliability.py::test_kill_9", "test_mixture.py::test_two_processes",
              "test_compile.py::test_compile_reports")


def pytest_collection_modifyitems(items):
  rank = lambda item: next((i for i, name in enumerate(SLOW_FIRST) if name in item.nodeid),
                           len(SLOW_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order

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


# --- the small text run that fine-tuning and post-training start from ----------------------------
# A tiny GPT pretrained (60 steps) on lines of "ANIMAL KEY VALUE" where KEY i is followed by
# VALUE (i + 3) % 8 (test_finetune, test_posttrain, test_prune).

KEYS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
VALUES = ["red", "blue", "green", "black", "white", "pink", "gray", "gold"]
ANIMALS = ["cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "bear"]
GROUPS = {"fruit": KEYS, "color": VALUES, "animal": ANIMALS}
STEPS = 60
COMMON = ["train.batch_size=8", f"train.steps={STEPS}", "train.log_every=10",
          "train.eval_every=30", "train.checkpoint_every=30", "optim.warmup_steps=2",
          "optim.learning_rate=1e-2", "optim.weight_decay=0.0", "data.seq_len=32"]
LORA = ["finetune.lora_rank=8", "finetune.lora_alpha=16",
        "finetune.lora_targets=query,key,value,out,up,down"]


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


@pytest.fixture(scope="session")
def init_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  rng = random.Random(0)
  os.makedirs(root / "corpus")
  for d in range(20):
    with open(root / "corpus" / f"doc{d}.txt", "w") as f:
      for _ in range(60):
        ks = [rng.randrange(8) for _ in range(3)]
        f.write(" ".join(f"{rng.choice(ANIMALS)} {KEYS[k]} {VALUES[(k + 3) % 8]}"
                         for k in ks) + "\n")
  cfg = tiny_config(f"data.source=text:{root}/corpus/*.txt", "model.vocab_size=512",
                    "data.vocab_size=400", "data.val_fraction=0.1", "data.num_workers=1",
                    "train.steps=60", "train.eval_every=60", "train.checkpoint_every=60",
                    "train.log_every=20")
  from lmjax import train as train_lib
  train_lib.train(cfg, str(root / "init"), progress=False)
  sft = write_jsonl(root / "sft.jsonl", [
      {"prompt": f"{rng.choice(ANIMALS)} {KEYS[i % 8]}", "response": f" {VALUES[i % 8]}"}
      for i in range(96)])
  labels = list(GROUPS)
  cls = write_jsonl(root / "cls.jsonl", [
      {"text": " ".join(rng.choice(GROUPS[labels[i % 3]]) for _ in range(4)),
       "label": labels[i % 3]} for i in range(240)])
  return {"root": root, "init": str(root / "init"), "sft": sft, "cls": cls}
