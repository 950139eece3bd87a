"""Weighted mixtures (data.mixture): the interleaving schedule, exact resume, per-source counts and
validation losses, the per-source shards' tokenizer check, errors, and two processes on a mesh
whose axis spans them equal to one."""
import json

import numpy as np
import pytest

from conftest import tiny_config
from lmjax import data as data_lib
from lmjax import train as train_lib
from lmjax.data import loader, mixture
from lmjax.errors import ConfigError
from lmjax.metrics import read_metrics
from test_data import python_like_doc, write_txt_corpus


def write_sources(root):
  """Two corpora of different text: .txt files, and a Parquet file of upper-cased documents."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  write_txt_corpus(root / "txt", num_docs=40)
  pq.write_table(pa.table({"text": [python_like_doc(100 + i).upper() for i in range(40)]}),
                 str(root / "upper.parquet"))
  return f"low:3:text:{root}/txt/*.txt,up:1:parquet:{root}/*.parquet"


def mixture_config(spec, *overrides):
  return tiny_config(f"data.mixture={spec}", "data.vocab_size=400", "model.vocab_size=512",
                     "data.val_fraction=0.2", "data.num_workers=1", *overrides)


def test_the_schedule_keeps_the_weights_in_every_block():
  schedule = mixture.Schedule([0.5, 0.3, 0.2], seed=0, block=100)
  assert schedule.counts.tolist() == [50, 30, 20]
  sources, local = schedule.lookup(np.arange(1000))
  for s, count in enumerate((50, 30, 20)):
    # each block has the source's exact share, and its rows are taken in order, none skipped
    assert (sources.reshape(10, 100) == s).sum(1).tolist() == [count] * 10
    assert local[sources == s].tolist() == list(range(10 * count))
  for n in (0, 1, 99, 100, 257, 1000):
    assert schedule.rows_per_source(n).tolist() == np.bincount(sources[:n], minlength=3).tolist()
  again = mixture.Schedule([0.5, 0.3, 0.2], seed=0, block=100).lookup(np.arange(500, 700))
  assert [x.tolist() for x in again] == [sources[500:700].tolist(), local[500:700].tolist()]
  assert mixture.Schedule([0.5, 0.3, 0.2], seed=1, block=100).lookup(
      np.arange(100))[0].tolist() != sources[:100].tolist()
  # rounding: shares sum to the block, every source keeps a row
  assert mixture.counts_per_block([0.999, 0.001], 100).tolist() == [99, 1]
  assert mixture.counts_per_block([1 / 3] * 3, 100).sum() == 100


def test_config_errors():
  for spec, match in (("web:0.5", "not NAME:WEIGHT:SOURCE"),
                      ("a:1:pystdlib,a:1:pystdlib", "must be letters, digits and _, and unique"),
                      ("a:0:pystdlib", "must be a number > 0"),
                      ("a:x:pystdlib", "must be a number > 0"),
                      ("a:1:synthetic", "is not one of pystdlib")):
    with pytest.raises(ConfigError, match=match):
      tiny_config(f"data.mixture={spec}")
  with pytest.raises(ConfigError, match="Both data.source=pystdlib and data.mixture are set"):
    tiny_config("data.mixture=a:1:pystdlib", "data.source=pystdlib")
  cfg = tiny_config("data.mixture=a:1:pystdlib,b:3:pystdlib")
  assert cfg.data.source == "mixture"
  assert mixture.parse(cfg.data.mixture) == [("a", 0.25, "pystdlib"), ("b", 0.75, "pystdlib")]


def test_batches_resume_exactly_and_processes_share_the_rows(tmp_path):
  cfg = mixture_config(write_sources(tmp_path))
  workdir = str(tmp_path / "run")
  index = data_lib.prepare(cfg, workdir)
  assert sorted(index["sources"]) == ["low", "up"] and index["tokenizer"].endswith(
      "data/tokenizer.model")
  for name in ("low", "up"):  # each source's shards record the one tokenizer's checksum
    assert index["sources"][name]["fingerprint"]["tokenizer_sha256"] == index["sources"][
        "low"]["fingerprint"]["tokenizer_sha256"]
  full = loader.MixtureIterator(cfg, workdir)
  want = [next(full)["tokens"] for _ in range(10)]
  part = loader.MixtureIterator(cfg, workdir)
  for _ in range(4):
    next(part)
  state = json.loads(json.dumps(part.get_state()))  # JSON, as checkpoints keep it
  resumed = loader.MixtureIterator(cfg, workdir)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed)["tokens"] for _ in range(6)]),
                                np.stack(want[4:]))
  halves = [loader.MixtureIterator(cfg, workdir, process_rows=rows) for rows in ([0, 1, 2, 3],
                                                                                 [4, 5, 6, 7])]
  for batch in want[:3]:
    np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), batch)
  # the tokens per source add up to the batches', in the weights' proportion over many rows
  counts = resumed.log_counts(resumed.get_state())
  assert sum(counts.values()) == 10 * 8 * 16
  rows = mixture.Schedule(full.weights, cfg.train.seed).rows_per_source(100_000)
  assert rows[0] / rows.sum() == pytest.approx(0.75, abs=1e-3)
  # another mixture cannot resume this position
  other = mixture_config(cfg.data.mixture.replace("low:3", "low:2"))
  with pytest.raises(ConfigError, match="Resume with the same data.mixture"):
    loader.MixtureIterator(other, workdir).set_state(state)
  for it in (full, part, resumed, *halves):
    it.close()


def test_train_logs_counts_and_val_loss_per_source_and_resumes(tmp_path):
  spec = write_sources(tmp_path)
  common = (f"data.prepared_dir={tmp_path}/data", "train.steps=6", "train.checkpoint_every=100",
            "train.eval_every=3")
  train_lib.train(mixture_config(spec, *common), str(tmp_path / "a"), progress=False)
  train_lib.train(mixture_config(spec, *common), str(tmp_path / "b"), progress=False,
                  stop_at_step=4)
  result = train_lib.train(mixture_config(spec, *common), str(tmp_path / "b"), progress=False)
  a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
  train_a = {r["step"]: r for r in a if r["split"] == "train"}
  train_b = {r["step"]: r for r in b if r["split"] == "train"}
  assert sorted(train_a) == sorted(train_b) == list(range(1, 7))
  for step in train_a:  # the resumed run saw the same batches, and counts the same tokens
    assert train_a[step]["loss"] == pytest.approx(train_b[step]["loss"], rel=1e-6)
    assert (train_a[step]["tokens_low"], train_a[step]["tokens_up"]) == (
        train_b[step]["tokens_low"], train_b[step]["tokens_up"])
    assert train_a[step]["tokens_low"] + train_a[step]["tokens_up"] == step * 8 * 16
  val = result["val"]
  assert val["loss"] == pytest.approx(0.75 * val["loss_low"] + 0.25 * val["loss_up"])
  assert val["bits_per_byte_low"] > 0 and val["loss_low"] != val["loss_up"]
  # `lmjax eval` reports the same per-source numbers
  from lmjax import evaluate
  _, again = evaluate.evaluate_checkpoint(str(tmp_path / "b"))
  assert again["loss_up"] == pytest.approx(val["loss_up"], rel=1e-5)
  assert "; low " in evaluate.format_result(6, again)


def test_a_source_prepared_with_another_tokenizer_is_refused(tmp_path):
  cfg = mixture_config(write_sources(tmp_path))
  workdir = str(tmp_path / "run")
  data_lib.prepare(cfg, workdir)
  # a tokenizer trained on other text replaces the mixture's: every source's shards now disagree
  other = mixture_config(f"x:1:text:{tmp_path}/txt/doc_00*.txt")
  from lmjax.data import tokenizer
  path = tokenizer.train_tokenizer(other, str(tmp_path / "other" / "tokenizer"))
  (tmp_path / "run" / "data" / "tokenizer.model").write_bytes(open(path, "rb").read())
  with pytest.raises(ValueError, match="tokenizer_sha256"):
    data_lib.prepare_once(cfg, workdir)


def test_two_processes_equal_one_on_a_mesh_across_them(tmp_path):
  from test_multihost import TEXT, finish, launch, losses, single
  spec = write_sources(tmp_path)
  args = TEXT + [f"--config.data.mixture={spec}", "--config.data.source=mixture",
                 "--config.data.val_fraction=0.2",
                 "--config.data.seq_len=16", "--config.model.max_len=16"]
  single("train", args + [f"--workdir={tmp_path / 'one'}"], devices=4)
  outs = finish(launch("train", args + [f"--workdir={tmp_path / 'two'}", "--config.mesh.data=1",
                                        "--config.mesh.fsdp=4"], tmp_path, devices=2))
  assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=2e-5, abs=2e-5)
  assert losses(tmp_path / "two", "val") == pytest.approx(losses(tmp_path / "one", "val"),
                                                          rel=2e-5, abs=2e-5)
  assert [("prepare parquet:" in out) for out in outs] == [True, False]  # process 0 prepared
  one = {r["step"]: r for r in read_metrics(str(tmp_path / "one")) if r["split"] == "train"}
  two = {r["step"]: r for r in read_metrics(str(tmp_path / "two")) if r["split"] == "train"}
  assert [one[s]["tokens_up"] for s in one] == [two[s]["tokens_up"] for s in one]
