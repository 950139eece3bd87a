"""Parquet and Arrow sources (pretraining documents and fine-tuning examples): order, streaming,
fingerprints, errors. The files are written here with pyarrow and `datasets`."""
import json
import os
import tracemalloc

import numpy as np
import pytest

from lmjax import data
from lmjax.data import sources, tasks
from lmjax.errors import DataError
from test_data import make_cfg, python_like_doc

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path, texts, row_group_size=4, **columns):
  table = pa.table({"text": texts, "id": list(range(len(texts))), **columns})
  pq.write_table(table, str(path), row_group_size=row_group_size)
  return path


def test_parquet_documents_in_order_and_prepared(tmp_path):
  docs = [python_like_doc(i) for i in range(40)]
  write_parquet(tmp_path / "b.parquet", docs[25:])
  write_parquet(tmp_path / "a.parquet", docs[:25] + [None])  # a null is no document
  cfg = make_cfg(f"parquet:{tmp_path}/*.parquet")
  assert list(sources.iter_documents(cfg)) == docs  # files sorted by name, rows in order
  index = data.prepare(cfg, str(tmp_path / "run"))
  assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 40
  assert index["fingerprint"]["text_field"] == "text"
  assert index["fingerprint"]["files"].startswith("2 files")
  # a file added under the glob makes other data: refused, not mixed in
  write_parquet(tmp_path / "c.parquet", docs[:3])
  with pytest.raises(ValueError, match="files: prepared '2 files"):
    data.prepare(cfg, str(tmp_path / "run"))


def test_parquet_is_read_a_batch_at_a_time(tmp_path):
  """~24 MB of text in 96 row groups: iterating holds about one batch, not the file."""
  rng = np.random.default_rng(0)
  texts = ["".join(rng.choice(list("abcdefgh \n"), 1000)) for _ in range(24_000)]
  path = write_parquet(tmp_path / "big.parquet", texts, row_group_size=250)
  del texts
  pool = pa.default_memory_pool()
  start = pool.max_memory() or 0
  tracemalloc.start()
  count = sum(1 for _ in sources.table_documents([str(path)], "text"))
  _, python_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert count == 24_000
  assert python_peak < 8e6, python_peak  # a 1,024-row batch of 1 KB strings, and change
  assert (pool.max_memory() or 0) - start < 8e6  # Arrow's own buffers: one row group


def test_saved_hf_datasets_and_arrow_files(tmp_path):
  datasets = pytest.importorskip("datasets")
  docs = [python_like_doc(i) for i in range(30)]
  ds = datasets.Dataset.from_dict({"content": docs, "n": list(range(30))})
  ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
  cfg = make_cfg(f"arrow:{tmp_path / 'saved'}", text_field="content")
  assert list(sources.iter_documents(cfg)) == docs  # the shards in state.json's order
  index = data.prepare(cfg, str(tmp_path / "run"))
  assert index["fingerprint"]["files"].startswith("3 files")
  # a DatasetDict names its splits
  datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(
      str(tmp_path / "dict"))
  with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\]: name one"):
    list(sources.iter_documents(make_cfg(f"arrow:{tmp_path / 'dict'}", text_field="content")))
  cfg = make_cfg(f"arrow:{tmp_path / 'dict' / 'test'}", text_field="content")
  assert list(sources.iter_documents(cfg)) == docs[:4]
  # .arrow files of either IPC format, by glob
  (tmp_path / "files").mkdir()
  with pa.OSFile(str(tmp_path / "files" / "0.arrow"), "wb") as sink:
    with pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as writer:  # file format
      writer.write_table(pa.table({"text": docs[:5]}), max_chunksize=2)
  with pa.OSFile(str(tmp_path / "files" / "1.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as writer:  # stream format
      writer.write_table(pa.table({"text": docs[5:9]}), max_chunksize=3)
  assert list(sources.iter_documents(make_cfg(f"arrow:{tmp_path}/files/*.arrow"))) == docs[:9]


def test_table_errors(tmp_path):
  write_parquet(tmp_path / "a.parquet", ["x", "y"])
  with pytest.raises(DataError, match=r"has no column 'body' \(it has \['text', 'id'\]\)\. Set "
                     r"--config.data.text_field"):
    list(sources.iter_documents(make_cfg(f"parquet:{tmp_path}/*.parquet", text_field="body")))
  with pytest.raises(DataError, match="row 0: column 'id' is int, not a string"):
    list(sources.iter_documents(make_cfg(f"parquet:{tmp_path}/*.parquet", text_field="id")))
  with pytest.raises(DataError, match="matches no files"):
    list(sources.iter_documents(make_cfg(f"parquet:{tmp_path}/*.pq")))
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(DataError, match="Cannot read .*bad.parquet' as Parquet"):
    list(sources.iter_documents(make_cfg(f"parquet:{tmp_path}/bad.parquet")))
  (tmp_path / "dir").mkdir()
  with pytest.raises(DataError, match="without the state.json of `datasets.save_to_disk`"):
    list(sources.iter_documents(make_cfg(f"arrow:{tmp_path / 'dir'}")))


def test_finetune_examples_from_parquet_and_saved_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  examples = [{"prompt": f"x = {i}", "response": f" y = {i + 1}"} for i in range(6)]
  chats = [{"messages": [{"role": "user", "content": f"{i}?"},
                         {"role": "assistant", "content": f"{i}!"}]} for i in range(3)]
  (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(e) for e in examples))
  pq.write_table(pa.Table.from_pylist(examples), str(tmp_path / "sft.parquet"))
  datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "chats"))
  from_jsonl = [r for _, r in tasks.read_records(str(tmp_path / "sft.jsonl"))]
  assert [r for _, r in tasks.read_records(str(tmp_path / "sft.parquet"))] == from_jsonl
  where, record = tasks.read_records(str(tmp_path / "chats"))[2]
  assert record == chats[2] and where.endswith(".arrow, row 2")
  # a row without the fields an SFT example needs is named by file and row
  pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), str(tmp_path / "qa.parquet"))
  ((where, record),) = tasks.read_records(str(tmp_path / "qa.parquet"))
  with pytest.raises(DataError, match=r"qa.parquet, row 0: an SFT example needs"):
    tasks.sft_segments(record, where, tokenizer=None)


def test_parquet_source_through_train(tmp_path):
  """`lmjax train` on parquet:GLOB: a run whose loss falls."""
  from conftest import tiny_config
  from lmjax import train as train_lib
  write_parquet(tmp_path / "a.parquet", [python_like_doc(i) for i in range(60)])
  cfg = tiny_config(f"data.source=parquet:{tmp_path}/*.parquet", "data.vocab_size=400",
                    "model.vocab_size=512", "data.val_fraction=0.2", "train.steps=12")
  result = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
  records = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
  losses = [r["loss"] for r in records if "loss" in r and r.get("split", "train") == "train"]
  assert losses[-1] < losses[0] and np.isfinite(result["val"]["loss"])
