"""Configs: loading `file.py:arg`, `--config.a.b=v` overrides, validation, derived values, saved
configs and what identifies a run.

Every config file starts from `default_config()` (schema.py) and changes values; the schema is
locked, so a key that is not in it is an error wherever it comes from (file or command line),
reported with the closest valid names before any work starts.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Sequence
import re

from lmjax.errors import ConfigError
from lmjax.schema import (CHOICES, DISTILL_IDENTITY_KEYS, FINETUNE_IDENTITY_KEYS,  # noqa: F401
                          FINETUNE_TASKS, RANGES, LORA_TARGETS, MASKED_LM_KEYS, RUNTIME_MODEL_KEYS, ConfigDict,
                          default_config)


# --- keys and values ----------------------------------------------------------------------------

def flat_items(cfg, prefix: str = "") -> dict[str, Any]:
  """{"section.key": value} of every leaf."""
  out = {}
  for k, v in cfg.items():
    if isinstance(v, (ConfigDict, dict)):
      out.update(flat_items(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _unknown_key_error(key: str, where: str) -> ConfigError:
  close = difflib.get_close_matches(key, list(flat_items(default_config())), n=3, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return ConfigError(f"Unknown config key '{key}' ({where}).{hint} "
                     f"Run `lmjax config --keys` to list every key.")


def validate_against_schema(cfg: ConfigDict, where: str, schema: ConfigDict | None = None) -> None:
  """Every key in `cfg` must exist in the schema (the default config), with a compatible type."""

  def walk(node: ConfigDict, ref: ConfigDict, prefix: str):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if k not in ref:
        raise _unknown_key_error(name, where)
      if isinstance(ref[k], ConfigDict):
        if not isinstance(v, ConfigDict):
          raise ConfigError(f"Config key '{name}' must be a section, got {v!r} ({where}).")
        walk(v, ref[k], name + ".")
      else:
        check_type(name, v, ref[k], where)

  walk(cfg, schema or default_config(), "")


def check_type(name: str, value: Any, expected: Any, where: str) -> None:
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
  check_type(name, value, current, "command line")
  return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies `a.b=v` strings (from `--config.a.b=v`) with type checking; returns a copy."""
  cfg = ConfigDict(cfg.to_dict())  # a copy; also unlocks field references
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override '--config.{item}' needs a value: --config.{item}=VALUE.")
    name, text = item.split("=", 1)
    parts = name.split(".")
    node = cfg
    for i, part in enumerate(parts):
      if not isinstance(node, ConfigDict) or part not in node:
        raise _unknown_key_error(name, "command line")
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
    try:
      cfg = module.get_config(arg) if arg else module.get_config()
    except TypeError:
      cfg = module.get_config()
  except ValueError as e:  # what config files raise for an unknown variant
    raise ConfigError(f"{spec}: {e}") from None
  if not isinstance(cfg, ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  return cfg


def complete(cfg: ConfigDict) -> ConfigDict:
  """`cfg` with every key it leaves out at its default (configs saved by older versions, files
  that set a few keys), so that finalize and the saved config.json see the whole schema."""
  full = default_config()
  full.update(cfg)
  return ConfigDict(full.to_dict())


# --- validation and derived values --------------------------------------------------------------

def finalize_model(m: ConfigDict) -> ConfigDict:
  """Derives num_kv_heads and head_dim and checks the model section on its own."""
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
  if m.parametrization == "mup" and m.mup_base_width < 1:
    raise ConfigError("model.parametrization=mup needs model.mup_base_width: the d_model at which "
                      "the learning rate and init were tuned (e.g. --config.model.mup_base_width="
                      f"{m.d_model} to tune at this width).")
  if m.attention == "cudnn" and m.dtype == "float32":
    raise ConfigError("model.attention=cudnn (flash attention) needs model.dtype=bfloat16 or "
                      "float16; use model.attention=xla for float32.")
  return m


def in_range(value, spec: str) -> bool:
  """Whether a number is in a RANGES spec: ">=1", ">0", "[0,1)", "-1|>=1", "any"."""
  if spec == "any":
    return True
  if "|" in spec:
    return any(in_range(value, part) for part in spec.split("|"))
  if spec[0] in "[(":
    low, high = (float(x) for x in spec[1:-1].split(","))
    return ((low <= value) if spec[0] == "[" else (low < value)) and (
        (value <= high) if spec[-1] == "]" else (value < high))
  if spec.startswith(">="):
    return value >= float(spec[2:])
  if spec.startswith(">"):
    return value > float(spec[1:])
  return value == float(spec)


def check_ranges(cfg: ConfigDict) -> None:
  """Every numeric key within its RANGES entry: a value that would lose data or print a number
  that lies (keep_checkpoints=0, eval_batches=0, a negative learning rate) is refused here."""
  for key, spec in RANGES.items():
    section, name = key.split(".")
    value = cfg[section][name]
    if not in_range(value, spec):
      shown = {">=1": "at least 1", ">=2": "at least 2", ">0": "greater than 0", ">=0": "at least 0",
               ">=-1": "at least -1", "-1|>=1": "-1 (the remaining devices) or at least 1",
               "0|>1": "0 (off) or greater than 1"}
      raise ConfigError(f"{key}={value!r} is out of range: it must be "
                        f"{shown.get(spec, f'in {spec}')}. Change --config.{key}.")


def check_choices(cfg: ConfigDict) -> None:
  for key, allowed in CHOICES.items():
    section, name = key.split(".")
    if cfg[section][name] not in allowed:
      raise ConfigError(f"{key} must be {'|'.join(allowed)}, got '{cfg[section][name]}'.")


def _check_finetune(cfg: ConfigDict) -> None:
  f = cfg.finetune
  if f.lora_rank < 0 or not 0.0 <= f.val_fraction < 1.0 or f.num_classes < 0:
    raise ConfigError("finetune.lora_rank and finetune.num_classes must be >= 0 and "
                      f"finetune.val_fraction in [0, 1); got {f.lora_rank}, {f.num_classes}, "
                      f"{f.val_fraction}.")
  known = [t for t in LORA_TARGETS if t != "gate" or cfg.model.style == "llama"]
  targets = [t.strip() for t in f.lora_targets.split(",") if t.strip()]
  if f.lora_rank and (not targets or set(targets) - set(known) or f.lora_alpha <= 0):
    raise ConfigError(f"finetune.lora_targets must name some of {','.join(known)} (for a "
                      f"{cfg.model.style} model) and finetune.lora_alpha must be > 0; got "
                      f"'{f.lora_targets}' and {f.lora_alpha}.")


def _check_objective(cfg: ConfigDict) -> None:
  t, m = cfg.train, cfg.model
  if (t.objective == "masked_lm") == m.causal:
    raise ConfigError(
        f"train.objective={t.objective} needs model.causal={t.objective != 'masked_lm'} ("
        "masked_lm trains a bidirectional encoder; the others a decoder, which must not see the "
        "tokens it predicts). Set both.")
  if t.objective != "masked_lm":
    return
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
  if cfg.distill.teacher:
    raise ConfigError("distill.teacher needs a causal student (train.objective=causal_lm): "
                      "distillation matches next-token distributions.")
  if t.sample_prompt:
    raise ConfigError("train.sample_prompt needs a causal LM (text continuation); a masked LM "
                      "cannot generate. Set train.sample_prompt=''.")


def profile_range(spec: str) -> tuple[int, int] | None:
  """train.profile_steps "START:END" as (START, END), both included; None when empty."""
  if not spec:
    return None
  start, _, end = spec.partition(":")
  if not (start.strip().isdigit() and end.strip().isdigit() and 1 <= int(start) <= int(end)):
    raise ConfigError(f"train.profile_steps must be START:END with 1 <= START <= END (steps "
                      f"numbered as in the logs, both included; e.g. 10:12), got '{spec}'.")
  return int(start), int(end)


def check_tracking_installed(t: ConfigDict) -> None:
  """Before a loop starts (not when a run's config is read): W&B needs its package."""
  if t.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"train.wandb_project={t.wandb_project} needs the wandb package: pip "
                      "install 'lmjax[wandb]' (or set train.wandb_project='').")


