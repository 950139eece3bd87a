"""prepare: corpus -> tokenizer -> token shards, so that training only reads memory-mapped ids.

<prepared_dir> (data.prepared_dir, default WORKDIR/data) holds
  tokenizer.model/.vocab     trained here unless data.tokenizer names one (byte_bpe:
                             tokenizer.json, tokenizer_config.json)
  train_00000.bin, ...       raw token ids (uint16; uint32 for vocabularies over 65536), the
  val_00000.bin, ...         documents of a split in order, each followed by one eos
  progress.json              the shards finished so far, while preparing
  index.json                 written last, atomically: its presence means the data is complete

A killed run restarts where it stopped: shards are written as NAME.tmp and renamed when whole, then
recorded in progress.json (also replaced atomically); a rerun keeps the recorded shards and tokenizes
only the documents after them. The split of a document is fixed by its position
(`is_validation_document`), so shard contents depend only on the corpus, tokenizer and settings
(`fingerprint`). A prepared dir with another fingerprint is refused, never overwritten.
"""
from __future__ import annotations

import collections
import hashlib
from concurrent import futures
import json
import multiprocessing
import os
import platform
import re
from typing import Iterator

from etils import epath
import jax
import numpy as np
import tqdm

from lmjax import distributed
from lmjax import workdir as workdir_lib
from lmjax.data.sources import is_validation_document, iter_documents, source_files
from lmjax.data.tokenizer import (Tokenizer, check_vocab, load_tokenizer, resolve_tokenizer,
                                  tokenizer_sha256)
from lmjax.errors import ConfigError, DataError, LmjaxError

SPLITS = ("train", "val")
TASK_CHARS = 1 << 18  # text per worker task: large enough to amortize pickling, small for the bar
SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.bin(\.tmp)?$")


def fingerprint(cfg, tokenizer_path: str) -> dict:
  """Everything the prepared tokens depend on (shard_tokens only changes the file layout)."""
  data = cfg.data
  kind = data.source.partition(":")[0]
  return {"source": data.source,
          "text_field": data.text_field if kind in ("text", "tfds", "parquet", "arrow") else "",
          "tfds_split": data.tfds_split if kind == "tfds" else "",
          "max_bytes": data.max_bytes, "val_fraction": data.val_fraction,
          "tokenizer_sha256": tokenizer_sha256(tokenizer_path),
          # the built-in corpus is whatever Python runs this
          "python": platform.python_version() if data.source == "pystdlib" else "",
          "files": _files_digest(data.source)}


def _files_digest(source: str) -> str:
  """The files a text: glob matches now (names, and sizes of local ones), as a short digest:
  a file added, removed or changed in size under the same glob makes other data."""
  paths = source_files(source)
  if not paths:
    return ""
  listing = [[p] if "://" in p else [p, os.path.getsize(p)] for p in paths]
  digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
  return f"{len(paths)} files (sha256 {digest})"


def _read_json(path: str) -> dict | None:
  return workdir_lib.read_json(path) if epath.Path(path).is_file() else None


def _write_json(path: str, value: dict) -> None:
  partial = epath.Path(path + ".tmp")
  partial.write_text(json.dumps(value, indent=1))
  partial.replace(path)


def _size(path: str) -> int | None:
  """A file's size in bytes (local or in a bucket), None if it does not exist."""
  path = epath.Path(path)
  return path.stat().length if path.is_file() else None


def index_path(cfg, workdir: str) -> str:
  return os.path.join(workdir_lib.prepared_dir(cfg, workdir), workdir_lib.INDEX)


def is_prepared(cfg, workdir: str) -> bool:
  """Whether the prepared dir is complete for this config (same source, settings and tokenizer)."""
  index = _read_json(index_path(cfg, workdir))
  tokenizer = workdir_lib.tokenizer_path(cfg, workdir)
  return (index is not None and epath.Path(tokenizer).is_file() and
          index["fingerprint"] == fingerprint(cfg, tokenizer))


def read_index(cfg, workdir: str) -> dict:
  index = _read_json(index_path(cfg, workdir))
  if index is None:
    raise DataError(f"No prepared data at '{index_path(cfg, workdir)}'. Run `lmjax prepare "
                    f"--config=... --workdir={workdir}` (training does it too).")
  return index


