"""Fine-tuning a trained or converted run: supervised fine-tuning (SFT) and sequence classification,
full or LoRA.

  lmjax finetune --config=FILE --workdir=OUT --init=RUN

The model (every key but model.{dropout,dtype,remat,attention}), the tokenizer, the data section
(for `lmjax eval` of the result) and the training objective come from the --init run's config.json
and its latest checkpoint (params only); the config file gives finetune.*, train.* (steps, batch
size, ...), optim.*, mesh.* and data.seq_len. The loop is `train.run_loop`: checkpoints, resume by
rerunning the command, Ctrl-C / SIGTERM, metrics.jsonl and TensorBoard, as for `lmjax train`.

finetune.data holds one JSON object a line; finetune.val_fraction of the examples (drawn by
train.seed) are held out and evaluated whole every train.eval_every steps and at the end.

  sft             {"prompt": str, "response": str}, or {"messages": [{"role": str, "content": str},
                  ...]}. Tokens: prompt, response, eos; a conversation is "ROLE: CONTENT\\n" for
                  each message, except that assistant turns are "assistant: " CONTENT eos. The loss
                  is on response (assistant) tokens and their eos only. Examples are packed into
                  rows of data.seq_len (best-fit decreasing); each keeps its own positions (from 0)
                  and attends only within itself (segment ids), so packing changes no example's
                  loss. Tokens past seq_len + 1 are cut.
  classification  {"text": str, "label": int or str}. Tokens: text cut to seq_len - 1, eos. A
                  linear head on the final hidden states, pooled (finetune.pooling: last = the eos,
                  for decoders; mean or first = over / at the start of the tokens, for encoders),
                  predicts the label. Reports loss, accuracy and macro-F1 on the held-out examples.

LoRA (finetune.lora_rank > 0): the projections named in finetune.lora_targets compute
W x + (x A) B * lora_alpha / lora_rank with A random (uniform, +-1/sqrt(fan in)) and B zero, so the
first step starts from exactly the base model; only A, B (and the head) train: the base has no
gradients and no optimizer state.

OUT holds
  config.json, metrics.jsonl, events.*  as any run
  finetune/checkpoints/STEP             the fine-tuning state: base, adapters, head, optimizer
                                        state, data position
  checkpoints/STEP                      written when training finishes: the final params with the
                                        adapters merged (W + A B scale) as a plain lmjax run, for
                                        `lmjax eval`, `lmjax generate`, `lmjax convert --to_hf`
  classifier.npz                        classification: the head, label names and pooling
                                        (`load_classifier`)
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import sharding as sharding_lib
from lmjax import train as train_lib
from lmjax.config import ConfigError
from lmjax.hf import flatten, unflatten
from lmjax.model import ModelConfig, Transformer
from lmjax.optim import learning_rate_schedule, make_optimizer

RUNTIME_MODEL_KEYS = ("dropout", "dtype", "remat", "attention")  # how it runs, not what it is
# train.* keys that belong to the fine-tuning loop; the others (the objective) come from --init
LOOP_TRAIN_KEYS = ("steps", "batch_size", "seed", "log_every", "eval_every", "eval_batches",
                   "checkpoint_every", "keep_checkpoints", "sample_prompt")
LORA_IN_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1}
STATE_DIR = "finetune"  # OUT/finetune/checkpoints
CLASSIFIER_FILE = "classifier.npz"


# ---------------------------------------------------------------------------------------------
# Config: the user's sections around the --init run's model.


def _abs(path: str) -> str:
  return path if not path or "://" in path else os.path.abspath(path)


def _has_checkpoint(workdir: str) -> bool:  # without orbax: no JAX before distributed init
  directory = epath.Path(ckpt_lib.checkpoint_dir(workdir))
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def _init_tokenizer(init_cfg, init: str) -> str:
  path = init_cfg.data.tokenizer or os.path.join(data_lib.prepared_dir(init_cfg, init),
                                                 "tokenizer.model")
  return _abs(path) if os.path.isfile(path) else ""


def resolve_config(spec: str | None, workdir: str, init: str | None = None, overrides=()):
  """`lmjax finetune`'s config: --config (or, to resume, WORKDIR/config.json) and `a.b=v`
  overrides, around the --init run's model, tokenizer and data. Raises ConfigError (nothing is
  read but configs and the jsonl's existence)."""
  if spec:
    cfg = config_lib.default_config()  # finalized once, with the init's model (its max_len...)
    file_cfg = config_lib.load_config_file(spec)
    config_lib.validate_against_schema(file_cfg, where=spec.partition(":")[0])
    cfg.update(file_cfg)
    cfg = config_lib.apply_overrides(cfg, overrides)
  elif (epath.Path(workdir) / "config.json").exists():
    cfg = config_lib.apply_overrides(config_lib.from_json(
        (epath.Path(workdir) / "config.json").read_text()), overrides)
    cfg.distributed = config_lib.default_config().distributed
  else:
    raise ConfigError("lmjax finetune needs --config=FILE.py[:VARIANT] (or a --workdir that holds "
                      "a fine-tuning run's config.json, to resume it).")
  if init:
    cfg.finetune.init = init
  return with_init(cfg, workdir, overrides)


