"""Loader: prepared shards -> this process's rows of each global batch, as a Grain pipeline.

A split is one long token stream (its shards concatenated, documents separated by eos), cut into
windows of seq_len + 1 tokens with stride seq_len (GPT packing: windows span document boundaries;
inputs are window[:-1], targets window[1:], so no target is skipped between windows).

  window ids -> shuffle (train; reseeded every epoch) -> repeat -> global batches of B ids
             -> the rows this process's devices hold (sharding.process_rows), read from the memmaps
  -> prefetch threads

Every process builds the same global sequence of window ids and reads only the rows its devices
hold, so P processes together see exactly the batches of a 1-process run, on any mesh. Shards in
a bucket (gs://...) are memory-mapped from a copy on each host's disk (`workdir.local_copy`),
fetched once. The iterator's state is Grain's (the index of the next global batch), hence tiny,
JSON-serializable and independent of the process count.
The val split is read in order from its first window each time an iterator is made; it wraps around
(so any number of eval batches can be drawn; `batches_per_epoch` tells how many are distinct).
"""
from __future__ import annotations

import json
import os

import grain
import numpy as np

from lmjax import workdir as workdir_lib
from lmjax.data import mixture as mixture_lib
from lmjax.data.prepare import read_index
from lmjax.errors import ConfigError, DataError


class TokenWindows:
  """Random access to window i = tokens[i * seq_len : i * seq_len + seq_len + 1] of a split."""

  def __init__(self, paths: list[str], lengths: list[int], dtype: str, seq_len: int):
    self.shards = [np.memmap(p, dtype=dtype, mode="r", shape=(n,)) for p, n in zip(paths, lengths)]
    self.starts = np.cumsum([0] + list(lengths))  # shard k holds tokens [starts[k], starts[k+1])
    self.seq_len = seq_len
    self.num_windows = max(0, (int(self.starts[-1]) - 1) // seq_len)

  def __len__(self) -> int:
    return self.num_windows

  def read(self, start: int, length: int) -> np.ndarray:
    """Tokens [start, start + length) of the split, across shard boundaries."""
    out = np.empty(length, np.int32)
    k = int(np.searchsorted(self.starts, start, side="right")) - 1
    filled = 0
    while filled < length:
      offset = start + filled - int(self.starts[k])
      piece = self.shards[k][offset:offset + length - filled]
      out[filled:filled + len(piece)] = piece
      filled += len(piece)
      k += 1
    return out

  def __getitem__(self, window: int) -> np.ndarray:
    return self.read(int(window) * self.seq_len, self.seq_len + 1)

  def rows(self, windows: np.ndarray) -> np.ndarray:
    return np.stack([self[w] for w in windows])


def window_dataset(num_windows: int, batch_size: int, seed: int, shuffle: bool) -> grain.MapDataset:
  """The global batches of window ids: an endless MapDataset of int arrays [batch_size]."""
  ids = grain.MapDataset.range(num_windows)
  if shuffle:
    ids = ids.shuffle(seed=seed)  # a different permutation each epoch, fixed by the seed
  return ids.repeat().batch(batch_size, drop_remainder=True)


def split_windows(cfg, workdir: str, split: str) -> TokenWindows:
  """The windows of a prepared split, its shards memory-mapped (from a local copy of a bucket's)."""
  index = read_index(cfg, workdir)
  if split not in index["splits"]:
    raise DataError(f"No split '{split}' in the prepared data; use one of "
                    f"{sorted(index['splits'])}.")
  if cfg.model.vocab_size < index["vocab_size"]:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the prepared "
                      f"data's vocabulary ({index['vocab_size']}). Set --config.model.vocab_size="
                      f"{-(-index['vocab_size'] // 128) * 128}.")
  shards = index["splits"][split]["shards"]
  directory = workdir_lib.prepared_dir(cfg, workdir)
  version = json.dumps([index["fingerprint"], shards], sort_keys=True)
  windows = TokenWindows([workdir_lib.local_copy(os.path.join(directory, s["file"]), version)
                          for s in shards],
                         [s["tokens"] for s in shards], index["dtype"], cfg.data.seq_len)
  if not len(windows):
    raise DataError(f"The {split} split of '{directory}' has {index['splits'][split]['tokens']} "
                    f"tokens, fewer than one window of data.seq_len + 1 = "
                    f"{cfg.data.seq_len + 1}. Lower data.seq_len or prepare more data.")
  return windows


