"""Data: sources -> tokenizer -> prepared token shards -> global batches (pretraining), and jsonl
examples -> rows (fine-tuning, `tasks`).

The loop only sees iterators of batches, dicts of this process's rows of each global batch
(pretraining: {"tokens": int32 [local_batch, seq_len + 1]}), with `get_state()` / `set_state()`
(JSON-serializable) so that their position is part of every checkpoint.
"""
from __future__ import annotations

from etils import epath

from lmjax.data import mixture
from lmjax.data import prepare as prepare_lib
from lmjax.data.prepare import index_path
from lmjax.data.sources import iter_documents
from lmjax.data.synthetic import SyntheticIterator
from lmjax.data.tokenizer import (Tokenizer, check_vocab, file_sha256, load_tokenizer,
                                  masking_for, resolve_tokenizer, token_bytes, train_tokenizer)

__all__ = ["SyntheticIterator", "Tokenizer", "check_vocab", "file_sha256", "is_prepared",
           "iter_documents", "load_tokenizer", "make_iterator", "masking_for", "prepare", "prepare_once",
           "read_index", "resolve_tokenizer", "token_bytes", "train_tokenizer"]


def _each_source(cfg, workdir: str) -> dict:
  """{name: source config} of a mixture's sources."""
  return {name: mixture.source_config(cfg, workdir, name)
          for name, _, _ in mixture.parse(cfg.data.mixture)}


def prepare(cfg, workdir: str) -> dict:
  """prepare.prepare, or each source of a mixture (mixture.prepare)."""
  if cfg.data.mixture:
    return mixture.prepare(cfg, workdir)
  return prepare_lib.prepare(cfg, workdir)


def prepare_once(cfg, workdir: str) -> dict:
  """prepare.prepare_once (process 0 prepares, the others check), of each source of a mixture."""
  if cfg.data.mixture:
    return mixture.prepare(cfg, workdir, once=True)
  return prepare_lib.prepare_once(cfg, workdir)


def is_prepared(cfg, workdir: str) -> bool:
  if cfg.data.mixture:
    return all(prepare_lib.is_prepared(c, workdir) for c in _each_source(cfg, workdir).values())
  return prepare_lib.is_prepared(cfg, workdir)


def read_index(cfg, workdir: str) -> dict:
  """The prepared data's index; a mixture's: each source's, and the totals of each split."""
  if cfg.data.mixture:
    return mixture.combined_index(cfg, {name: prepare_lib.read_index(c, workdir)
                                        for name, c in _each_source(cfg, workdir).items()})
  return prepare_lib.read_index(cfg, workdir)


def index_paths(cfg, workdir: str) -> list[str]:
  """The index.json of the prepared data: one, or each source's of a mixture."""
  if not cfg.data.mixture:
    return [index_path(cfg, workdir)]
  return [index_path(c, workdir) for c in _each_source(cfg, workdir).values()]


def make_iterator(cfg, workdir: str, split: str = "train", process_rows=None,
                  batch_size: int | None = None):
  """The pretraining batches of a split, each this process's `process_rows` (sorted global row
  ids; None: all) of the global batch. The data is prepared first if it is not yet."""
  batch_size = batch_size or cfg.train.batch_size
  if cfg.data.source == "synthetic":
    # masked LM keeps the last id out of the stream: it is the mask token (tokenizer.masking_for)
    vocab = cfg.model.vocab_size - (1 if cfg.train.objective == "masked_lm" else 0)
    return SyntheticIterator(vocab, cfg.data.seq_len, batch_size, cfg.train.seed, process_rows,
                             split)
  if not all(epath.Path(path).is_file() for path in index_paths(cfg, workdir)):
    prepare(cfg, workdir)  # a fresh workdir; whether existing data still fits the config is
    # checked where data is made (train's prepare_once): a run's data is read as it was made
  from lmjax.data import loader  # Grain is imported only when batches are needed
  iterator = loader.MixtureIterator if cfg.data.mixture else loader.TokenIterator
  return iterator(cfg, workdir, split, process_rows, batch_size)