def with_init(cfg, workdir: str, overrides=()):
  """`cfg` with the model, tokenizer, data and objective of the run in cfg.finetune.init."""
  f = cfg.finetune
  if not f.init:
    raise ConfigError("lmjax finetune needs --init=RUN_DIR: the workdir of a `lmjax train` run or "
                      "of `lmjax convert --from_hf`, whose latest checkpoint fine-tuning starts "
                      "from.")
  init = _abs(f.init)
  if init == _abs(workdir):
    raise ConfigError(f"--workdir and --init are the same directory ({init}); fine-tune into a "
                      "new --workdir (the --init run is only read).")
  if not (epath.Path(init) / "config.json").exists():
    raise ConfigError(f"--init={f.init}: no run there ({init}/config.json is missing). Pass the "
                      "workdir of a `lmjax train` run or of `lmjax convert --from_hf`.")
  init_cfg = train_lib.load_config(init)
  if not _has_checkpoint(init):
    raise ConfigError(f"--init={f.init} has no checkpoint in {ckpt_lib.checkpoint_dir(init)}: "
                      "train it first, or import one with `lmjax convert --from_hf`.")
  on_command_line = {o.split("=", 1)[0] for o in overrides}
  fixed = [f"model.{k}={cfg.model[k]!r} (--init has {init_cfg.model[k]!r})"
           for k in init_cfg.model if k not in RUNTIME_MODEL_KEYS and
           f"model.{k}" in on_command_line and cfg.model[k] != init_cfg.model[k]]
  if fixed:
    raise ConfigError(f"Fine-tuning keeps the --init run's model; drop {', '.join(fixed)}. Only "
                      f"model.{{{','.join(RUNTIME_MODEL_KEYS)}}} may change.")

  out = config_lib.ConfigDict(cfg.to_dict())
  default_model = config_lib.default_config().model
  model = init_cfg.model.to_dict()
  for k in RUNTIME_MODEL_KEYS:  # the config's own choice (file or command line), else --init's
    if f"model.{k}" in on_command_line or cfg.model[k] != default_model[k]:
      model[k] = cfg.model[k]
  out.model = config_lib.ConfigDict(model)
  for k in init_cfg.train:
    if k not in LOOP_TRAIN_KEYS:
      out.train[k] = init_cfg.train[k]
  out.train.sample_prompt = ""

  init_tokenizer = _init_tokenizer(init_cfg, init)
  tokenizer = _abs(cfg.data.tokenizer) or init_tokenizer
  if not tokenizer:
    raise ConfigError(f"The --init run ({init}) has no SentencePiece tokenizer (it trained on "
                      "synthetic tokens, or was imported without a tokenizer.model): set "
                      "--config.data.tokenizer=PATH.model to the tokenizer its vocabulary means.")
  data = init_cfg.data.to_dict()  # `lmjax eval` of the result: the --init run's corpus
  data.update(seq_len=cfg.data.seq_len, tokenizer=tokenizer, prepared_dir="")
  init_prepared = data_lib.prepared_dir(init_cfg, init)
  if tokenizer == init_tokenizer and os.path.isfile(os.path.join(init_prepared, "index.json")):
    data["prepared_dir"] = _abs(init_prepared)  # read its shards (never written: same data)
  out.data = config_lib.ConfigDict(data)
  out.finetune.init = init
  out.finetune.data = _abs(f.data)
  out = config_lib.finalize(out)

  if not out.finetune.data:
    raise ConfigError("finetune.data is empty: set --config.finetune.data=PATH.jsonl.")
  if not epath.Path(out.finetune.data).exists():
    raise ConfigError(f"finetune.data={out.finetune.data} does not exist.")
  if out.finetune.task == "sft" and not out.model.get("causal", True):
    raise ConfigError(f"finetune.task=sft needs a causal LM, but the --init run ({init}) is a "
                      "bidirectional encoder (model.causal=False); use finetune.task="
                      "classification.")
  try:
    size = data_lib.load_tokenizer(tokenizer).get_piece_size()
  except (ValueError, OSError, RuntimeError) as e:
    raise ConfigError(f"Cannot load the tokenizer {tokenizer}: {e}") from None
  if size > out.model.vocab_size:
    raise ConfigError(f"Vocabulary mismatch: the tokenizer {tokenizer} has {size} pieces but the "
                      f"--init model has model.vocab_size={out.model.vocab_size}. Use the "
                      "tokenizer the --init run was trained with (data.tokenizer).")
  return out


