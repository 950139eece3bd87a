"""Data: sources -> tokenizer -> prepared token shards -> global batches.

The loop only sees `make_iterator(cfg, workdir, split, ...)`: an iterator of int32 arrays of shape
[local_batch, seq_len + 1] (this process's rows of the global batch) with `get_state()` /
`set_state()` (JSON-serializable) so that its position is part of every checkpoint.
"""
from __future__ import annotations

from lmjax.data.synthetic import SyntheticIterator


def make_iterator(cfg, workdir: str, split: str = "train", process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None):
  batch_size = batch_size or cfg.train.batch_size
  if cfg.data.source == "synthetic":
    return SyntheticIterator(cfg.model.vocab_size, cfg.data.seq_len, batch_size, cfg.train.seed,
                             process_index, process_count, split)
  raise ValueError(f"data.source '{cfg.data.source}' is not supported yet.")