def _check_same_data(index: dict, expected: dict, out_dir: str) -> None:
  saved = index["fingerprint"]  # (a key that data prepared by an older lmjax lacks is not compared)
  diffs = [f"{k}: prepared {saved[k]!r}, now {v!r}" for k, v in expected.items()
           if k in saved and saved[k] != v]
  if diffs:
    raise ConfigError(f"'{out_dir}' already holds data prepared differently:\n  " +
                      "\n  ".join(diffs) + "\nUse another data.prepared_dir (or --workdir), or "
                     f"delete '{out_dir}' to rebuild it. Nothing was changed.")


class ShardWriter:
  """Appends documents' tokens to one split, cutting a shard after ~`shard_tokens` tokens."""

  def __init__(self, out_dir: str, split: str, dtype: str, shard_tokens: int,
               done: list[dict], on_shard):
    self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
    self.shards, self.on_shard = list(done), on_shard
    self.resume_from = done[-1]["end_document"] if done else 0  # documents already in shards
    self._reset()

  def _reset(self):
    self.pending, self.tokens, self.documents, self.bytes = [], 0, 0, 0

  def add(self, doc_index: int, tokens: np.ndarray, num_bytes: int) -> None:
    self.pending.append(tokens)
    self.tokens += len(tokens)
    self.documents += 1
    self.bytes += num_bytes
    self.end_document = doc_index + 1
    if self.tokens >= self.shard_tokens:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    name = f"{self.split}_{len(self.shards):05d}.bin"
    partial = epath.Path(os.path.join(self.out_dir, name + ".tmp"))
    with partial.open("wb") as f:
      f.write(memoryview(np.concatenate(self.pending).astype(self.dtype)))
    partial.replace(os.path.join(self.out_dir, name))  # a .bin is always whole
    self.shards.append({"file": name, "tokens": self.tokens, "documents": self.documents,
                        "bytes": self.bytes, "end_document": self.end_document})
    self._reset()
    self.on_shard()


def _finished_shards(out_dir: str, expected: dict, shard_tokens: int, dtype: str) -> dict:
  """The shards a previous, interrupted run recorded and left intact, per split."""
  progress = _read_json(os.path.join(out_dir, "progress.json"))
  done = {split: [] for split in SPLITS}
  if not progress or (progress["fingerprint"], progress["shard_tokens"], progress["dtype"]) != (
      expected, shard_tokens, dtype):
    return done
  for split in SPLITS:
    for shard in progress["splits"][split]:
      if _size(os.path.join(out_dir, shard["file"])) != shard["tokens"] * np.dtype(
          dtype).itemsize:
        break
      done[split].append(shard)
  return done


# Tokenization runs in worker processes, each holding its own copy of the tokenizer.
_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
  global _tokenizer
  _tokenizer = tokenizer


def _encode(texts: list[str], dtype: str) -> list[np.ndarray]:
  eos = _eos_id(_tokenizer)
  return [np.array(list(ids) + [eos], dtype) for ids in _tokenizer.encode(texts)]


def _eos_id(tokenizer: Tokenizer) -> int:
  """The tokenizer's own eos (a given tokenizer, e.g. Llama's, may number it differently)."""
  eos = tokenizer.eos_id
  if eos < 0:
    raise DataError(f"The tokenizer {tokenizer.path} has no eos token, which lmjax puts between "
                    "documents. Train one with `lmjax tokenizer train`, give a SentencePiece model "
                    "that has eos, or name it as eos_token in the tokenizer_config.json beside "
                    "a tokenizer.json.")
  return eos


def _tasks(docs, val_fraction: float, resume_from: dict) -> Iterator[tuple[list, list[str]]]:
  """Groups documents into tasks ([(doc_index, split, bytes)], texts to tokenize); split is None
  for a document already in a finished shard (it only counts for the progress bar)."""
  meta, texts, chars = [], [], 0
  for doc_index, doc in enumerate(docs):
    split = "val" if is_validation_document(doc_index, val_fraction) else "train"
    chars += len(doc)
    if doc_index < resume_from[split]:
      meta.append((doc_index, None, len(doc.encode("utf-8"))))
    else:
      meta.append((doc_index, split, len(doc.encode("utf-8"))))
      texts.append(doc)
    if chars >= TASK_CHARS:
      yield meta, texts
      meta, texts, chars = [], [], 0
  if meta:
    yield meta, texts