# ---------------------------------------------------------------------------------------------
# Data: jsonl -> examples -> fixed rows of data.seq_len (in memory).


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
        raise ConfigError(f"{where}: not valid JSON ({e.msg}); finetune.data must hold one JSON "
                          "object a line.") from None
      if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}.")
      records.append((where, record))
  if not records:
    raise ConfigError(f"finetune.data={path} holds no examples.")
  return records


def sft_segments(record: dict, where: str) -> list[tuple[str, bool]]:
  """An SFT example as (text, is_response) pieces; every response piece is followed by eos."""
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", "
                        "\"content\"}} objects.")
    pieces = []
    for m in messages:
      if not (isinstance(m, dict) and isinstance(m.get("role"), str) and
              isinstance(m.get("content"), str)):
        raise ConfigError(f"{where}: every message needs \"role\" and \"content\" strings; got "
                          f"{json.dumps(m)[:80]}.")
      if m["role"] == "assistant":
        pieces += [("assistant: ", False), (m["content"], True)]
      else:
        pieces.append((f"{m['role']}: {m['content']}\n", False))
    if not any(is_response for _, is_response in pieces):
      raise ConfigError(f"{where}: the conversation has no assistant message to learn.")
    return pieces
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    return [(record["prompt"], False), (record["response"], True)]
  raise ConfigError(f"{where}: an SFT example needs \"prompt\" and \"response\" strings, or "
                    "\"messages\": [{\"role\": ..., \"content\": ...}, ...]; this one has keys "
                    f"{sorted(record)}.")


def sft_tokens(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
  ids, is_target = [], []
  for (text, response), piece_ids in zip(pieces, tokenizer.encode([t for t, _ in pieces])):
    piece_ids = list(piece_ids) + ([tokenizer.eos_id()] if response else [])
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
  kept, truncated, dropped = [], 0, 0
  for ids, is_target in examples:
    if len(ids) > seq_len + 1:
      ids, is_target, truncated = ids[:seq_len + 1], is_target[:seq_len + 1], truncated + 1
    if not any(is_target[1:]):  # nothing left to predict
      dropped += 1
      continue
    kept.append((ids, is_target))
  bins = best_fit([len(ids) - 1 for ids, _ in kept], seq_len)
  shape = (len(bins), seq_len)
  rows = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
          "weights": np.zeros(shape, np.float32), "positions": np.zeros(shape, np.int32),
          "segments": np.zeros(shape, np.int32)}
  for r, members in enumerate(bins):
    start = 0
    for segment, i in enumerate(members, 1):
      ids, is_target = kept[i]
      n, span = len(ids) - 1, slice(start, start + len(ids) - 1)
      rows["inputs"][r, span], rows["targets"][r, span] = ids[:-1], ids[1:]
      rows["weights"][r, span] = is_target[1:]
      rows["positions"][r, span], rows["segments"][r, span] = np.arange(n), segment
      start += n
  return rows, {"examples": len(kept), "truncated": truncated, "dropped": dropped,
                "rows": len(bins), "target_tokens": int(rows["weights"].sum())}


def classification_labels(records, num_classes: int) -> tuple[list[int], list[str]]:
  """Label ids and class names: ints are ids themselves; strings are sorted into ids."""
  for where, record in records:
    if not isinstance(record.get("text"), str) or "label" not in record:
      raise ConfigError(f"{where}: a classification example needs a \"text\" string and a "
                        f"\"label\" (int or string); this one has keys {sorted(record)}.")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
      raise ConfigError(f"{where}: \"label\" must be an int or a string, got {label!r}.")
  labels = [record["label"] for _, record in records]
  if all(isinstance(x, int) for x in labels):
    if min(labels) < 0:
      raise ConfigError(f"Integer labels must be >= 0, got {min(labels)}.")
    names = [str(i) for i in range(num_classes or max(labels) + 1)]
    ids = labels
  elif all(isinstance(x, str) for x in labels):
    names = sorted(set(labels))
    names += [f"class_{i}" for i in range(len(names), num_classes)]
    ids = [names.index(x) for x in labels]
  else:
    raise ConfigError("Labels mix ints and strings; use one kind.")
  if max(ids) >= len(names):
    raise ConfigError(f"finetune.num_classes={num_classes}, but the data has label "
                      f"{max(labels)!r}: there are at least {max(ids) + 1} classes.")
  if len(names) < 2:
    raise ConfigError(f"Classification needs at least 2 classes; the data has {names}.")
  return ids, names


