"""Data pipeline: sources, tokenizer, prepare (shards + index), loader (windows, resume, processes)."""
import gzip
import json
import os
import random
import sys

import numpy as np
import pytest

from lmjax import data
from lmjax import workdir as workdir_lib
from lmjax.config import default_config
from lmjax.data import sources, tokenizer

SEQ_LEN = 16


def python_like_doc(i: int) -> str:
  """Small documents with code's features: indentation, tabs, blank lines, digits, unicode."""
  rng = random.Random(i)
  word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9)))
  lines = [f"def {word()}_{i}(x, y={rng.randint(0, 999)}):", f'    """Returns {word()} {i}. ünï"""']
  for j in range(rng.randint(2, 12)):
    lines.append(f"    if {word()} > {j}:\n        {word()} = y + x * {rng.randint(0, 99)}  # {word()}")
  lines += ["\treturn  y", "", ""]
  return "\n".join(lines)


def write_txt_corpus(directory, num_docs=60) -> list[str]:
  docs = [python_like_doc(i) for i in range(num_docs)]
  os.makedirs(directory, exist_ok=True)
  for i, doc in enumerate(docs):
    with open(os.path.join(directory, f"doc_{i:03d}.txt"), "w") as f:
      f.write(doc)
  return docs


def make_cfg(source: str, **data_values):
  cfg = default_config()
  cfg.data.source = source
  cfg.data.vocab_size = 400
  cfg.model.vocab_size = 512
  cfg.data.seq_len = SEQ_LEN
  cfg.data.val_fraction = 0.1
  cfg.data.num_workers = 1
  cfg.train.batch_size = 4
  for key, value in data_values.items():
    cfg.data[key] = value
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  directory = tmp_path_factory.mktemp("corpus")
  return str(directory), write_txt_corpus(directory)


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory, corpus):
  directory, _ = corpus
  out = tmp_path_factory.mktemp("tok")
  return tokenizer.train_tokenizer(make_cfg(f"text:{directory}/*.txt"), str(out / "tok"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, trained_tokenizer):
  """A corpus prepared into several small shards per split."""
  directory, docs = corpus
  workdir = str(tmp_path_factory.mktemp("workdir"))
  cfg = make_cfg(f"text:{directory}/*.txt", tokenizer=trained_tokenizer, shard_tokens=1000)
  return cfg, workdir, data.prepare(cfg, workdir)


def all_tokens(cfg, workdir, index, split) -> np.ndarray:
  directory = workdir_lib.prepared_dir(cfg, workdir)
  return np.concatenate([np.fromfile(os.path.join(directory, s["file"]), index["dtype"])
                         for s in index["splits"][split]["shards"]])


# --- sources -------------------------------------------------------------------------------------

def test_txt_source_sorted_one_document_per_file(tmp_path):
  for name, text in [("b.txt", "second\n"), ("a.txt", "first\n  indented"), ("c.txt", "")]:
    (tmp_path / name).write_text(text)
  docs = list(sources.iter_documents(make_cfg(f"text:{tmp_path}/*.txt")))
  assert docs == ["first\n  indented", "second\n", ""]


def test_jsonl_with_custom_field_and_gz_variants(tmp_path):
  records = [{"body": f"doc {i}\n", "id": i} for i in range(3)]
  lines = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # a blank line is skipped
  (tmp_path / "a.jsonl").write_text(lines)
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(lines)
  with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
    f.write("zipped text ü\n")
  cfg = make_cfg(f"text:{tmp_path}/*", text_field="body")
  assert list(sources.iter_documents(cfg)) == ["doc 0\n", "doc 1\n", "doc 2\n"] * 2 + [
      "zipped text ü\n"]


def test_pystdlib_capped_by_max_bytes():
  cfg = make_cfg("pystdlib", max_bytes=50_000)
  docs = list(sources.iter_documents(cfg))
  assert sum(len(d.encode()) for d in docs) == 50_000
  files = sources.pystdlib_files()
  assert files == sorted(files) and not any("site-packages" in f for f in files)
  with open(files[0], encoding="utf-8") as f:
    assert docs[0] == f.read()[:50_000]


def test_source_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="matches no files"):
    sources.iter_documents(make_cfg(f"text:{tmp_path}/*.txt"))
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2 has no field 'text'.*data.text_field"):
    list(sources.iter_documents(make_cfg(f"text:{tmp_path}/*.jsonl")))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
    list(sources.iter_documents(make_cfg(f"text:{tmp_path}/*.txt")))
  (tmp_path / "notes.md").write_text("x")
  with pytest.raises(ValueError, match="notes.md"):
    sources.iter_documents(make_cfg(f"text:{tmp_path}/*"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ValueError, match=r"pip install -e \.\[tfds\]"):
    sources.iter_documents(make_cfg("tfds:c4/en"))
  with pytest.raises(ValueError, match="no documents"):
    sources.iter_documents(make_cfg("synthetic"))


def test_validation_documents_are_fixed_and_about_the_fraction():
  held_out = [i for i in range(20_000) if sources.is_validation_document(i, 0.05)]
  assert held_out[0] == 0 and 800 < len(held_out) < 1200
  assert held_out == [i for i in range(20_000) if sources.is_validation_document(i, 0.05)]


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_round_trips_code(trained_tokenizer):
  t = tokenizer.load_tokenizer(trained_tokenizer)
  assert t.vocab_size == 400 and (t.pad_id, t.bos_id, t.eos_id) == (0, 2, 3)
  assert t.id_to_token(1) == "<unk>" and t.token_id("\n") == 4
  texts = ["def f(x):\n\tif x:\n        return  1234 \n\n\n  # ünïcode 😀\r\n", "  leading\n",
           "trailing  ", "\n\n"]
  with open(sources.pystdlib_files()[0], encoding="utf-8") as f:
    texts.append(f.read())
  for text in texts:
    assert t.decode(t.encode([text])[0]) == text
  assert 4 in t.encode(["a\nb"])[0]


def test_training_chunks_keep_text_and_bound_length():
  doc = "short line\n" + "x" * 10_000 + "\nend"
  chunks = list(tokenizer.training_chunks([doc], max_chars=100))
  assert "".join(chunks) == doc and max(map(len, chunks)) <= 100


def test_tokenizer_errors(tmp_path, corpus, trained_tokenizer):
  directory, _ = corpus
  cfg = make_cfg(f"text:{directory}/*.txt", tokenizer=str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="data.tokenizer=.*missing.model.*does not exist"):
    tokenizer.resolve_tokenizer(cfg, str(tmp_path))
  cfg = make_cfg(f"text:{directory}/*.txt", tokenizer=trained_tokenizer)
  cfg.model.vocab_size = 300
  with pytest.raises(ValueError, match=r"model.vocab_size=300 .*400.*--config.model.vocab_size=512"):
    data.prepare(cfg, str(tmp_path))
  tokenizer.check_vocab(make_cfg("pystdlib"), tokenizer.load_tokenizer(trained_tokenizer))
  assert len(tokenizer.file_sha256(trained_tokenizer)) == 64


def test_resolve_tokenizer_trains_once_into_prepared_dir(tmp_path, corpus):
  directory, _ = corpus
  cfg = make_cfg(f"text:{directory}/*.txt")
  path = tokenizer.resolve_tokenizer(cfg, str(tmp_path))
  assert path == str(tmp_path / "data" / "tokenizer.model")
  mtime = os.stat(path).st_mtime_ns
  assert tokenizer.resolve_tokenizer(cfg, str(tmp_path)) == path
  assert os.stat(path).st_mtime_ns == mtime
  cfg.data.vocab_size = 350
  with pytest.raises(ValueError, match="has 400 pieces but data.vocab_size=350"):
    tokenizer.resolve_tokenizer(cfg, str(tmp_path))


# --- prepare -------------------------------------------------------------------------------------

def test_prepare_index_counts(prepared, corpus, trained_tokenizer):
  cfg, workdir, index = prepared
  _, docs = corpus
  sp = tokenizer.load_tokenizer(trained_tokenizer)
  assert index["dtype"] == "uint16" and index["vocab_size"] == 400 and index["eos_id"] == 3
  assert index["fingerprint"]["tokenizer_sha256"] == tokenizer.file_sha256(trained_tokenizer)
  assert data.read_index(cfg, workdir) == index
  for split in ("train", "val"):
    split_docs = [d for i, d in enumerate(docs)
                  if sources.is_validation_document(i, 0.1) == (split == "val")]
    stats = index["splits"][split]
    expected = np.concatenate([ids + [3] for ids in sp.encode(split_docs)])
    np.testing.assert_array_equal(all_tokens(cfg, workdir, index, split), expected)
    assert stats["tokens"] == len(expected) == sum(s["tokens"] for s in stats["shards"])
    assert stats["documents"] == len(split_docs)
    assert stats["bytes"] == sum(len(d.encode()) for d in split_docs)
    # bits per byte divides by the bytes of the scored tokens: exact for lmjax's tokenizer
    assert data.token_bytes(sp)[all_tokens(cfg, workdir, index, split)].sum() == stats["bytes"]
  assert len(index["splits"]["train"]["shards"]) > 2  # shard_tokens=1000 cuts several


def test_prepare_rerun_is_a_no_op(prepared):
  cfg, workdir, index = prepared
  directory = workdir_lib.prepared_dir(cfg, workdir)
  before = {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}
  assert data.is_prepared(cfg, workdir)
  assert data.prepare(cfg, workdir) == index
  after = {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}
  assert after == before


def test_prepare_refuses_other_data_in_the_same_dir(prepared, tmp_path, corpus):
  cfg, workdir, _ = prepared
  other = make_cfg(cfg.data.source, tokenizer=cfg.data.tokenizer, val_fraction=0.2)
  assert not data.is_prepared(other, workdir)
  with pytest.raises(ValueError, match="(?s)prepared differently.*val_fraction.*Nothing was changed"):
    data.prepare(other, workdir)
  directory, _ = corpus
  new_tokenizer = tokenizer.train_tokenizer(make_cfg(f"text:{directory}/*.txt", vocab_size=350),
                                            str(tmp_path / "other"))
  other = make_cfg(cfg.data.source, tokenizer=new_tokenizer)
  with pytest.raises(ValueError, match="tokenizer_sha256"):
    data.prepare(other, workdir)


def test_a_file_added_under_the_same_glob_is_other_data(tmp_path, trained_tokenizer):
  corpus = tmp_path / "corpus"
  write_txt_corpus(corpus, num_docs=20)
  cfg = make_cfg(f"text:{corpus}/*.txt", tokenizer=trained_tokenizer)
  data.prepare(cfg, str(tmp_path / "run"))
  assert data.is_prepared(cfg, str(tmp_path / "run"))
  (corpus / "doc_new.txt").write_text(python_like_doc(99))
  assert not data.is_prepared(cfg, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"files: prepared '20 files \(sha256 .*now '21 files"):
    data.prepare(cfg, str(tmp_path / "run"))


def test_interrupted_prepare_resumes_and_never_trusts_a_tmp_shard(
    tmp_path, monkeypatch, prepared):
  cfg, reference_workdir, reference = prepared
  workdir = str(tmp_path)
  directory = workdir_lib.prepared_dir(cfg, workdir)
  real_replace = os.replace

  def dying_replace(src, dst):
    if str(dst).endswith("train_00002.bin"):
      raise KeyboardInterrupt  # killed after writing the .tmp, before renaming it
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", dying_replace)  # as seen by prepare.py
  with pytest.raises(KeyboardInterrupt):
    data.prepare(cfg, workdir)
  monkeypatch.setattr(os, "replace", real_replace)
  assert os.path.exists(os.path.join(directory, "train_00002.bin.tmp"))
  assert not os.path.exists(os.path.join(directory, "train_00002.bin"))
  assert not data.is_prepared(cfg, workdir)
  kept = {name: os.stat(os.path.join(directory, name)).st_mtime_ns
          for name in ("train_00000.bin", "train_00001.bin")}

  index = data.prepare(cfg, workdir)
  assert {n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in kept} == kept  # skipped
  assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
  assert not os.path.exists(os.path.join(directory, "progress.json"))
  assert index["splits"] == reference["splits"]
  for split in ("train", "val"):
    np.testing.assert_array_equal(all_tokens(cfg, workdir, index, split),
                                  all_tokens(cfg, reference_workdir, reference, split))


def test_prepare_with_worker_processes_matches_one_process(tmp_path, prepared):
  cfg, reference_workdir, reference = prepared
  cfg = make_cfg(cfg.data.source, tokenizer=cfg.data.tokenizer, shard_tokens=1000, num_workers=2)
  index = data.prepare(cfg, str(tmp_path))
  assert index["splits"] == reference["splits"]
  np.testing.assert_array_equal(all_tokens(cfg, str(tmp_path), index, "train"),
                                all_tokens(cfg, reference_workdir, reference, "train"))


def test_prepare_refuses_a_corpus_too_small_for_validation(tmp_path, trained_tokenizer):
  (tmp_path / "tiny.txt").write_text("x = 1\n")
  cfg = make_cfg(f"text:{tmp_path}/*.txt", tokenizer=trained_tokenizer)
  with pytest.raises(ValueError, match="split has .* tokens, fewer than one window"):
    data.prepare(cfg, str(tmp_path / "work"))


# --- loader --------------------------------------------------------------------------------------

def take(iterator, n):
  """The token arrays of the next n batches ({"tokens": [rows, seq_len + 1]} each)."""
  batches = [next(iterator)["tokens"] for _ in range(n)]
  iterator.close()
  return batches


def test_windows_are_contiguous_slices_across_shards(prepared):
  cfg, workdir, index = prepared
  tokens = all_tokens(cfg, workdir, index, "train")
  it = data.make_iterator(cfg, workdir, "train")
  windows = it.windows
  assert len(windows) == (len(tokens) - 1) // SEQ_LEN
  for w in range(len(windows)):  # including those that cross a shard boundary
    np.testing.assert_array_equal(windows[w], tokens[w * SEQ_LEN:w * SEQ_LEN + SEQ_LEN + 1])
  starts = {tuple(tokens[w * SEQ_LEN:w * SEQ_LEN + SEQ_LEN + 1]) for w in range(len(windows))}
  for batch in take(it, 5):
    assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == np.int32
    assert all(tuple(row) in starts for row in batch)


def test_loader_is_deterministic_and_seeded(prepared):
  cfg, workdir, _ = prepared
  first = take(data.make_iterator(cfg, workdir), 6)
  np.testing.assert_array_equal(first, take(data.make_iterator(cfg, workdir), 6))
  cfg.train.seed = 1
  other = take(data.make_iterator(cfg, workdir), 6)
  cfg.train.seed = 0
  assert not np.array_equal(first, other)


def test_train_epochs_cover_every_window_and_reshuffle(prepared):
  cfg, workdir, _ = prepared
  it = data.make_iterator(cfg, workdir, batch_size=1)
  n = len(it.windows)
  rows = [next(it)["tokens"][0] for _ in range(2 * n)]
  it.close()
  index_of = {tuple(it.windows[w]): w for w in range(n)}
  epochs = [[index_of[tuple(r)] for r in rows[:n]], [index_of[tuple(r)] for r in rows[n:]]]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(n))