MIXTURE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def parse_mixture(spec: str) -> list[tuple[str, float, str]]:
  """[(name, weight normalized to sum 1, source)]; raises a ConfigError naming the bad entry."""
  entries, names = [], set()
  for entry in (e.strip() for e in spec.split(",")):
    parts = entry.split(":", 2)
    if len(parts) != 3:
      raise ConfigError(f"data.mixture entry '{entry}' is not NAME:WEIGHT:SOURCE, e.g. "
                        "web:0.7:text:/data/web/*.jsonl,code:0.3:parquet:/data/code/*.parquet.")
    name, weight, source = parts
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if not MIXTURE_NAME.match(name) or name in names:
      raise ConfigError(f"data.mixture: source name '{name}' must be letters, digits and _, and "
                        "unique.")
    if not weight > 0:
      raise ConfigError(f"data.mixture: the weight of '{name}' must be a number > 0, got "
                        f"'{parts[1]}'.")
    if source.partition(":")[0] not in ("text", "parquet", "arrow", "tfds") and (
        source != "pystdlib"):
      raise ConfigError(f"data.mixture: source '{source}' of '{name}' is not one of pystdlib, "
                        "text:GLOB, parquet:GLOB, arrow:PATH, tfds:NAME.")
    names.add(name)
    entries.append((name, weight, source))
  total = sum(w for _, w, _ in entries)
  return [(name, w / total, source) for name, w, source in entries]


