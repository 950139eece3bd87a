"""Configs: the default schema, loading `file.py:arg`, `--config.a.b=v` overrides, validation.

Every config file starts from `default_config()` and changes values; the schema is locked, so a key
that is not here is an error wherever it comes from (file or command line), reported with the
closest valid names before any work starts.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config problem the user must fix; the message says what and how."""


def default_config() -> ConfigDict:
  c = ConfigDict()

  c.model = ConfigDict()
  c.model.style = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU, biases | "llama": RoPE, RMSNorm, SwiGLU
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  c.model.head_dim = 0  # 0 = d_model // num_heads
  c.model.mlp_dim = 3072
  c.model.vocab_size = 50304
  c.model.max_len = 1024
  c.model.tie_embeddings = True
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-5
  c.model.init_std = 0.02
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"
  c.model.scan_layers = False
  c.model.remat = "none"  # none | full | dots | dots_no_batch
  # xla: lmjax's einsum-softmax (model.attention()) | cudnn: flash attention on NVIDIA GPUs |
  # auto: jax.nn.dot_product_attention picks
  c.model.attention = "xla"
  c.model.causal = True  # False: bidirectional attention (an encoder; train.objective=masked_lm)
  # sp: standard parametrization | mup: maximal update parametrization (hyperparameters tuned at
  # d_model = mup_base_width transfer to other widths; see model.ModelConfig.width_mult)
  c.model.parametrization = "sp"
  c.model.mup_base_width = 0

  c.data = ConfigDict()
  c.data.source = "synthetic"  # synthetic | pystdlib | text:GLOB | tfds:NAME
  c.data.seq_len = 256
  c.data.text_field = "text"  # field read from .jsonl records
  c.data.tfds_data_dir = ""
  c.data.tfds_split = "train"
  c.data.tokenizer = ""  # path to a SentencePiece .model; "" = WORKDIR/data/tokenizer.model (trained)
  c.data.tokenizer_type = "bpe"  # bpe | unigram
  c.data.vocab_size = 0  # tokenizer vocabulary when training one; 0 = model.vocab_size
  c.data.tokenizer_sample_bytes = 20_000_000
  c.data.max_bytes = 0  # cap on corpus bytes read by `prepare` (0 = all)
  c.data.prepared_dir = ""  # "" = WORKDIR/data
  c.data.val_fraction = 0.005
  c.data.shard_tokens = 50_000_000
  c.data.num_workers = 0  # 0 = all cores
  c.data.prefetch = 4

  c.train = ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # global, across all devices and hosts
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.sample_prompt = ""  # printed with a sample continuation at the end of training
  c.train.objective = "causal_lm"  # causal_lm (next token) | masked_lm (BERT; model.causal=False)
  c.train.mask_prob = 0.15  # masked_lm: fraction of (non-pad) tokens selected for prediction
  c.train.mask_token_fraction = 0.8  # of the selected: replaced by the mask token
  c.train.random_token_fraction = 0.1  # of the selected: replaced by a random token (rest: kept)
  c.train.mask_token_id = -1  # -1: the tokenizer's "[MASK]" piece (synthetic data: vocab_size - 1)

  c.optim = ConfigDict()
  c.optim.name = "adamw"  # adamw | lion | adafactor
  c.optim.learning_rate = 6e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"  # cosine | linear | constant
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.optim.decay_norms_and_biases = False
  c.optim.accumulation_steps = 1

  c.finetune = ConfigDict()  # `lmjax finetune` only (see finetune.py)
  c.finetune.init = ""  # run (or converted HF) workdir whose latest params start fine-tuning
  c.finetune.task = "sft"  # sft | classification
  c.finetune.data = ""  # jsonl; sft: {"prompt","response"} or {"messages"}; else {"text","label"}
  c.finetune.val_fraction = 0.1  # held-out examples (at least one), fixed by train.seed
  c.finetune.lora_rank = 0  # 0 = full fine-tuning
  c.finetune.lora_alpha = 16.0  # LoRA scale is lora_alpha / lora_rank
  c.finetune.lora_targets = "query,value"  # of query,key,value,out,up,gate,down
  c.finetune.num_classes = 0  # classification; 0 = from the data's labels
  c.finetune.pooling = "last"  # classification: last (the eos; decoders) | mean | first

  c.distributed = ConfigDict()
  # "auto": jax.distributed.initialize() when the environment names a cluster (Cloud TPU VM slices
  # with more than one host, SLURM, or the JAX_COORDINATOR_ADDRESS variable); "yes": always, with
  # the values below where set; "no": single process.
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = 0  # 0 = from the environment
  c.distributed.process_id = -1  # -1 = from the environment
  c.distributed.local_device_ids = ""  # e.g. "0,1,2,3" for one process per GPU group

  c.mesh = ConfigDict()
  c.mesh.data = -1  # -1 = the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # logical axis -> mesh axes; "" = replicated. Params use embed/mlp/heads/kv_heads/kv/vocab/norm;
  # activations use batch/length/act_embed/act_heads/act_mlp/act_vocab.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", ""),
      ("vocab", "tensor"),
      ("norm", ""),
      ("layers", ""),
      ("length", ""),
      ("act_embed", ""),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  )
  return c