def _encoded(tasks, tokenizer: Tokenizer, dtype: str, num_workers: int):
  """(meta, token arrays) per task, in order, with a bounded number of tasks in flight."""
  if num_workers <= 1:  # no process start-up for small jobs
    _init_worker(tokenizer)
    for meta, texts in tasks:
      yield meta, _encode(texts, dtype)
    return
  # spawn, not fork: forking a process whose JAX threads run can deadlock. An executor, not a Pool:
  # workers that cannot start (a script without `if __name__ == "__main__":`) fail, not hang.
  with futures.ProcessPoolExecutor(num_workers, multiprocessing.get_context("spawn"),
                                   _init_worker, (tokenizer,)) as pool:
    in_flight = collections.deque()
    try:
      for meta, texts in tasks:
        in_flight.append((meta, pool.submit(_encode, texts, dtype)))
        if len(in_flight) >= 4 * num_workers:
          meta, result = in_flight.popleft()
          yield meta, result.result()
      while in_flight:
        meta, result = in_flight.popleft()
        yield meta, result.result()
    except futures.BrokenExecutor:
      raise RuntimeError("The tokenizer worker processes died. A script that calls prepare() must "
                         "do so under `if __name__ == \"__main__\":` (worker processes import it); "
                         "or set data.num_workers=1.") from None


def _split_summary(shards: list[dict]) -> dict:
  return {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
          "bytes": sum(s["bytes"] for s in shards), "shards": shards}


def _check_enough_tokens(splits: dict, cfg) -> None:
  window = cfg.data.seq_len + 1
  for split, hint in (("train", "use more text (data.source, data.max_bytes)"),
                      ("val", f"raise data.val_fraction (now {cfg.data.val_fraction})")):
    if splits[split]["tokens"] < window:
      raise DataError(f"The {split} split has {splits[split]['tokens']} tokens, fewer than one "
                      f"window of data.seq_len + 1 = {window}: {hint}, or lower data.seq_len.")


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
  for path in epath.Path(out_dir).iterdir():
    if SHARD_FILE.match(path.name) and path.name not in keep:
      path.unlink()


def prepare(cfg, workdir: str) -> dict:
  """Tokenizes the corpus into shards (resuming an interrupted run); returns the index. A
  prepared dir this call created is removed again if the corpus or the settings are refused (an
  LmjaxError); an interrupted one is kept, to resume."""
  out_dir = epath.Path(workdir_lib.prepared_dir(cfg, workdir))
  created = not out_dir.exists()
  try:
    return _prepare(cfg, workdir)
  except LmjaxError:
    if created and out_dir.exists():
      out_dir.rmtree()
    raise


def _prepare(cfg, workdir: str) -> dict:
  out_dir = workdir_lib.prepared_dir(cfg, workdir)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  tokenizer_path = resolve_tokenizer(cfg, workdir)
  tokenizer = load_tokenizer(tokenizer_path)
  check_vocab(cfg, tokenizer)
  eos_id = _eos_id(tokenizer)
  expected = fingerprint(cfg, tokenizer_path)
  index = _read_json(os.path.join(out_dir, workdir_lib.INDEX))
  if index is not None:
    _check_same_data(index, expected, out_dir)
    return index  # already prepared

  vocab_size = tokenizer.vocab_size
  dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
  shard_tokens = cfg.data.shard_tokens
  done = _finished_shards(out_dir, expected, shard_tokens, dtype)

  def save_progress():
    _write_json(os.path.join(out_dir, "progress.json"), {
        "fingerprint": expected, "shard_tokens": shard_tokens, "dtype": dtype,
        "splits": {split: writer.shards for split, writer in writers.items()}})

  writers = {split: ShardWriter(out_dir, split, dtype, shard_tokens, done[split], save_progress)
             for split in SPLITS}
  num_workers = cfg.data.num_workers or os.cpu_count() or 1
  tasks = _tasks(iter_documents(cfg), cfg.data.val_fraction,
                 {split: writer.resume_from for split, writer in writers.items()})
  with tqdm.tqdm(total=cfg.data.max_bytes or None, unit="B", unit_scale=True,
                 desc=f"prepare {cfg.data.source}") as bar:
    for meta, token_arrays in _encoded(tasks, tokenizer, dtype, num_workers):
      arrays = iter(token_arrays)
      for doc_index, split, num_bytes in meta:
        if split is not None:
          writers[split].add(doc_index, next(arrays), num_bytes)
        bar.update(num_bytes)
  for writer in writers.values():
    writer.flush()

  splits = {split: _split_summary(writer.shards) for split, writer in writers.items()}
  _check_enough_tokens(splits, cfg)
  index = {"version": 1, "fingerprint": expected, "tokenizer": workdir_lib.absolute(tokenizer_path),
           "vocab_size": vocab_size, "eos_id": eos_id,
           "dtype": dtype,
           "shard_tokens": shard_tokens, "splits": splits}
  _write_json(os.path.join(out_dir, workdir_lib.INDEX), index)  # last: the data is now complete
  _remove_stale_shards(out_dir, {s["file"] for split in splits.values() for s in split["shards"]})
  epath.Path(out_dir, "progress.json").unlink(missing_ok=True)
  return index


