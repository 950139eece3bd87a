"""Weighted mixtures of sources: data.mixture = "NAME:WEIGHT:SOURCE,NAME:WEIGHT:SOURCE,...".

  <prepared_dir>/tokenizer.model   one tokenizer for every source (trained on each source's
                                   training documents in proportion to its weight, or data.tokenizer)
  <prepared_dir>/NAME/             each source prepared on its own (prepare.py: its index.json
                                   records the tokenizer's checksum, which loading checks)

Interleaving: global row i of the training stream belongs to block i // BLOCK_ROWS; every block
holds each source's share of BLOCK_ROWS rows exactly (weights rounded by largest remainder) in an
order drawn from (train.seed, block), and the k-th row of source s in the stream is window k of
s's own shuffled, epoch-repeated windows. Row i's (source, window) is a pure function of i, so the
data position stays the index of the next global batch (resumes exactly, on any process count),
and the rows each source has given up to any step are known (`rows_per_source`).
"""
from __future__ import annotations

import functools
import os

from ml_collections import ConfigDict
import numpy as np

from lmjax import distributed
from lmjax import workdir as workdir_lib
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.data.prepare import prepare as prepare_source, prepare_once as prepare_source_once
from lmjax.config import parse_mixture as parse  # NAME:WEIGHT:SOURCE,... -> entries

BLOCK_ROWS = 1024


def source_config(cfg, workdir: str, name: str):
  """The config of one source of the mixture: its source, its own prepared dir, the mixture's
  tokenizer (every source's shards are made with it and checked against its checksum)."""
  sources = {n: s for n, _, s in parse(cfg.data.mixture)}
  out = ConfigDict(cfg.to_dict())
  directory = workdir_lib.prepared_dir(cfg, workdir)
  out.data.update(source=sources[name], mixture="",
                  prepared_dir=workdir_lib.absolute(os.path.join(directory, name)),
                  tokenizer=workdir_lib.absolute(workdir_lib.tokenizer_path(cfg, workdir)))
  return out


def counts_per_block(weights: list[float], block: int = BLOCK_ROWS) -> np.ndarray:
  """Rows of each source in a block: weight x block, rounded so that they sum to the block (the
  largest remainders round up; every source with weight > 0 gets at least one row)."""
  exact = np.asarray(weights) * block
  counts = np.maximum(np.floor(exact).astype(np.int64), 1)
  while counts.sum() > block:
    counts[np.argmax(counts)] -= 1
  order = np.argsort(-(exact - np.floor(exact)), kind="stable")
  for s in order[:block - counts.sum()]:
    counts[s] += 1
  return counts


class Schedule:
  """Global row -> (source, the source's own row index), by block, deterministic in the seed."""

  def __init__(self, weights: list[float], seed: int, block: int = BLOCK_ROWS):
    self.counts, self.seed, self.block = counts_per_block(weights, block), seed, block
    self.labels = np.repeat(np.arange(len(weights)), self.counts)

  @functools.lru_cache(maxsize=8)
  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each row of block b, that row's rank among its source's rows in the block)."""
    order = self.labels[np.random.default_rng([self.seed, b]).permutation(self.block)]
    rank = np.empty(self.block, np.int64)
    for s in range(len(self.counts)):
      rank[order == s] = np.arange(self.counts[s])
    return order, rank

  def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, source-local index) of global rows."""
    rows = np.asarray(rows, np.int64)
    blocks, within = rows // self.block, rows % self.block
    sources, local = np.empty_like(rows), np.empty_like(rows)
    for b in np.unique(blocks):
      at = blocks == b
      order, rank = self._block(int(b))
      sources[at] = order[within[at]]
      local[at] = b * self.counts[sources[at]] + rank[within[at]]
    return sources, local

  def rows_per_source(self, num_rows: int) -> np.ndarray:
    """How many of the first `num_rows` global rows each source gave."""
    full, rest = divmod(int(num_rows), self.block)
    out = full * self.counts
    if rest:
      out = out + np.bincount(self._block(full)[0][:rest], minlength=len(self.counts))
    return out


def prepare(cfg, workdir: str, once: bool = False) -> dict:
  """The mixture's tokenizer (trained once, on process 0 with `once`), then each source's shards
  (prepare.prepare / prepare_once of its source_config); returns the combined index."""
  train_tokenizer = lambda: tokenizer_lib.resolve_tokenizer(cfg, workdir)
  if once:
    distributed.share_from_process_0(train_tokenizer, "mixture-tokenizer")
  else:
    train_tokenizer()
  make = prepare_source_once if once else prepare_source
  return combined_index(cfg, {name: make(source_config(cfg, workdir, name), workdir)
                              for name, _, _ in parse(cfg.data.mixture)})


def combined_index(cfg, indexes: dict) -> dict:
  """The sources' indexes, and each split's totals over them."""
  first = next(iter(indexes.values()))
  splits = {split: {k: sum(index["splits"][split][k] for index in indexes.values())
                    for k in ("tokens", "documents", "bytes")} for split in first["splits"]}
  return {"version": 1, "mixture": cfg.data.mixture, "tokenizer": first["tokenizer"],
          "vocab_size": first["vocab_size"], "eos_id": first["eos_id"], "dtype": first["dtype"],
          "splits": splits, "sources": indexes}