def encode_classification(texts: list[str], tokenizer, seq_len: int) -> dict:
  """Rows {inputs, positions, segments (1 = token, 0 = pad)} [N, T] of text + eos."""
  eos = tokenizer.eos_id()
  rows = {"inputs": np.zeros((len(texts), seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                       (len(texts), seq_len)).copy(),
          "segments": np.zeros((len(texts), seq_len), np.int32)}
  for i, ids in enumerate(tokenizer.encode(list(texts))):
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
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  records = read_jsonl(f.data)
  train_idx, val_idx = split_indices(len(records), f.val_fraction, cfg.train.seed)
  if f.task == "sft":
    if tokenizer.eos_id() < 0:
      raise ConfigError(f"The tokenizer {cfg.data.tokenizer} has no eos piece, which SFT appends "
                        "to every response (to know when to stop).")
    examples = [sft_tokens(sft_segments(record, where), tokenizer) for where, record in records]
    train, stats = pack_sft([examples[i] for i in train_idx], cfg.data.seq_len)
    val, val_stats = pack_sft([examples[i] for i in val_idx], cfg.data.seq_len) if len(
        val_idx) else (None, {})
    if not stats["examples"]:
      raise ConfigError(f"No training example of {f.data} has a response token within "
                        f"data.seq_len + 1 = {cfg.data.seq_len + 1} tokens; raise data.seq_len.")
    stats = {"train": stats, "val": val_stats}
    return TaskData(train, val if val_stats.get("examples") else None, stats)
  ids, names = classification_labels(records, f.num_classes)
  rows = encode_classification([record["text"] for _, record in records], tokenizer,
                               cfg.data.seq_len)
  rows["labels"] = np.asarray(ids, np.int32)
  rows["valid"] = np.ones(len(ids), np.float32)
  take = lambda idx: {k: v[idx] for k, v in rows.items()}
  stats = {"train": {"examples": len(train_idx)}, "val": {"examples": len(val_idx)},
           "classes": len(names)}
  return TaskData(take(train_idx), take(val_idx) if len(val_idx) else None, stats, names)


class RowIterator:
  """This process's rows of global batches of rows, shuffled and reshuffled every epoch by the
  seed: the loader's Grain pipeline over row ids (state: the next batch's index)."""

  def __init__(self, rows: dict, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    import grain

    from lmjax.data.loader import window_dataset
    if batch_size % process_count:
      raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} "
                       "processes.")
    self.num_rows, self.batch_size = len(rows["inputs"]), batch_size
    local = batch_size // process_count
    mine = slice(process_index * local, (process_index + 1) * local)
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