class TokenIterator:
  """Batches {"tokens": int32 [len(process_rows), seq_len + 1]}: rows `process_rows` of each
  global batch; same interface as SyntheticIterator."""

  def __init__(self, cfg, workdir: str, split: str = "train", process_rows=None,
               batch_size: int | None = None):
    batch_size = batch_size or cfg.train.batch_size
    self.windows = split_windows(cfg, workdir, split)
    self.split, self.batch_size, self.seed = split, batch_size, cfg.train.seed
    self.batches_per_epoch = max(1, len(self.windows) // batch_size)
    rows = slice(None) if process_rows is None else np.asarray(process_rows)
    batches = window_dataset(len(self.windows), batch_size, cfg.train.seed, split == "train")
    batches = batches.map(lambda ids: {"tokens": self.windows.rows(ids[rows])})
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, cfg.data.prefetch))
    self._iterator = iter(batches.to_iter_dataset(options))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "split": self.split,
            "batch_size": self.batch_size, "num_windows": len(self.windows), "seed": self.seed}

  def set_state(self, state: dict) -> None:
    saved = (state["split"], state["batch_size"], state["num_windows"])
    if saved != (self.split, self.batch_size, len(self.windows)):
      now = (self.split, self.batch_size, len(self.windows))
      raise ConfigError(f"The saved data position is for (split, global batch size, windows) = "
                        f"{saved}, but this iterator has {now}. Resume with the same "
                        "train.batch_size, data.seq_len and prepared data.")
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    self._iterator.close()


class MixtureIterator:
  """The batches of a weighted mixture (data.mixture; mixture.py): global row i is window
  `local` of source `source` (mixture.Schedule), each source's windows shuffled per epoch (train)
  or in order (val). Same interface as TokenIterator; `log_counts(state)` gives the tokens each
  source has given up to a data position, for the training log."""

  def __init__(self, cfg, workdir: str, split: str = "train", process_rows=None,
               batch_size: int | None = None):
    entries = mixture_lib.parse(cfg.data.mixture)
    self.names = [name for name, _, _ in entries]
    self.weights = [weight for _, weight, _ in entries]
    self.windows = [split_windows(mixture_lib.source_config(cfg, workdir, name), workdir, split)
                    for name in self.names]
    self.split, self.batch_size, self.seed = split, batch_size or cfg.train.batch_size, cfg.train.seed
    self.seq_len = cfg.data.seq_len
    self.schedule = mixture_lib.Schedule(self.weights, cfg.train.seed)
    self.orders = [grain.MapDataset.range(len(w)).shuffle(seed=cfg.train.seed + 7919 * (s + 1))
                   .repeat() if split == "train" else grain.MapDataset.range(len(w)).repeat()
                   for s, w in enumerate(self.windows)]
    rows = np.arange(self.batch_size) if process_rows is None else np.asarray(process_rows)
    batches = grain.MapDataset.range(np.iinfo(np.int64).max // self.batch_size).map(
        lambda k: {"tokens": self._rows(k * self.batch_size + rows)})
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, cfg.data.prefetch))
    self._iterator = iter(batches.to_iter_dataset(options))

  def _rows(self, rows: np.ndarray) -> np.ndarray:
    sources, local = self.schedule.lookup(rows)
    return np.stack([self.windows[s][self.orders[s][int(j)]] for s, j in zip(sources, local)])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def _identity(self) -> list:
    return [[n, w, len(x)] for n, w, x in zip(self.names, self.weights, self.windows)]

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "split": self.split,
            "batch_size": self.batch_size, "mixture": self._identity(), "seed": self.seed}

  def set_state(self, state: dict) -> None:
    saved = (state["split"], state["batch_size"], state.get("mixture"))
    now = (self.split, self.batch_size, self._identity())
    if saved != now:
      raise ConfigError(f"The saved data position is for (split, global batch size, [source, "
                        f"weight, windows]) = {saved}, but this mixture has {now}. Resume with "
                        "the same data.mixture, train.batch_size, data.seq_len and prepared data.")
    self._iterator.set_state(state["grain"])

  def log_counts(self, state: dict) -> dict:
    """{"tokens_NAME": tokens of source NAME in the batches before the position `state`}."""
    rows = self.schedule.rows_per_source(state["grain"]["next_index"] * self.batch_size)
    return {f"tokens_{name}": int(n) * self.seq_len for name, n in zip(self.names, rows)}

  def close(self) -> None:
    self._iterator.close()