def test_resume_from_saved_state_matches_uninterrupted(prepared):
  cfg, workdir, _ = prepared
  uninterrupted = take(data.make_iterator(cfg, workdir), 10)
  it = data.make_iterator(cfg, workdir)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = data.make_iterator(cfg, workdir)
  resumed.set_state(state)
  np.testing.assert_array_equal(take(resumed, 6), uninterrupted[4:])
  wrong = data.make_iterator(cfg, workdir, batch_size=8)
  with pytest.raises(ValueError, match="batch"):
    wrong.set_state(state)
  wrong.close()


def test_processes_read_the_rows_their_devices_hold(prepared):
  cfg, workdir, _ = prepared
  global_batches = take(data.make_iterator(cfg, workdir), 5)
  halves = [take(data.make_iterator(cfg, workdir, process_rows=r), 5) for r in ([0, 1], [2, 3])]
  # a batch replicated over an axis that spans processes: every process feeds every row
  every = take(data.make_iterator(cfg, workdir, process_rows=[0, 1, 2, 3]), 5)
  strided = take(data.make_iterator(cfg, workdir, process_rows=[1, 3]), 5)
  for step in range(5):
    assert halves[0][step].shape == (2, SEQ_LEN + 1)
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]),
                                  global_batches[step])
    np.testing.assert_array_equal(every[step], global_batches[step])
    np.testing.assert_array_equal(strided[step], global_batches[step][[1, 3]])


