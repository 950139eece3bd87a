"""The newcomer's path through the CLI on a small text corpus: prepare, train, eval, generate."""
import json

import pytest

from conftest import run_cli
from lmjax.metrics import read_metrics
from test_data import write_txt_corpus

TINY_TEXT = ["--config=configs/quickstart.py", "--config.model.num_layers=2",
             "--config.model.d_model=64", "--config.model.num_heads=4", "--config.model.mlp_dim=128",
             "--config.model.vocab_size=512", "--config.data.vocab_size=400",
             "--config.model.max_len=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
             "--config.data.val_fraction=0.1", "--config.train.steps=40",
             "--config.train.log_every=10", "--config.train.eval_every=20",
             "--config.train.eval_batches=2", "--config.train.checkpoint_every=20",
             "--config.optim.warmup_steps=5", "--no_progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  write_txt_corpus(root / "corpus", num_docs=80)
  workdir = root / "run"
  proc = run_cli("train", *TINY_TEXT, f"--config.data.source=text:{root}/corpus/*.txt",
                 "--config.train.sample_prompt=def ", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_train_prepares_trains_evaluates_and_samples(trained):
  workdir, proc = trained
  index = json.loads((workdir / "data" / "index.json").read_text())
  assert index["splits"]["val"]["tokens"] > 0 and index["vocab_size"] == 400
  val = [r for r in read_metrics(workdir) if r["split"] == "val"]
  assert [r["step"] for r in val] == [20, 40]
  assert val[-1]["bits_per_byte"] > 0 and val[-1]["loss"] < val[0]["loss"] + 0.1
  assert "step 40: val loss" in proc.stdout and "bits/byte" in proc.stdout
  assert "Sample" in proc.stdout and "def " in proc.stdout.split("Sample", 1)[1]


def test_eval_command_reports_and_appends(trained):
  workdir, _ = trained
  before = len(read_metrics(workdir))
  proc = run_cli("eval", f"--workdir={workdir}", "--step=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 20 and result["split"] == "val"
  assert set(result) >= {"loss", "perplexity", "bits_per_byte"}
  records = read_metrics(workdir)
  assert len(records) == before + 1 and records[-1]["loss"] == pytest.approx(result["loss"])
  # training's periodic eval at step 20 used the same code on the same batches
  logged = [r for r in records[:before] if r["split"] == "val" and r["step"] == 20][0]
  assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(logged["bits_per_byte"], rel=1e-5)


def test_bits_per_byte_divide_by_the_bytes_of_the_scored_tokens(trained):
  """One val batch: its summed loss over the UTF-8 bytes of exactly its target tokens."""
  import math

  from lmjax import data
  from lmjax import workdir as workdir_lib
  from lmjax.evaluate import evaluate_checkpoint
  workdir, _ = trained
  step, result = evaluate_checkpoint(str(workdir), num_batches=1)
  cfg = workdir_lib.load_config(str(workdir))
  iterator = data.make_iterator(cfg, str(workdir), "val")
  targets = next(iterator)["tokens"][:, 1:]
  iterator.close()
  table = data.token_bytes(data.load_tokenizer(workdir_lib.tokenizer_path(cfg, str(workdir))))
  assert result["tokens"] == targets.size
  assert result["bits_per_byte"] == pytest.approx(
      result["loss"] * targets.size / math.log(2) / table[targets].sum(), rel=1e-6)


def test_generate_command(trained):
  workdir, _ = trained
  proc = run_cli("generate", f"--workdir={workdir}", "--prompt=def ", "--prompt=    if x",
                 "--max_new_tokens=12")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "=== 'def '" in proc.stdout and "=== '    if x'" in proc.stdout
  again = run_cli("generate", f"--workdir={workdir}", "--prompt=def ", "--prompt=    if x",
                  "--max_new_tokens=12")
  assert again.stdout == proc.stdout  # greedy is deterministic
  sampled = run_cli("generate", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=12",
                    "--temperature=1.0", "--top_k=20", "--top_p=0.9", "--seed=3")
  assert sampled.returncode == 0, sampled.stderr[-3000:]


def test_clear_errors(tmp_path, trained):
  proc = run_cli("train", *TINY_TEXT, f"--config.data.source=text:{tmp_path}/nothing/*.txt",
                 f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nothing" in proc.stderr
  proc = run_cli("eval", f"--workdir={tmp_path / 'missing'}")
  assert proc.returncode == 2 and "config.json is missing" in proc.stderr
  workdir, _ = trained
  proc = run_cli("generate", f"--workdir={workdir}", "--prompt=x", "--max_new_tokens=1000")
  assert proc.returncode == 2 and "max_len" in proc.stderr


def test_user_errors_are_one_line_and_bugs_show_their_traceback(tmp_path):
  """An LmjaxError (config, data, checkpoint, conversion) is one message and exit status 2;
  anything else is not folded into a message: it shows its traceback."""
  import subprocess
  import sys

  from conftest import ROOT
  proc = run_cli("eval", f"--workdir={tmp_path}", "--step=3")  # no run there: a config error
  assert proc.returncode == 2 and proc.stderr.startswith("lmjax: error: No run in")
  bug = ("import sys; from lmjax import commands, train\n"
         "def broken(*a, **k): raise ZeroDivisionError('a bug')\n"
         "train.train = broken\n"
         "commands.main(['train', '--config=configs/quickstart.py', "
         f"'--workdir={tmp_path / 'run'}', '--config.data.source=synthetic'])\n")
  proc = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in \
      proc.stderr and "lmjax: error" not in proc.stderr


def test_bad_files_and_flags_are_one_line_errors(tmp_path):
  """An unknown variant, a damaged config.json, a malformed device list and a bad flag: each an
  error of its own type, printed as one line before any work."""
  cases = [
      (("config", "--config=configs/gpt2.py:bogus"), "Unknown gpt2 variant"),
      (("config", "--config.distributed.local_device_ids=0,a"), "local_device_ids"),
      (("bench", "--config=configs/quickstart.py", "--steps=0"), "--steps: must be at least 1"),
  ]
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "config.json").write_text('{"model": {"d_model": 32,')
  cases.append((("eval", f"--workdir={damaged}"), "is not valid JSON"))
  for args, message in cases:
    proc = run_cli(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and message in proc.stderr, (args, proc.stderr)