def _flat_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    keys.append(name)
    if isinstance(v, ConfigDict):
      keys.extend(_flat_keys(v, name + "."))
  return keys


def _unknown_key_error(key: str, valid: Sequence[str], where: str) -> ConfigError:
  leaves = [v for v in valid if "." in v]  # suggest keys, not section names
  close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return ConfigError(f"Unknown config key '{key}' ({where}).{hint} "
                     f"Run `lmjax config --config=...` to list every key.")


def validate_against_schema(cfg: ConfigDict, where: str) -> None:
  """Every key in `cfg` must exist in the default schema, with a compatible type."""
  schema = default_config()
  valid = _flat_keys(schema)

  def walk(node: ConfigDict, ref: ConfigDict, prefix: str):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if k not in ref:
        raise _unknown_key_error(name, valid, where)
      expected = ref[k]
      if isinstance(expected, ConfigDict):
        if not isinstance(v, ConfigDict):
          raise ConfigError(f"Config key '{name}' must be a section, got {v!r} ({where}).")
        walk(v, expected, name + ".")
      else:
        _check_type(name, v, expected, where)

  walk(cfg, schema, "")


def _check_type(name: str, value: Any, expected: Any, where: str) -> None:
  ok = (isinstance(value, bool) == isinstance(expected, bool) and
        (isinstance(value, type(expected)) or
         (isinstance(expected, float) and isinstance(value, int)) or
         (isinstance(expected, (tuple, list)) and isinstance(value, (tuple, list)))))
  if not ok:
    raise ConfigError(f"Config key '{name}' must be {type(expected).__name__} (like {expected!r}), "
                      f"got {type(value).__name__} {value!r} ({where}).")


