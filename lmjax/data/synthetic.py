"""Deterministic synthetic tokens with structure a model can learn (so a falling loss means something).

Each sequence follows a fixed random permutation of the vocabulary (token t is followed by perm[t])
with 10% random tokens mixed in. Batch i is a pure function of (seed, i), so the iterator's whole
state is the batch index. Batches are {"tokens": int32 [local batch, seq_len + 1]}.
"""
from __future__ import annotations

import numpy as np



class SyntheticIterator:

  def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int,
               process_rows=None, split: str = "train"):
    self.vocab_size, self.seq_len = vocab_size, seq_len
    self.rows = np.arange(batch_size) if process_rows is None else np.asarray(process_rows)
    self.seed = seed + (0 if split == "train" else 1_000_003)
    self.perm = np.random.default_rng(seed).permutation(vocab_size)  # same law for train and val
    self.index = 0

  def _row(self, batch_index: int, row: int) -> np.ndarray:
    rng = np.random.default_rng((self.seed, batch_index, row))
    out = np.empty(self.seq_len + 1, np.int32)
    out[0] = rng.integers(self.vocab_size)
    noise = rng.random(self.seq_len) < 0.1
    random_tokens = rng.integers(self.vocab_size, size=self.seq_len)
    for t in range(self.seq_len):
      out[t + 1] = random_tokens[t] if noise[t] else self.perm[out[t]]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [self._row(self.index, int(r)) for r in self.rows]
    self.index += 1
    return {"tokens": np.stack(rows)}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])

  def close(self) -> None:
    pass
