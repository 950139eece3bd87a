"""Data: sources -> tokenizer -> prepared token shards -> global batches (pretraining), and jsonl
examples -> rows (fine-tuning, `tasks`).

The loop only sees iterators of batches, dicts of this process's rows of each global batch
(pretraining: {"tokens": int32 [local_batch, seq_len + 1]}), with `get_state()` / `set_state()`
(JSON-serializable) so that their position is part of every checkpoint.
"""
from __future__ import annotations

from etils import epath

from lmjax.data.prepare import index_path, is_prepared, prepare, prepare_once, read_index
from lmjax.data.sources import iter_documents
from lmjax.data.synthetic import SyntheticIterator
from lmjax.data.tokenizer import (Tokenizer, check_vocab, file_sha256, load_tokenizer,
                                  masking_for, resolve_tokenizer, token_bytes, train_tokenizer)

__all__ = ["SyntheticIterator", "Tokenizer", "check_vocab", "file_sha256", "is_prepared",
           "iter_documents", "load_tokenizer", "make_iterator", "masking_for", "prepare", "prepare_once",
           "read_index", "resolve_tokenizer", "token_bytes", "train_tokenizer"]


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
  if not epath.Path(index_path(cfg, workdir)).is_file():
    prepare(cfg, workdir)  # a fresh workdir; whether existing data still fits the config is
    # checked where data is made (train's prepare_once): a run's data is read as it was made
  from lmjax.data.loader import TokenIterator  # Grain is imported only when batches are needed
  return TokenIterator(cfg, workdir, split, process_rows, batch_size)
