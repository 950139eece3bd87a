"""Scaling sweeps, the plan: a ladder of model shapes x compute budgets, each point trained by `train.train`.

A sweep config file's `get_config()` returns `default_sweep_config()` with values changed: the base
training config, the shapes (explicit, or generated from target parameter counts by a width/depth
rule) and the budgets (FLOPs or tokens). For every (shape, budget) point the number of steps follows
from the README's FLOP formula (`model.flops_per_token`): steps = C / (flops_per_token x batch x
seq_len); warmup is `warmup_fraction` of the steps and the decay ends at the last step, so the
schedule keeps its shape at every run length. Everything else (batch, learning rate, data, eval and
checkpoint intervals) comes from the base config.

  DIR/<point>/            the point's training workdir (a normal `lmjax train` run: resumable)
  DIR/<point>/result.json written when the point has finished: final val loss, bits/byte, N, D, C
  DIR/results.jsonl       one line per finished point, rebuilt from the result.json files
  DIR/sweep.json          the sweep's config file, overrides and points

Rerunning skips finished points and resumes an interrupted one from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lmjax import config as config_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError
from lmjax.flops import count_nonembedding, count_params, flops_per_token
from lmjax.model import ModelConfig, Transformer


def default_sweep_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.base = config_lib.default_config()  # the training config every point starts from
  # Shapes: explicit dicts of model keys (and optionally "name", or dotted keys such as
  # "optim.learning_rate"), e.g. ({"num_layers": 2, "d_model": 128, "num_heads": 4,
  # "mlp_dim": 512},), or generated for each of target_params (non-embedding parameters).
  s.models = ()
  s.target_params = ()
  s.aspect_ratio = 64.0  # generated shapes: num_layers ~ (N / (12 aspect^2))^(1/3), d_model ~ aspect x layers
  s.head_dim = 64  # generated shapes: num_heads = d_model / head_dim
  s.mlp_ratio = 4.0  # generated shapes: mlp_dim = mlp_ratio x d_model (SwiGLU: about 8/3)
  s.width_multiple = 64  # generated d_model and mlp_dim are multiples of this (and of head_dim)
  # Budgets: training FLOPs per run (C) or training tokens per run (D); one of the two.
  s.flops = ()
  s.tokens = ()
  # Leave out (shape, budget) pairs whose tokens per non-embedding parameter fall outside
  # [min, max] (0 = no bound): an IsoFLOP profile needs sizes around its optimum, not far beyond.
  s.min_tokens_per_param = 0.0
  s.max_tokens_per_param = 0.0
  s.min_steps = 10  # pairs with fewer steps are left out
  s.warmup_fraction = 0.05  # of each point's steps
  return s


@dataclasses.dataclass
class Point:
  name: str
  cfg: ml_collections.ConfigDict  # finalized training config
  workdir: str
  budget_kind: str  # "flops" | "tokens"
  budget: float
  steps: int
  tokens: int  # D: training tokens
  flops: float  # C: training FLOPs (flops_per_token x D)
  flops_per_token: float
  params: int  # every parameter
  params_nonembedding: int  # without token/position tables and an untied output layer

  def summary(self) -> dict:
    m = self.cfg.model
    return {"name": self.name, "budget_kind": self.budget_kind, "budget": self.budget,
            "steps": self.steps, "tokens": self.tokens, "flops": self.flops,
            "flops_per_token": self.flops_per_token, "params": self.params,
            "params_nonembedding": self.params_nonembedding, "num_layers": m.num_layers,
            "d_model": m.d_model, "num_heads": m.num_heads, "mlp_dim": m.mlp_dim,
            "batch_size": self.cfg.train.batch_size, "seq_len": self.cfg.data.seq_len,
            "learning_rate": self.cfg.optim.learning_rate,
            "parametrization": m.parametrization}


def load_sweep(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """The sweep file's config, checked against the sweep schema; `overrides` (`a.b=v`, from
  `--config.a.b=v`) apply to the base training config. The base keeps unset derived values
  (head_dim 0, ...) so that each point derives its own."""
  s = config_lib.load_config_file(spec)
  where = spec.partition(":")[0]
  schema = default_sweep_config()
  for key, value in s.items():
    if key not in schema:
      raise ConfigError(f"Unknown sweep key '{key}' ({where}); sweep keys are "
                        f"{', '.join(schema.keys())}. Training keys go under 'base'.")
    if key != "base":
      config_lib.check_type(key, value, schema[key], where)
  full = default_sweep_config()
  full.update({k: v for k, v in s.items() if k != "base"})
  if "base" in s:
    if not isinstance(s.base, ml_collections.ConfigDict):
      raise ConfigError(f"{where}: 'base' must be a training config (lmjax.config.default_config() "
                        "with values changed).")
    config_lib.validate_against_schema(s.base, where=f"{where}, base")
    full.base = config_lib.complete(config_lib.apply_overrides(s.base, overrides))
  else:
    full.base = config_lib.apply_overrides(full.base, overrides)
  config_lib.check_choices(full.base)
  check_sweep(full, where)
  return full


def check_sweep(s, where: str) -> None:
  if not s.models and not s.target_params:
    raise ConfigError(f"{where}: the sweep has no shapes: set models (explicit shapes) or "
                      "target_params (generated shapes).")
  if bool(s.flops) == bool(s.tokens):
    raise ConfigError(f"{where}: set exactly one of flops (compute budgets) and tokens (token "
                      "budgets).")
  if any(b <= 0 for b in tuple(s.flops) + tuple(s.tokens) + tuple(s.target_params)):
    raise ConfigError(f"{where}: budgets and target_params must be positive.")
  if not 0.0 <= s.warmup_fraction < 1.0:
    raise ConfigError(f"{where}: warmup_fraction must be in [0, 1), got {s.warmup_fraction}.")
  if not s.base.data.source:
    raise ConfigError(f"{where} trains on a corpus of your own: pass --config.data.source=text:GLOB "
                      "(or tfds:NAME; see the README's Data section).")
  for model in s.models:
    if not isinstance(model, dict):
      raise ConfigError(f"{where}: each entry of models must be a dict of model keys, got "
                        f"{model!r}.")


def _param_counts(cfg) -> tuple[int, int]:
  model = Transformer(ModelConfig.from_config(cfg))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  return count_params(shapes), count_nonembedding(shapes)


def _round_to(x: float, multiple: int) -> int:
  return max(multiple, round(x / multiple) * multiple)


def generated_shape(s, target: float) -> dict:
  """The shape for `target` non-embedding parameters: the depth from the aspect ratio (d_model
  / num_layers), then the width that comes closest to the target at that depth, in multiples of
  width_multiple (a transformer layer has about 12 d_model^2 parameters with mlp_ratio 4)."""
  multiple = math.lcm(s.width_multiple, s.head_dim)
  per_layer = 4 + 2 * s.mlp_ratio * (1.5 if s.base.model.style == "llama" else 1.0)
  layers = max(1, round((target / (per_layer * s.aspect_ratio ** 2)) ** (1 / 3)))
  best = None
  for d_model in {_round_to(math.sqrt(target / (per_layer * layers)), multiple),
                  _round_to(math.sqrt(target / (per_layer * layers)) + multiple / 2, multiple),
                  _round_to(math.sqrt(target / (per_layer * layers)) - multiple / 2, multiple)}:
    shape = {"num_layers": layers, "d_model": d_model, "num_heads": d_model // s.head_dim,
             "num_kv_heads": 0, "head_dim": s.head_dim,
             "mlp_dim": _round_to(s.mlp_ratio * d_model, s.width_multiple)}
    n = _param_counts(_point_config(s.base, shape, 1, 0.0))[1]
    error = abs(math.log(n / target))
    if best is None or error < best[0]:
      best = (error, shape)
  return best[1]


def shape_name(shape: dict) -> str:
  return shape.get("name") or f"l{shape['num_layers']}d{shape['d_model']}"


def _budget_label(kind: str, budget: float) -> str:
  return ("c" if kind == "flops" else "t") + f"{budget:.3g}".replace("+", "")


def _point_config(base, shape: dict, steps: int, warmup_fraction: float):
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in shape.items():
    if key == "name":
      continue
    section, _, name = key.rpartition(".")
    node = cfg[section] if section else cfg.model
    if name not in node:
      raise ConfigError(f"Unknown key '{key}' in a sweep shape: use model keys (d_model, ...) or "
                        "dotted training keys (optim.learning_rate, ...).")
    node[name] = value
  cfg.train.steps = steps
  cfg.optim.warmup_steps = round(warmup_fraction * steps)
  config_lib.validate_against_schema(cfg, "sweep point")
  return config_lib.finalize(cfg)


def make_plan(s, workdir: str) -> tuple[list[Point], list[str]]:
  """The points in run order (budgets ascending, then sizes), and a note for each pair left
  out. Every point's config is validated here, before anything runs."""
  base = s.base
  if not base.data.prepared_dir:  # every point reads the same prepared shards and tokenizer
    base = ml_collections.ConfigDict(base.to_dict())
    base.data.prepared_dir = workdir_lib.prepared_dir(base, workdir)
  shapes, left_out = [dict(m) for m in s.models], []
  for target in s.target_params:
    shape = generated_shape(s, target)
    if any(shape_name(shape) == shape_name(other) for other in shapes):
      left_out.append(f"target_params={target:.3g}: the same shape as a smaller target "
                      f"({shape_name(shape)})")
    else:
      shapes.append(shape)
  names = [shape_name(shape) for shape in shapes]
  if len(set(names)) != len(names):
    raise ConfigError(f"Two sweep shapes have the same name ({', '.join(names)}): give the "
                      "explicit ones a distinct \"name\".")
  kind, budgets = ("flops", s.flops) if s.flops else ("tokens", s.tokens)
  tokens_per_step = base.train.batch_size * base.data.seq_len
  sizes = {}  # shape name -> (flops per token, params, non-embedding params)
  for shape in shapes:
    cfg = _point_config(base, shape, 1, s.warmup_fraction)
    sizes[shape_name(shape)] = (flops_per_token(ModelConfig.from_config(cfg), cfg.data.seq_len),
                                *_param_counts(cfg))
  points = []
  for budget in sorted(budgets):
    for shape in shapes:
      name = f"{shape_name(shape)}_{_budget_label(kind, budget)}"
      fpt, params, nonembedding = sizes[shape_name(shape)]
      tokens_wanted = budget / fpt if kind == "flops" else budget
      steps = round(tokens_wanted / tokens_per_step)
      ratio = steps * tokens_per_step / nonembedding
      why = None
      if steps < max(1, s.min_steps):
        why = f"{steps} steps < min_steps={s.min_steps}"
      elif s.min_tokens_per_param and ratio < s.min_tokens_per_param:
        why = f"{ratio:.3g} tokens/param < min_tokens_per_param={s.min_tokens_per_param:g}"
      elif s.max_tokens_per_param and ratio > s.max_tokens_per_param:
        why = f"{ratio:.3g} tokens/param > max_tokens_per_param={s.max_tokens_per_param:g}"
      if why:
        left_out.append(f"{name}: {why}")
        continue
      cfg = _point_config(base, shape, steps, s.warmup_fraction)
      tokens = steps * tokens_per_step
      points.append(Point(name, cfg, os.path.join(workdir, name), kind, float(budget), steps,
                          tokens, fpt * tokens, fpt, params, nonembedding))
  if not points:
    raise ConfigError("Every (shape, budget) pair of the sweep was left out:\n  " +
                      "\n  ".join(left_out))
  return points, left_out