def _check_mixture(data: ConfigDict) -> None:
  """data.mixture parses; it replaces data.source, which becomes "mixture"."""
  if not data.mixture:
    if data.source == "mixture":
      raise ConfigError("data.source=mixture needs data.mixture=NAME:WEIGHT:SOURCE,...; or set "
                        "data.source to one corpus.")
    return
  parse_mixture(data.mixture)
  if data.source not in ("synthetic", "mixture"):
    raise ConfigError(f"Both data.source={data.source} and data.mixture are set: put that source "
                      "in the mixture (NAME:WEIGHT:SOURCE) and set data.source=mixture (or leave "
                      "it unset), or drop data.mixture.")
  data.source = "mixture"


def finalize(cfg: ConfigDict) -> ConfigDict:
  """Checks every value and the relations between keys, and fills derived values."""
  check_choices(cfg)
  check_ranges(cfg)
  finalize_model(cfg.model)
  if cfg.data.seq_len > cfg.model.max_len:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={cfg.model.max_len}.")
  if cfg.optim.accumulation_steps < 1 or cfg.train.batch_size % cfg.optim.accumulation_steps:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                      f"optim.accumulation_steps={cfg.optim.accumulation_steps}.")
  _check_mixture(cfg.data)
  _check_finetune(cfg)
  _check_objective(cfg)
  profile_range(cfg.train.profile_steps)
  ids = cfg.distributed.local_device_ids
  if ids and not all(part.strip().isdigit() for part in ids.split(",")):
    raise ConfigError(f"distributed.local_device_ids must be comma-separated device numbers "
                      f"(e.g. 0,1,2,3), got '{ids}'.")
  return cfg


def get_config(spec: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
  """The resolved config: file (or defaults), overrides, validation, derived values."""
  if spec:
    cfg = load_config_file(spec)
    validate_against_schema(cfg, where=spec.partition(":")[0])
  else:
    cfg = default_config()
  return finalize(complete(apply_overrides(cfg, overrides)))


# --- saved configs and what identifies a run ----------------------------------------------------

def to_json(cfg: ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
  return from_dict(json.loads(text))


def from_dict(saved: dict) -> ConfigDict:
  """A config from its JSON form (where tuples, such as mesh.rules, became lists)."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    return tuple(fix(x) for x in v) if isinstance(v, list) else v
  return ConfigDict(fix(saved))


def identity(cfg) -> dict[str, Any]:
  """The keys that say which run a config makes, {"section.key": value}: the model (every key but
  RUNTIME_MODEL_KEYS), the objective (with the masking keys of a masked LM) and, for a
  fine-tuning, what it starts from and how it adapts. A workdir's run resumes only under a config
  with the same identity."""
  out = {f"model.{k}": v for k, v in cfg["model"].items() if k not in RUNTIME_MODEL_KEYS}
  out["train.objective"] = cfg["train"]["objective"]
  if cfg["train"]["objective"] == "masked_lm":
    out.update({f"train.{k}": cfg["train"][k] for k in MASKED_LM_KEYS})
  distill = cfg.get("distill") or {}
  if distill.get("teacher"):
    out.update({f"distill.{k}": distill[k] for k in DISTILL_IDENTITY_KEYS})
  finetune = cfg.get("finetune") or {}
  if finetune.get("init"):
    out.update({f"finetune.{k}": finetune[k] for k in FINETUNE_IDENTITY_KEYS})
  return out


# --- describing the schema ----------------------------------------------------------------------

def describe(cfg: ConfigDict) -> str:
  """Every key, its value and (if enumerated) its allowed values, one a line."""
  lines = []
  for key, value in flat_items(cfg).items():
    allowed = f"  ({' | '.join(CHOICES[key])})" if key in CHOICES else ""
    lines.append(f"{key} = {value!r}{allowed}")
  return "\n".join(lines)


def choices_table() -> str:
  """Markdown: each enumerated key, its default and its allowed values (the README's table)."""
  defaults = flat_items(default_config())
  lines = ["| key | default | allowed values |", "| --- | --- | --- |"]
  lines += [f"| `{key}` | `{defaults[key]}` | {', '.join(f'`{v}`' for v in allowed)} |"
            for key, allowed in CHOICES.items()]
  return "\n".join(lines)