def shards_fingerprint(cfg, workdir: str) -> str:
  """A digest of the prepared data as this process sees it: the index's fingerprint (tokenizer
  checksum included), dtype and every shard's name and token count. Raises a DataError if the
  tokenizer file does not have the recorded checksum or a shard is missing or of the wrong size."""
  index = read_index(cfg, workdir)
  tokenizer = workdir_lib.tokenizer_path(cfg, workdir)
  recorded = index["fingerprint"]["tokenizer_sha256"]
  if not epath.Path(tokenizer).is_file() or tokenizer_sha256(tokenizer) != recorded:
    raise DataError(f"The tokenizer '{tokenizer}' is missing or is not the one the data in "
                    f"'{index_path(cfg, workdir)}' was prepared with (sha256 {recorded[:12]}...). "
                    "Every host must see the same workdir; re-prepare it in a fresh one.")
  out_dir, itemsize = workdir_lib.prepared_dir(cfg, workdir), np.dtype(index["dtype"]).itemsize
  listing = []
  for split, stats in sorted(index["splits"].items()):
    for shard in stats["shards"]:
      path = os.path.join(out_dir, shard["file"])
      size = _size(path)
      if size != shard["tokens"] * itemsize:
        raise DataError(f"The shard '{path}' is {'missing' if size is None else f'{size} bytes'}"
                        f", but the index records {shard['tokens']} tokens "
                        f"({shard['tokens'] * itemsize} bytes). The prepared data is damaged or "
                        "not shared by every host: re-prepare it in a fresh workdir.")
      listing.append((split, shard["file"], shard["tokens"]))
  digest = {"fingerprint": index["fingerprint"], "dtype": index["dtype"], "shards": listing}
  return hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()


def prepare_once(cfg, workdir: str) -> dict:
  """Prepares the data (if it is not yet) on process 0 only, into the shared workdir; the other
  processes wait for it without a device collective, then check that the tokenizer and shards
  they see are the ones process 0 wrote (same checksum and shard fingerprint), or all refuse. The
  prepared dir may be in a bucket (gs://...): each host then reads the shards through a local
  copy (`workdir.local_copy`)."""
  def prepared_here() -> str:
    if not is_prepared(cfg, workdir):
      prepare(cfg, workdir)
    return shards_fingerprint(cfg, workdir)

  written = distributed.share_from_process_0(prepared_here, "prepare")

  def check_same_data():
    if jax.process_index() == 0:
      return
    if not epath.Path(index_path(cfg, workdir)).is_file():
      raise DataError(f"Process 0 prepared the data in '{index_path(cfg, workdir)}', but process "
                      f"{jax.process_index()} does not see it there: data.prepared_dir (and the "
                      "workdir) must be storage that every host shares, e.g. gs:// or NFS.")
    seen = shards_fingerprint(cfg, workdir)
    if seen != written:
      raise DataError(f"The prepared data process {jax.process_index()} sees in "
                      f"'{workdir_lib.prepared_dir(cfg, workdir)}' differs from what process 0 "
                      f"wrote (fingerprint {seen[:12]} vs {written[:12]}): the hosts do not "
                      "share one prepared dir. Point data.prepared_dir at shared storage.")

  distributed.check_everywhere(check_same_data, "prepare-check")  # all refuse, or none
  return read_index(cfg, workdir)