def eval_batches(rows: dict, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Every row once, in order, in global batches (the last filled with empty rows, which weigh
  nothing); this process's rows of each."""
  n = len(rows["inputs"])
  pad = -n % batch_size
  rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
  local = batch_size // process_count
  for start in range(0, n + pad, batch_size):
    begin = start + process_index * local
    yield {k: v[begin:begin + local] for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# Model: base params, LoRA adapters, classification head.


def lora_scale(cfg) -> float:
  return cfg.finetune.lora_alpha / cfg.finetune.lora_rank if cfg.finetune.lora_rank else 0.0


def lora_layout(model_params, model_specs, targets, rank: int) -> dict:
  """{'path/of/module': (a_shape, a_names, b_shape, b_names)} for every kernel of `targets`:
  A [layers?, in..., R] and B [layers?, R, out...] with the kernel's logical axis names."""
  specs = flatten(model_specs)
  layout = {}
  for path, leaf in flatten(model_params).items():
    *module, name = path.split("/")
    if name != "kernel" or len(module) < 2 or module[-1] not in targets or module[-2] not in (
        "attn", "mlp"):
      continue
    lead = 1 if module[0] == "layers" else 0  # scanned layers: a leading [L] axis
    cut = lead + LORA_IN_DIMS[module[-1]]
    shape, names = tuple(leaf.shape), tuple(specs[path])
    layout["/".join(module)] = (shape[:cut] + (rank,), names[:cut] + (None,),
                                shape[:lead] + (rank,) + shape[cut:],
                                names[:lead] + (None,) + names[cut:])
  return layout


def init_lora(key, layout: dict, dtype) -> dict:
  flat = {}
  for i, (path, (a_shape, _, b_shape, _)) in enumerate(sorted(layout.items())):
    fan_in = math.prod(a_shape[1 if path.startswith("layers/") else 0:-1])  # A's input dims
    bound = 1.0 / math.sqrt(fan_in)
    flat[path + "/a"] = jax.random.uniform(jax.random.fold_in(key, i), a_shape, dtype, -bound,
                                           bound)
    flat[path + "/b"] = jnp.zeros(b_shape, dtype)
  return unflatten(flat)


def lora_variables(lora: dict, scale: float) -> dict:
  """The 'lora' collection the model reads: A, and B with the scale folded in."""
  flat = flatten(lora)
  return unflatten({k: v * scale if k.endswith("/b") else v for k, v in flat.items()})


def merge_lora(params: dict, scale: float) -> dict:
  """Plain model params: every adapted kernel W + A B scale (per layer when scanned)."""
  flat, lora = flatten(params["model"]), flatten(params.get("lora", {}))
  product = lambda a, b: jnp.tensordot(a, b, 1, precision=jax.lax.Precision.HIGHEST)
  for module in (path[:-2] for path in lora if path.endswith("/a")):
    a, b = (lora[f"{module}/{x}"].astype(jnp.float32) for x in "ab")
    delta = (jax.vmap(product) if module.startswith("layers/") else product)(a, b * scale)
    kernel = flat[module + "/kernel"]
    flat[module + "/kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return unflatten(flat)


def forward(model: Transformer, params: dict, batch: dict, scale: float, rng=None,
            deterministic: bool = True, hidden: bool = False):
  variables = {"params": params["model"]}
  if "lora" in params:
    variables["lora"] = lora_variables(params["lora"], scale)
  return model.apply(variables, batch["inputs"], batch["positions"],
                     segment_ids_BT=batch["segments"], deterministic=deterministic,
                     return_hidden=hidden, rngs={"dropout": rng if rng is not None else
                                                 jax.random.PRNGKey(0)})


def pool(hidden_BTD, segments_BT, pooling: str):
  """[B, D]: the last token (the eos), the mean over tokens, or the first token."""
  if pooling == "first":
    return hidden_BTD[:, 0]
  if pooling == "mean":
    mask_BT = (segments_BT > 0).astype(hidden_BTD.dtype)
    return (hidden_BTD * mask_BT[..., None]).sum(1) / jnp.maximum(mask_BT.sum(1), 1.0)[:, None]
  last_B = jnp.maximum((segments_BT > 0).sum(1) - 1, 0)
  return jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]


def class_logits(model, params, batch, scale, pooling, rng=None, deterministic=True):
  hidden_BTD = forward(model, params, batch, scale, rng, deterministic, hidden=True)
  pooled_BD = pool(hidden_BTD, batch["segments"], pooling)
  head = params["head"]
  return pooled_BD @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def make_loss(cfg, model: Transformer):
  """loss_fn(params, batch, rng, deterministic) -> (loss sum, {tokens: count, ...sums}): the
  form train.make_train_step takes ('tokens' counts examples for classification)."""
  scale, pooling = lora_scale(cfg), cfg.finetune.pooling

  def sft_loss(params, batch, rng, deterministic=False):
    logits_BTV = forward(model, params, batch, scale, rng, deterministic)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return (nll_BT * batch["weights"]).sum(), {"tokens": batch["weights"].sum()}

  def classification_loss(params, batch, rng, deterministic=False):
    logits_BC = class_logits(model, params, batch, scale, pooling, rng, deterministic)
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
    correct_B = (jnp.argmax(logits_BC, -1) == batch["labels"]).astype(jnp.float32)
    valid_B = batch["valid"]
    return (nll_B * valid_B).sum(), {"tokens": valid_B.sum(), "accuracy": (correct_B *
                                                                           valid_B).sum()}

  return sft_loss if cfg.finetune.task == "sft" else classification_loss


def build(cfg, num_classes: int = 0) -> train_lib.Setup:
  """train.Setup for fine-tuning: params {model, lora?, head?} on the mesh; the optimizer over
  the trainable ones (adapters and head with LoRA, else all); init_fn reads the --init params."""
  f = cfg.finetune
  mesh, rules = sharding_lib.make_mesh(cfg), sharding_lib.logical_rules(cfg)
  model = Transformer(ModelConfig.from_config(cfg))
  optimizer, schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
  dummy_BT = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_BT)["params"])
  base_abstract, specs = nn.unbox(boxed), {"model": nn.get_partition_spec(boxed)}
  targets = tuple(t.strip() for t in f.lora_targets.split(",") if t.strip())
  layout = lora_layout(base_abstract, specs["model"], targets, f.lora_rank) if f.lora_rank else {}
  if f.lora_rank and not layout:
    raise ConfigError(f"finetune.lora_targets={f.lora_targets!r} matches no projection of this "
                      f"{cfg.model.style} model.")
  if layout:
    specs["lora"] = unflatten({k: P(*v[1]) for k, v in layout.items() for k, v in
                               ((k + "/a", v[:2]), (k + "/b", v[2:]))})
  if f.task == "classification":
    specs["head"] = {"kernel": P("embed", None), "bias": P(None)}
  trainable = trainable_keys(cfg)
  pdt = jnp.dtype(cfg.model.param_dtype)

  def assemble(base):
    key = jax.random.PRNGKey(cfg.train.seed)
    params = {"model": base}
    if layout:
      params["lora"] = init_lora(jax.random.fold_in(key, 2), layout, pdt)
    if f.task == "classification":
      params["head"] = {"kernel": cfg.model.init_std * jax.random.normal(
          jax.random.fold_in(key, 3), (cfg.model.d_model, num_classes), pdt),
                        "bias": jnp.zeros((num_classes,), pdt)}
    trained = params if trainable is None else {k: params[k] for k in trainable}
    return train_lib.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trained),
                                jax.random.fold_in(key, 1))

  param_shardings = sharding_lib.logical_to_sharding(specs, mesh, rules)
  abstract = jax.eval_shape(assemble, base_abstract)
  sharding_lib.check_divisible(abstract.params, param_shardings)
  pairs = jax.tree_util.tree_map(lambda x, s: (x.shape, s.spec), abstract.params, param_shardings)
  opt_specs = sharding_lib.spec_for_like(pairs, abstract.opt_state)
  replicated = sharding_lib.replicated(mesh)
  state_shardings = train_lib.TrainState(
      replicated, param_shardings,
      jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), opt_specs), replicated)
  batch_axes = sharding_lib.batch_sharding(mesh, rules).spec[0]
  n_batch_shards = math.prod(mesh.shape[a] for a in (
      batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()))
  if cfg.train.batch_size % (n_batch_shards * cfg.optim.accumulation_steps):
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                      f"{n_batch_shards} batch shards of the mesh times "
                      f"optim.accumulation_steps={cfg.optim.accumulation_steps}.")
  keys = (("inputs", 2), ("targets", 2), ("weights", 2), ("positions", 2), ("segments", 2)) if (
      f.task == "sft") else (("inputs", 2), ("positions", 2), ("segments", 2), ("labels", 1),
                             ("valid", 1))
  batch_sharding = {k: NamedSharding(mesh, P(batch_axes, *[None] * (ndim - 1)))
                    for k, ndim in keys}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jit_assemble = jax.jit(assemble, out_shardings=state_shardings)
  abstract_base = ckpt_lib.abstract_with_shardings(base_abstract, param_shardings["model"])

  def init_fn():
    checkpointer = ckpt_lib.Checkpointer(f.init, read_only=True)
    try:
      base = checkpointer.restore_params(None, abstract_base)
    finally:
      checkpointer.close()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jit_assemble(base)

  return train_lib.Setup(cfg, mesh, rules, model, optimizer, schedule,
                         ckpt_lib.abstract_with_shardings(abstract, state_shardings),
                         state_shardings, batch_sharding, init_fn)


