"""Fine-tuning data: examples (.jsonl, .parquet or an Arrow dataset; a record a line or row) ->
fixed rows of data.seq_len, held in memory.

  sft             {"prompt": str, "response": str}, or {"messages": [{"role": str, "content": str},
                  ...]}. Tokens: prompt, response, eos; a conversation is written by the
                  tokenizer's chat template (data/chat.py), else "ROLE: CONTENT\\n" for each
                  message, except that assistant turns are "assistant: " CONTENT eos. The loss
                  is on response (assistant) tokens (the template's end of turn, or eos) only. Examples are packed into
                  rows of data.seq_len (best-fit decreasing); each keeps its own positions (from 0)
                  and attends only within itself (segment ids), so packing changes no example's
                  loss. Tokens past seq_len + 1 are cut.
  classification  {"text": str, "label": int or str}. Tokens: text cut to seq_len - 1 (counted:
                  stats' "truncated"), eos.
  dpo             {"prompt": str or messages, "chosen": str, "rejected": str}. Each side is
                  an SFT example (prompt, response, eos; the loss's tokens are the response's);
                  a pair's two sides are packed into one row as consecutive segments (chosen
                  first), each cut to data.seq_len // 2 + 1 tokens.

finetune.val_fraction of the examples (drawn by train.seed) are held out; `eval_batches` yields
every held-out row once.
"""
from __future__ import annotations

import bisect
import dataclasses
import json

import numpy as np
from etils import epath

from lmjax.data import chat, sources
from lmjax.data.tokenizer import load_tokenizer
from lmjax.errors import ConfigError, DataError


def read_records(path: str) -> list[tuple[str, dict]]:
  """finetune.data's examples as [(where, record)], where names the file and line or row for
  error messages: a .jsonl file, a .parquet file, or an Arrow dataset (a `datasets.save_to_disk`
  directory or an .arrow file), the tables read a record batch at a time."""
  if path.endswith(".parquet") or path.endswith(".arrow") or epath.Path(path).is_dir():
    files = [path] if path.endswith(".parquet") else sources.table_files("arrow", path)
    records = [(f"{f}, row {row}", record) for f in files
               for row, record in enumerate(sources.table_records(f))]
    if not records:
      raise DataError(f"finetune.data={path} holds no examples.")
    return records
  return read_jsonl(path)


def read_jsonl(path: str) -> list[tuple[str, dict]]:
  """[(where, record)] with where = 'path:line', for error messages."""
  records = []
  with epath.Path(path).open() as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); finetune.data must hold one JSON "
                        "object a line.") from None
      if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
      records.append((where, record))
  if not records:
    raise DataError(f"finetune.data={path} holds no examples.")
  return records


def sft_segments(record: dict, where: str, tokenizer) -> tuple[list[tuple[str, bool]], bool]:
  """An SFT example as (text, is_response) pieces, and whether eos follows every response piece
  (not where the tokenizer's chat template ends the turn itself)."""
  if "messages" in record:
    return chat.pieces(tokenizer, record["messages"], where), not tokenizer.chat_template
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    return [(record["prompt"], False), (record["response"], True)], True
  raise DataError(f"{where}: an SFT example needs \"prompt\" and \"response\" strings, or "
                  "\"messages\": [{\"role\": ..., \"content\": ...}, ...]; this one has keys "
                  f"{sorted(record)}.")


def sft_tokens(pieces: list[tuple[str, bool]], tokenizer,
               eos_after_response: bool = True) -> tuple[list[int], list[bool]]:
  ids, is_target = [], []
  for (text, response), piece_ids in zip(pieces, tokenizer.encode([t for t, _ in pieces])):
    piece_ids = list(piece_ids) + ([tokenizer.eos_id] if response and eos_after_response else [])
    ids += piece_ids
    is_target += [response] * len(piece_ids)
  return ids, is_target


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
  """Indices of `lengths` grouped into bins of `capacity`, longest first into the fullest bin
  that holds it (best-fit decreasing)."""
  bins: list[list[int]] = []
  free: list[tuple[int, int]] = []  # sorted (room left, bin)
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    j = bisect.bisect_left(free, (lengths[i], -1))
    if j < len(free):
      room, b = free.pop(j)
      bins[b].append(i)
    else:
      room, b = capacity, len(bins)
      bins.append([i])
    bisect.insort(free, (room - lengths[i], b))
  return bins


def pack_sft(examples: list[tuple[list[int], list[bool]]], seq_len: int) -> tuple[dict, dict]:
  """Examples (ids, is_target) -> rows {inputs, targets, weights, positions, segments} [R, T]
  (segments: 1, 2, ... per example in a row, 0 for padding), and counts."""
  return pack([[example] for example in examples], seq_len, seq_len + 1)