def test_val_reads_in_order_from_the_start(prepared):
  cfg, workdir, index = prepared
  tokens = all_tokens(cfg, workdir, index, "val")
  first = take(data.make_iterator(cfg, workdir, "val"), 2)
  again = take(data.make_iterator(cfg, workdir, "val"), 2)
  np.testing.assert_array_equal(first, again)
  for row in range(4):
    np.testing.assert_array_equal(first[0][row],
                                  tokens[row * SEQ_LEN:row * SEQ_LEN + SEQ_LEN + 1])


def test_make_iterator_prepares_a_fresh_workdir(tmp_path, corpus):
  directory, _ = corpus
  cfg = make_cfg(f"text:{directory}/*.txt")
  batch = take(data.make_iterator(cfg, str(tmp_path), "val"), 1)[0]
  assert data.is_prepared(cfg, str(tmp_path))
  assert batch.shape == (4, SEQ_LEN + 1) and batch.max() < 400
  cfg.data.seq_len = 10_000
  with pytest.raises(ValueError, match="fewer than one window"):
    data.make_iterator(cfg, str(tmp_path), "val")


# --- a corpus and prepared data in a bucket -----------------------------------------------------

def test_corpus_glob_tokenizer_and_shards_in_a_bucket(bucket, tmp_path, corpus):
  """text:gs://... globs, the tokenizer trained into a gs:// prepared dir, shards written there
  and read through this host's local copy: the same tokens as all-local files."""
  import shutil
  directory, _ = corpus
  shutil.copytree(directory, bucket / "b" / "corpus")
  with gzip.open(bucket / "b" / "corpus" / "extra.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": "x = 1\n"}) + "\n")
  shutil.copytree(bucket / "b" / "corpus", tmp_path / "local")
  remote = make_cfg("text:gs://b/corpus/*", prepared_dir="gs://b/data", shard_tokens=1000)
  local = make_cfg(f"text:{tmp_path}/local/*", shard_tokens=1000)
  assert sources.text_files(remote.data.source[5:])[-1] == "gs://b/corpus/extra.jsonl.gz"
  assert list(sources.iter_documents(remote)) == list(sources.iter_documents(local))

  index = data.prepare(remote, "")
  assert (bucket / "b" / "data" / "tokenizer.model").is_file()
  reference = data.prepare(local, str(tmp_path / "run"))
  assert index["splits"] == reference["splits"] and len(index["splits"]["train"]["shards"]) > 1
  for shard in index["splits"]["train"]["shards"]:
    assert (bucket / "b" / "data" / shard["file"]).read_bytes() == (
        tmp_path / "run" / "data" / shard["file"]).read_bytes()
  assert data.is_prepared(remote, "") and data.prepare(remote, "") == index  # rerun: no-op
  got = take(data.make_iterator(remote, "", "train"), 3)
  want = take(data.make_iterator(local, str(tmp_path / "run"), "train"), 3)
  np.testing.assert_array_equal(got, want)
  cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.bin"))
  assert cached == sorted(s["file"] for s in index["splits"]["train"]["shards"])
  with pytest.raises(ValueError, match=r"`\*\*` is not supported"):
    sources.text_files("gs://b/**/*.txt")


def test_corpus_errors_keep_their_own_message_and_leave_no_prepared_dir(tmp_path):
  """A malformed line met while training the tokenizer is reported as itself (file and line),
  not as a tokenizer failure; a one-document corpus says that document is the validation split;
  neither leaves a prepared dir behind."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  lines = [json.dumps({"text": python_like_doc(i)}) for i in range(30)]
  lines[12] = '{"text": "cut'
  (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"a.jsonl:13 is not valid JSON") as info:
    data.prepare(make_cfg(f"text:{corpus}/*.jsonl"), str(tmp_path / "run"))
  assert "Training the tokenizer failed" not in str(info.value)
  assert not (tmp_path / "run" / "data").exists()
  (corpus / "a.jsonl").unlink()
  (corpus / "one.txt").write_text(python_like_doc(0))
  with pytest.raises(ValueError, match=r"has 1 document\(s\), all held out for validation"):
    data.prepare(make_cfg(f"text:{corpus}/*.txt"), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "data").exists()