def trainable_keys(cfg) -> tuple | None:
  """The params that train: with LoRA the adapters (and head), else all (None)."""
  if not cfg.finetune.lora_rank:
    return None
  return ("lora", "head") if cfg.finetune.task == "classification" else ("lora",)


def num_trainable(cfg, setup) -> int:
  params = setup.abstract_state.params
  keys = trainable_keys(cfg) or tuple(params)
  return sum(x.size for k in keys for x in jax.tree_util.tree_leaves(params[k]))


# ---------------------------------------------------------------------------------------------
# Evaluation and export.


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Mean over the classes that occur (in labels or predictions) of 2TP / (2TP + FP + FN)."""
  scores = []
  for c in np.union1d(labels, predictions):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else 0.0


def make_evaluate(cfg, setup, rows: dict):
  """params -> held-out metrics: SFT loss and perplexity over response tokens; classification
  loss, accuracy and macro-F1 over examples."""
  loss_fn = make_loss(cfg, setup.model)
  pi, pc, batch_size = jax.process_index(), jax.process_count(), cfg.train.batch_size
  in_shardings = (setup.state_shardings.params, setup.batch_sharding)
  if cfg.finetune.task == "sft":
    def loss_and_count(params, batch):
      loss, aux = loss_fn(params, batch, None, deterministic=True)
      return loss, aux["tokens"]

    step = jax.jit(loss_and_count, in_shardings=in_shardings)

    def evaluate(params):
      return evaluate_lib.evaluate_batches(setup, step, params,
                                           eval_batches(rows, batch_size, pi, pc))
    return evaluate

  scale, pooling = lora_scale(cfg), cfg.finetune.pooling

  def predict(params, batch):
    logits_BC = class_logits(setup.model, params, batch, scale, pooling)
    return jnp.argmax(logits_BC, -1), optax.softmax_cross_entropy_with_integer_labels(
        logits_BC, batch["labels"])

  step = jax.jit(predict, in_shardings=in_shardings,
                 out_shardings=sharding_lib.replicated(setup.mesh))

  def evaluate(params):
    predictions, nll = [], []
    with setup.context():
      for local in eval_batches(rows, batch_size, pi, pc):
        p, n = step(params, sharding_lib.put_batch(local, setup.batch_sharding))
        predictions.append(np.asarray(p))
        nll.append(np.asarray(n))
    count = len(rows["labels"])
    predictions, nll = np.concatenate(predictions)[:count], np.concatenate(nll)[:count]
    return {"loss": float(nll.mean()), "accuracy": float(np.mean(predictions == rows["labels"])),
            "macro_f1": macro_f1(rows["labels"], predictions), "examples": int(count)}
  return evaluate


def format_result(step: int, result: dict) -> str:
  if "accuracy" in result:
    return (f"step {step}: val loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, "
            f"macro-F1 {result['macro_f1']:.4f} ({result['examples']} examples)")
  return (f"step {step}: val loss {result['loss']:.4f} (response tokens), perplexity "
          f"{result['perplexity']:.2f}")


def export(cfg, workdir: str, setup, state, labels: list[str] | None = None) -> int:
  """Writes the merged params as WORKDIR/checkpoints/STEP, a plain run (fresh optimizer state),
  and for classification WORKDIR/classifier.npz. Returns the step."""
  step = int(jax.device_get(state.step))
  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.train.keep_checkpoints)
  try:
    done = step in checkpointer.all_steps()
  finally:
    checkpointer.close()
  if done and (cfg.finetune.task == "sft" or (epath.Path(workdir) / CLASSIFIER_FILE).exists()):
    return step  # exported by an earlier invocation
  plain = train_lib.build(cfg)
  scale = lora_scale(cfg)
  with plain.context():  # init_fn's random params are unused in this jit: XLA drops them
    plain_state = jax.jit(
        lambda p: plain.init_fn().replace(step=jnp.asarray(step, jnp.int32),
                                          params=merge_lora(p, scale)),
        out_shardings=plain.state_shardings)(state.params)
  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.train.keep_checkpoints)
  try:
    if not done:
      checkpointer.save(step, plain_state, None, force=True)
  finally:
    checkpointer.close()
  if cfg.finetune.task == "classification" and jax.process_index() == 0:
    head = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32),
                                  state.params["head"])
    with (epath.Path(workdir) / CLASSIFIER_FILE).open("wb") as out:
      np.savez(out, kernel=head["kernel"], bias=head["bias"], labels=np.asarray(labels),
               pooling=np.asarray(cfg.finetune.pooling))
  return step


# ---------------------------------------------------------------------------------------------
# The command.


def _check_workdir(cfg, workdir: str) -> None:
  """Refuses a workdir that holds another run (not this fine-tuning), before anything is written."""
  train_lib.prepare_workdir(cfg, workdir)
  path = epath.Path(workdir) / "config.json"
  if path.exists():
    saved = config_lib.from_json(path.read_text())
    was = saved.get("finetune", {})
    now = {k: cfg.finetune[k] for k in ("init", "task", "lora_rank", "lora_targets", "pooling")}
    diffs = [f"finetune.{k}: {was.get(k)!r} there, {v!r} now" for k, v in now.items()
             if was.get(k) != v]
    if diffs:
      raise ConfigError(f"'{workdir}' holds another run:\n  " + "\n  ".join(diffs) +
                        "\nFine-tune into a new --workdir. Nothing was changed.")


def finetune(cfg, workdir: str, progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Fine-tunes (or resumes) into `workdir` from cfg.finetune.init (see the module doc); at the
  end writes the merged run. Returns train.run_loop's result plus 'data' (example counts) and
  'exported' (the step of WORKDIR/checkpoints, or None when stopped early)."""
  _check_workdir(cfg, workdir)
  data = load_task_data(cfg)  # every data error before any compilation
  setup = build(cfg, len(data.labels or ()))
  f = cfg.finetune
  train_step = jax.jit(
      train_lib.make_train_step(setup.model, setup.optimizer, setup.schedule,
                                cfg.optim.accumulation_steps, loss_fn=make_loss(cfg, setup.model),
                                trainable=trainable_keys(cfg)),
      in_shardings=(setup.state_shardings, setup.batch_sharding),
      out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
  evaluate = make_evaluate(cfg, setup, data.val) if data.val is not None else None
  rows = RowIterator(data.train, cfg.train.batch_size, cfg.train.seed, jax.process_index(),
                     jax.process_count())
  how = (f"LoRA rank {f.lora_rank} on {f.lora_targets}" if f.lora_rank else "all params")
  if jax.process_index() == 0:
    counts = ", ".join(f"{split} {s['examples']}" for split, s in data.stats.items()
                       if isinstance(s, dict) and s)
    if f.task == "sft":
      cut = sum(s.get("truncated", 0) for s in data.stats.values())
      dropped = sum(s.get("dropped", 0) for s in data.stats.values())
      counts += f"; {data.stats['train']['rows']} packed rows" + (
          f"; {cut} examples cut to data.seq_len + 1 tokens" if cut else "") + (
          f"; {dropped} left out (no response token within them)" if dropped else "")
    else:
      counts += f"; {len(data.labels)} classes"
    print(f"Fine-tuning ({f.task}, {how}: {num_trainable(cfg, setup) / 1e6:.3f}M trainable) from "
          f"{f.init}; examples: {counts}.", flush=True)
  result = train_lib.run_loop(cfg, workdir, setup, train_step, rows, evaluate,
                              progress=progress, stop_at_step=stop_at_step,
                              checkpoint_workdir=os.path.join(workdir, STATE_DIR),
                              format_eval=format_result)
  result["data"], result["exported"] = data.stats, None
  if result["stopped_by"] is None:
    result["exported"] = export(cfg, workdir, setup, result["state"], data.labels)
  return result


# ---------------------------------------------------------------------------------------------
# Using a fine-tuned classifier.


@dataclasses.dataclass
class Classifier:
  cfg: object
  model: Transformer
  params: dict  # {model: merged params, head: {kernel, bias}}
  labels: list[str]
  pooling: str
  tokenizer: object

  def __post_init__(self):
    self._step = jax.jit(lambda p, b: class_logits(self.model, p, b, 0.0, self.pooling))

  def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """[len(texts), classes] float32, computed as in training (text + eos, cut to seq_len)."""
    rows = encode_classification(texts, self.tokenizer, self.cfg.data.seq_len)
    out = [np.asarray(self._step(self.params, {k: v[i:i + batch_size] for k, v in rows.items()}))
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

  def predict(self, texts: list[str]) -> list[str]:
    return [self.labels[i] for i in self.logits(texts).argmax(-1)]


def load_classifier(workdir: str, step: int | None = None) -> Classifier:
  """The classifier a finished `lmjax finetune` (task=classification) wrote into `workdir`."""
  path = epath.Path(workdir) / CLASSIFIER_FILE
  if not path.exists():
    raise ConfigError(f"No {path}: `lmjax finetune` with finetune.task=classification writes it "
                      "when training finishes.")
  cfg = train_lib.load_config(workdir)
  setup = train_lib.build(cfg)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    params = checkpointer.restore_params(step, setup.abstract_state.params)
  finally:
    checkpointer.close()
  with path.open("rb") as f:
    saved = np.load(f)
    head = {"kernel": jnp.asarray(saved["kernel"]), "bias": jnp.asarray(saved["bias"])}
    labels, pooling = [str(x) for x in saved["labels"]], str(saved["pooling"])
  return Classifier(cfg, setup.model, {"model": params, "head": head}, labels, pooling,
                    data_lib.load_tokenizer(cfg.data.tokenizer))