def pack(units: list[list[tuple[list[int], list[bool]]]], seq_len: int,
         cap: int) -> tuple[dict, dict]:
  """Units of sequences (ids, is_target), each unit kept in one row (a preference pair: its
  chosen and rejected sequences), each sequence cut to `cap` tokens and its own segment. A unit
  with a sequence that has nothing left to predict is dropped."""
  kept, truncated, dropped = [], 0, 0
  for unit in units:
    truncated += any(len(ids) > cap for ids, _ in unit)
    unit = [(ids[:cap], is_target[:cap]) for ids, is_target in unit]
    if not all(any(is_target[1:]) for _, is_target in unit):  # nothing left to predict
      dropped += 1
      continue
    kept.append(unit)
  bins = best_fit([sum(len(ids) - 1 for ids, _ in unit) for unit in kept], seq_len)
  shape = (len(bins), seq_len)
  rows = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
          "weights": np.zeros(shape, np.float32), "positions": np.zeros(shape, np.int32),
          "segments": np.zeros(shape, np.int32)}
  for r, members in enumerate(bins):
    start, segment = 0, 0
    for ids, is_target in (sequence for i in members for sequence in kept[i]):
      segment += 1
      n, span = len(ids) - 1, slice(start, start + len(ids) - 1)
      rows["inputs"][r, span], rows["targets"][r, span] = ids[:-1], ids[1:]
      rows["weights"][r, span] = is_target[1:]
      rows["positions"][r, span], rows["segments"][r, span] = np.arange(n), segment
      start += n
  return rows, {"examples": len(kept), "truncated": truncated, "dropped": dropped,
                "rows": len(bins), "target_tokens": int(rows["weights"].sum()),
                "max_segments": int(rows["segments"].max(initial=0))}


PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def preference_pair(record: dict, where: str, tokenizer) -> list[tuple[list[int], list[bool]]]:
  """A preference example -> [chosen, rejected] as (ids, is_target): the prompt, then the
  response (the target) and eos. The prompt is a string or a conversation (messages, written by
  the chat template, the response as the assistant's turn); a response is a string or one
  assistant message."""
  missing = [k for k in PREFERENCE_KEYS if k not in record]
  if missing:
    raise DataError(f"{where}: a preference example needs \"prompt\", \"chosen\" and "
                    f"\"rejected\"; this one lacks {', '.join(missing)} (keys: {sorted(record)}).")
  responses = []
  for key in ("chosen", "rejected"):
    value = record[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
      value = value[0].get("content")
    if not isinstance(value, str) or not value:
      raise DataError(f"{where}: \"{key}\" must be a non-empty string (or one assistant "
                      f"message), got {record[key]!r:.80}.")
    responses.append(value)
  if responses[0] == responses[1]:
    raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same response, so the pair "
                    "prefers nothing; fix or remove it.")
  prompt = record["prompt"]
  if isinstance(prompt, list):
    sides = [chat.pieces(tokenizer, prompt + [{"role": "assistant", "content": r}], where)
             for r in responses]
    return [sft_tokens(pieces, tokenizer, not tokenizer.chat_template) for pieces in sides]
  if not isinstance(prompt, str):
    raise DataError(f"{where}: \"prompt\" must be a string or a list of messages.")
  return [sft_tokens([(prompt, False), (r, True)], tokenizer) for r in responses]


def classification_labels(records, num_classes: int) -> tuple[list[int], list[str]]:
  """Label ids and class names: ints are ids themselves; strings are sorted into ids."""
  for where, record in records:
    if not isinstance(record.get("text"), str) or "label" not in record:
      raise DataError(f"{where}: a classification example needs a \"text\" string and a "
                      f"\"label\" (int or string); this one has keys {sorted(record)}.")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
      raise DataError(f"{where}: \"label\" must be an int or a string, got {label!r}.")
  labels = [record["label"] for _, record in records]
  if all(isinstance(x, int) for x in labels):
    if min(labels) < 0:
      raise DataError(f"Integer labels must be >= 0, got {min(labels)}.")
    names = [str(i) for i in range(num_classes or max(labels) + 1)]
    ids = labels
  elif all(isinstance(x, str) for x in labels):
    names = sorted(set(labels))
    names += [f"class_{i}" for i in range(len(names), num_classes)]
    ids = [names.index(x) for x in labels]
  else:
    raise DataError("Labels mix ints and strings; use one kind.")
  if max(ids) >= len(names):
    raise ConfigError(f"finetune.num_classes={num_classes}, but the data has label "
                      f"{max(labels)!r}: there are at least {max(ids) + 1} classes.")
  if len(names) < 2:
    raise DataError(f"Classification needs at least 2 classes; the data has {names}.")
  return ids, names