def _parse_value(name: str, text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{name}={text}: expected true or false.")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{name}={text}: cannot parse as {type(current).__name__} "
                      f"(current value {current!r}).") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  _check_type(name, value, current, "command line")
  return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies `a.b=v` strings (from `--config.a.b=v`) with type checking."""
  cfg = ConfigDict(cfg.to_dict())  # a copy; also unlocks field references
  valid = _flat_keys(cfg)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override '--config.{item}' needs a value: --config.{item}=VALUE.")
    name, text = item.split("=", 1)
    parts = name.split(".")
    node = cfg
    for i, part in enumerate(parts):
      if not isinstance(node, ConfigDict) or part not in node:
        raise _unknown_key_error(name, valid, "command line")
      if i < len(parts) - 1:
        node = node[part]
    if isinstance(node[parts[-1]], ConfigDict):
      raise ConfigError(f"'--config.{name}' is a section; set one of its keys, e.g. "
                        f"--config.{name}.{next(iter(node[parts[-1]].keys()))}=...")
    node[parts[-1]] = _parse_value(name, text, node[parts[-1]])
  return cfg


def load_config_file(spec: str) -> ConfigDict:
  """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file '{path}' not found. Pass --config=configs/NAME.py[:VARIANT].")
  module_spec = importlib.util.spec_from_file_location("lmjax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file '{path}' has no get_config(arg) function.")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except TypeError:
    cfg = module.get_config()
  if not isinstance(cfg, ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  return cfg


def finalize(cfg: ConfigDict) -> ConfigDict:
  """Fills derived values and checks relations between keys."""
  m = cfg.model
  if m.style not in ("gpt2", "llama"):
    raise ConfigError(f"model.style must be 'gpt2' or 'llama', got '{m.style}'.")
  if m.num_kv_heads == 0:
    m.num_kv_heads = m.num_heads
  if m.head_dim == 0:
    if m.d_model % m.num_heads:
      raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads="
                        f"{m.num_heads}; change one or set model.head_dim.")
    m.head_dim = m.d_model // m.num_heads
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads="
                      f"{m.num_kv_heads} (grouped-query attention).")
  if m.remat not in ("none", "full", "dots", "dots_no_batch"):
    raise ConfigError(f"model.remat must be none|full|dots|dots_no_batch, got '{m.remat}'.")
  if m.attention not in ("xla", "cudnn", "auto"):
    raise ConfigError(f"model.attention must be xla|cudnn|auto, got '{m.attention}'.")
  parametrization = m.get("parametrization", "sp")  # configs saved before muP have none
  if parametrization not in ("sp", "mup"):
    raise ConfigError(f"model.parametrization must be sp|mup, got '{parametrization}'.")
  if parametrization == "mup" and m.mup_base_width < 1:
    raise ConfigError("model.parametrization=mup needs model.mup_base_width: the d_model at which "
                      "the learning rate and init were tuned (e.g. --config.model.mup_base_width="
                      f"{m.d_model} to tune at this width).")
  if m.attention == "cudnn" and m.dtype == "float32":
    raise ConfigError("model.attention=cudnn (flash attention) needs model.dtype=bfloat16 or "
                      "float16; use model.attention=xla for float32.")
  for key in ("dtype", "param_dtype"):
    if m[key] not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"model.{key} must be float32|bfloat16|float16, got '{m[key]}'.")
  if cfg.data.seq_len > m.max_len:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={m.max_len}.")
  if cfg.optim.name not in ("adamw", "lion", "adafactor"):
    raise ConfigError(f"optim.name must be adamw|lion|adafactor, got '{cfg.optim.name}'.")
  if cfg.optim.schedule not in ("cosine", "linear", "constant"):
    raise ConfigError(f"optim.schedule must be cosine|linear|constant, got '{cfg.optim.schedule}'.")
  if cfg.optim.accumulation_steps < 1 or cfg.train.batch_size % cfg.optim.accumulation_steps:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                      f"optim.accumulation_steps={cfg.optim.accumulation_steps}.")
  if "finetune" in cfg:  # configs saved before fine-tuning existed have no such section
    f = cfg.finetune
    if f.task not in ("sft", "classification"):
      raise ConfigError(f"finetune.task must be sft|classification, got '{f.task}'.")
    if f.pooling not in ("last", "mean", "first"):
      raise ConfigError(f"finetune.pooling must be last|mean|first, got '{f.pooling}'.")
    if f.lora_rank < 0 or not 0.0 <= f.val_fraction < 1.0 or f.num_classes < 0:
      raise ConfigError("finetune.lora_rank and finetune.num_classes must be >= 0 and "
                        f"finetune.val_fraction in [0, 1); got {f.lora_rank}, {f.num_classes}, "
                        f"{f.val_fraction}.")
    targets = [t.strip() for t in f.lora_targets.split(",") if t.strip()]
    known = ("query", "key", "value", "out", "up", "down") + (
        ("gate",) if m.style == "llama" else ())
    if f.lora_rank and (not targets or set(targets) - set(known) or f.lora_alpha <= 0):
      raise ConfigError(f"finetune.lora_targets must name some of {','.join(known)} (for a "
                        f"{m.style} model) and finetune.lora_alpha must be > 0; got "
                        f"'{f.lora_targets}' and {f.lora_alpha}.")
  t = cfg.train
  if t.objective not in ("causal_lm", "masked_lm"):
    raise ConfigError(f"train.objective must be causal_lm|masked_lm, got '{t.objective}'.")
  if (t.objective == "masked_lm") == m.causal:
    raise ConfigError(
        f"train.objective={t.objective} needs model.causal={t.objective == 'causal_lm'} ("
        "masked_lm trains a bidirectional encoder; causal_lm a decoder, which must not see the "
        "tokens it predicts). Set both.")
  if t.objective == "masked_lm":
    if not 0.0 < t.mask_prob <= 1.0:
      raise ConfigError(f"train.mask_prob must be in (0, 1], got {t.mask_prob}.")
    if min(t.mask_token_fraction, t.random_token_fraction) < 0 or (
        t.mask_token_fraction + t.random_token_fraction > 1.0):
      raise ConfigError("train.mask_token_fraction and train.random_token_fraction must be >= 0 "
                        f"with a sum <= 1 (the rest keep their token); got "
                        f"{t.mask_token_fraction} and {t.random_token_fraction}.")
    if t.mask_token_id >= m.vocab_size:
      raise ConfigError(f"train.mask_token_id={t.mask_token_id} is outside the vocabulary "
                        f"(model.vocab_size={m.vocab_size}); use -1 for the tokenizer's [MASK].")
    if t.sample_prompt:
      raise ConfigError("train.sample_prompt needs a causal LM (text continuation); a masked LM "
                        "cannot generate. Set train.sample_prompt=''.")
  for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
    if cfg.train[key] < 1:
      raise ConfigError(f"train.{key} must be at least 1, got {cfg.train[key]}.")
  return cfg


def get_config(spec: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
  """The resolved config: file (or defaults), overrides, validation, derived values."""
  if spec:
    cfg = load_config_file(spec)
    validate_against_schema(cfg, where=spec.partition(":")[0])
  else:
    cfg = default_config()
  cfg = apply_overrides(cfg, overrides)
  # fill keys a config file left out with defaults, so the saved config is complete
  full = default_config()
  full.update(cfg)
  return finalize(ConfigDict(full.to_dict()))


def to_json(cfg: ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
  def fix(v):  # JSON turns tuples (mesh.rules) into lists
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    return tuple(fix(x) for x in v) if isinstance(v, list) else v
  return ConfigDict(fix(json.loads(text)))


# Keys that fix the shapes of the params: resuming with other values would load the wrong model.
SHAPE_KEYS = ("style", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "vocab_size", "max_len", "tie_embeddings", "scan_layers")


def check_same_model(saved: ConfigDict, cfg: ConfigDict, workdir: str) -> None:
  diffs = [f"model.{k}: checkpoint has {saved.model[k]!r}, config has {cfg.model[k]!r}"
           for k in SHAPE_KEYS if k in saved.model and saved.model[k] != cfg.model[k]]
  if diffs:
    raise ConfigError(
        f"The workdir '{workdir}' holds a different model:\n  " + "\n  ".join(diffs) +
        "\nUse a new --workdir for this model, or match the config to the saved one "
        f"({os.path.join(workdir, 'config.json')}). Nothing was changed.")