def encode_classification(texts: list[str], tokenizer, seq_len: int) -> dict:
  """Rows {inputs, positions, segments (1 = token, 0 = pad)} [N, T] of text + eos, and
  "truncated" [N] (bool: the text was cut to fit)."""
  eos = tokenizer.eos_id
  rows = {"inputs": np.zeros((len(texts), seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                       (len(texts), seq_len)).copy(),
          "segments": np.zeros((len(texts), seq_len), np.int32),
          "truncated": np.zeros(len(texts), bool)}
  room = seq_len - 1 if eos >= 0 else seq_len
  for i, ids in enumerate(tokenizer.encode(list(texts))):
    rows["truncated"][i] = len(ids) > room
    ids = (list(ids)[:seq_len - 1] + [eos]) if eos >= 0 else (list(ids)[:seq_len] or [0])
    rows["inputs"][i, :len(ids)], rows["segments"][i, :len(ids)] = ids, 1
  return rows


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) example indices: a permutation by `seed`, its first share held out."""
  order = np.random.default_rng(seed).permutation(n)
  num_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
  if n - num_val < 1:
    raise ConfigError(f"finetune.data has {n} examples: too few to hold out "
                      f"finetune.val_fraction={val_fraction} and still train.")
  return np.sort(order[num_val:]), np.sort(order[:num_val])


@dataclasses.dataclass
class TaskData:
  train: dict  # rows: name -> array [N, ...]
  val: dict | None
  stats: dict
  labels: list[str] | None = None  # classification: class names


def load_task_data(cfg) -> TaskData:
  f = cfg.finetune
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  records = read_records(f.data)
  train_idx, val_idx = split_indices(len(records), f.val_fraction, cfg.train.seed)
  if f.task in ("sft", "dpo"):
    if tokenizer.eos_id < 0:
      raise DataError(f"The tokenizer {cfg.data.tokenizer} has no eos piece, which {f.task} "
                      "appends to every response (to know when to stop).")
    if f.task == "sft":
      units = []
      for where, record in records:
        pieces, eos_after_response = sft_segments(record, where, tokenizer)
        units.append([sft_tokens(pieces, tokenizer, eos_after_response)])
      cap = cfg.data.seq_len + 1
    else:  # a pair's two sides share a row
      units = [preference_pair(record, where, tokenizer) for where, record in records]
      cap = cfg.data.seq_len // 2 + 1
    train, stats = pack([units[i] for i in train_idx], cfg.data.seq_len, cap)
    val, val_stats = pack([units[i] for i in val_idx], cfg.data.seq_len, cap) if len(
        val_idx) else (None, {})
    if not stats["examples"]:
      raise ConfigError(f"No training example of {f.data} has a response token within "
                        f"{cap} tokens (data.seq_len={cfg.data.seq_len}); raise data.seq_len.")
    stats = {"train": stats, "val": val_stats,
             "max_segments": max(stats["max_segments"], val_stats.get("max_segments", 0))}
    return TaskData(train, val if val_stats.get("examples") else None, stats)
  ids, names = classification_labels(records, f.num_classes)
  rows = encode_classification([record["text"] for _, record in records], tokenizer,
                               cfg.data.seq_len)
  rows["labels"] = np.asarray(ids, np.int32)
  rows["valid"] = np.ones(len(ids), np.float32)
  truncated = rows.pop("truncated")
  take = lambda idx: {k: v[idx] for k, v in rows.items()}
  stats = {"train": {"examples": len(train_idx), "truncated": int(truncated[train_idx].sum())},
           "val": {"examples": len(val_idx), "truncated": int(truncated[val_idx].sum())},
           "classes": len(names)}
  return TaskData(take(train_idx), take(val_idx) if len(val_idx) else None, stats, names)


class RowIterator:
  """This process's `process_rows` (None: all) of global batches of rows, shuffled and reshuffled
  every epoch by the
  seed: the loader's Grain pipeline over row ids (state: the next batch's index)."""

  def __init__(self, rows: dict, batch_size: int, seed: int, process_rows=None):
    import grain

    from lmjax.data.loader import window_dataset
    self.num_rows, self.batch_size = len(rows["inputs"]), batch_size
    mine = slice(None) if process_rows is None else np.asarray(process_rows)
    batches = window_dataset(self.num_rows, batch_size, seed, shuffle=True)
    batches = batches.map(lambda ids: {k: v[ids[mine]] for k, v in rows.items()})
    self._iterator = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                                     prefetch_buffer_size=2)))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "rows": self.num_rows,
            "batch_size": self.batch_size}

  def set_state(self, state: dict) -> None:
    if (state.get("rows"), state.get("batch_size")) != (self.num_rows, self.batch_size):
      raise ConfigError(f"The checkpoint's data position is for {state.get('rows')} rows in "
                        f"batches of {state.get('batch_size')}, but finetune.data now makes "
                        f"{self.num_rows} rows in batches of {self.batch_size}: the data, "
                        "data.seq_len or train.batch_size changed. Resume with the same ones, or "
                        "use a new --workdir.")
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    self._iterator.close()


def eval_batches(rows: dict, batch_size: int, process_rows=None):
  """Every row once, in order, in global batches (the last filled with empty rows, which weigh
  nothing); this process's `process_rows` of each (None: all)."""
  n = len(rows["inputs"])
  pad = -n % batch_size
  rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
  mine = np.arange(batch_size) if process_rows is None else np.asarray(process_rows)
  for start in range(0, n + pad, batch_size):
    yield {k: v[start + mine] for k, v in rows.items()}
