"""Scaling sweeps: a ladder of model shapes x compute budgets, each point trained by `train.train`.

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
import json
import math
import os
import shlex
import socket
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from lmjax import config as config_lib
from lmjax.config import ConfigError
from lmjax.model import ModelConfig, Transformer, count_params, flops_per_token

EMBEDDING_PARAMS = ("embedding", "pos_embed", "head")  # lookup tables and the untied output layer


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


# ---- loading -----------------------------------------------------------------------------------

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
      config_lib._check_type(key, value, schema[key], where)
  full = default_sweep_config()
  full.update({k: v for k, v in s.items() if k != "base"})
  if "base" in s:
    if not isinstance(s.base, ml_collections.ConfigDict):
      raise ConfigError(f"{where}: 'base' must be a training config (lmjax.config.default_config() "
                        "with values changed).")
    config_lib.validate_against_schema(s.base, where=f"{where}, base")
    base = config_lib.default_config()
    base.update(config_lib.apply_overrides(s.base, overrides))
    full.base = base
  else:
    full.base = config_lib.apply_overrides(full.base, overrides)
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


# ---- shapes and points -------------------------------------------------------------------------

def count_nonembedding(params) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(x.size for path, x in leaves
             if not any(str(getattr(k, "key", k)) in EMBEDDING_PARAMS for k in path))


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
    from lmjax.data.tokenizer import prepared_dir
    base = ml_collections.ConfigDict(base.to_dict())
    base.data.prepared_dir = prepared_dir(base, workdir)
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


# ---- state of a sweep directory ----------------------------------------------------------------

def _comparable(cfg_dict: dict) -> dict:
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        if prefix or k != "distributed":  # how processes find each other is not the run's
          walk(v, f"{prefix}{k}.")
      else:
        flat[prefix + k] = v
  walk(cfg_dict, "")
  return flat


def check_point_config(point: Point) -> None:
  """A point that started with other settings is not silently continued or reused."""
  path = epath.Path(point.workdir) / "config.json"
  if not path.exists():
    return
  saved = _comparable(json.loads(path.read_text()))
  now = _comparable(json.loads(config_lib.to_json(point.cfg)))
  # keys newer than the saved run are left out: it ran with their defaults
  diffs = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now"
           for k in sorted(saved) if saved[k] != now.get(k)]
  if diffs:
    raise ConfigError(
        f"Sweep point '{point.name}' in {point.workdir} was trained with other settings:\n  " +
        "\n  ".join(diffs[:8]) + ("\n  ..." if len(diffs) > 8 else "") +
        "\nUse a new --workdir for the changed sweep, or delete that point's directory to "
        "retrain it. Nothing was changed.")


def read_result(point: Point) -> dict | None:
  path = epath.Path(point.workdir) / "result.json"
  return json.loads(path.read_text()) if path.exists() else None


def status(point: Point) -> str:
  """done (result written) | partial (checkpoints, no result) | new."""
  if read_result(point) is not None:
    return "done"
  ckpt = epath.Path(point.workdir) / "checkpoints"
  if ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()):
    return "partial"
  return "new"


def write_results(points: list[Point], workdir: str) -> list[dict]:
  """Rebuilds DIR/results.jsonl from the finished points' result.json (whole file, then renamed:
  a reader never sees half of it)."""
  results = [r for r in (read_result(p) for p in points) if r is not None]
  path = epath.Path(workdir) / "results.jsonl"
  # a name of its own: sweep jobs on several nodes may rebuild the file at the same time
  tmp = epath.Path(workdir) / f"results.jsonl.{socket.gethostname()}.{os.getpid()}.tmp"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
  tmp.replace(path)
  return results


def read_results(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / "results.jsonl"
  if not path.exists():
    raise ConfigError(f"No {path}: run `lmjax sweep --config=... --workdir={workdir}` first (it "
                      "writes a line for every finished point).")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- running -----------------------------------------------------------------------------------

def _format_count(x: float) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= size:
      return f"{x / size:.3g}{unit}"
  return f"{x:.3g}"


def format_duration(seconds: float) -> str:
  seconds = round(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def format_plan(points: list[Point], left_out: list[str], statuses: dict) -> str:
  lines = [(f"{'point':<22}{'N (non-emb.)':>13}{'N (all)':>9}{'D (tokens)':>11}"
            f"{'C (FLOPs)':>11}{'steps':>8}{'D/N':>7}  status")]
  for p in points:
    lines.append(f"{p.name:<22}{_format_count(p.params_nonembedding):>13}"
                 f"{_format_count(p.params):>9}{_format_count(p.tokens):>11}{p.flops:>11.3g}"
                 f"{p.steps:>8}{p.tokens / p.params_nonembedding:>7.3g}  {statuses[p.name]}")
  total = sum(p.flops for p in points)
  lines.append(f"{len(points)} points, {total:.3g} training FLOPs in all.")
  if left_out:
    lines.append("Left out: " + "; ".join(left_out))
  return "\n".join(lines)


class Eta:
  """Time left: each point costs a fixed overhead (compiling, evaluating, checkpointing: the median
  over finished points) plus its FLOPs at the measured training rate (the runs' step times)."""

  def __init__(self):
    self.samples: list[tuple[float, float, float]] = []  # (FLOPs, training s, overhead s)

  def add(self, flops: float, seconds: float, train_seconds: float | None) -> None:
    if train_seconds is None or not 0 < train_seconds <= seconds:
      train_seconds = seconds
    self.samples.append((flops, train_seconds, seconds - train_seconds))

  def seconds_for(self, flops_list) -> float | None:
    if not self.samples:
      return None
    c, t, overhead = np.array(self.samples).T
    return float(sum(np.median(overhead) + f * t.sum() / c.sum() for f in flops_list))


def _train_seconds(point: Point) -> float | None:
  """Time spent in train steps (compiling and evaluating excluded), from the run's step times."""
  from lmjax import metrics as metrics_lib
  times = [r["step_time"] for r in metrics_lib.read_metrics(point.workdir)
           if r.get("split") == "train" and "step_time" in r]
  return float(np.median(times)) * point.steps if times else None


def _final_val(point: Point, result: dict) -> dict:
  """The final validation numbers: from this invocation, else from the run's metrics.jsonl (a
  sweep killed after the point's last step), else evaluated from its last checkpoint."""
  if result.get("val"):
    return result["val"]
  from lmjax import metrics as metrics_lib
  vals = [r for r in metrics_lib.read_metrics(point.workdir)
          if r.get("split") == "val" and r["step"] == point.steps]
  if vals:
    return vals[-1]
  from lmjax import evaluate as evaluate_lib
  from lmjax import train as train_lib
  cfg, setup, state = train_lib.load_run(point.workdir)
  _, eval_step = train_lib.compile_steps(setup, point.workdir)
  return evaluate_lib.evaluate_split(cfg, point.workdir, setup, eval_step, state.params)


def _epochs(point: Point) -> float | None:
  if point.cfg.data.source == "synthetic":
    return None
  from lmjax import data as data_lib
  train_tokens = data_lib.read_index(point.cfg, point.workdir)["splits"]["train"]["tokens"]
  return point.tokens / train_tokens


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run(s, spec: str, workdir: str, overrides=(), progress: bool = True,
        only: str | None = None) -> dict:
  """Trains every unfinished point (or only the point named `only`), one after another.
  Returns {"results": [...], "stopped": bool}."""
  from lmjax import train as train_lib
  points, left_out = make_plan(s, workdir)
  if only is not None:
    chosen = [p for p in points if p.name == only]
    if not chosen:
      raise ConfigError(f"No point '{only}' in this sweep; its points are: "
                        f"{', '.join(p.name for p in points)}.")
  for p in points:
    check_point_config(p)
  statuses = {p.name: status(p) for p in points}
  is_writer = jax.process_index() == 0
  if is_writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "sweep.json").write_text(json.dumps(
        {"config": spec, "overrides": list(overrides),
         "points": [p.summary() for p in points], "left_out": left_out}, indent=1))
  _say(format_plan(points, left_out, statuses))
  if any(statuses[p.name] != "done" for p in points) and not data_ready(points[0].cfg):
    _say(f"Preparing the data every point reads ({points[0].cfg.data.prepared_dir}).")
    prepare_data(s, workdir, points[0].cfg)

  eta = Eta()
  for p in points:
    r = read_result(p)
    if r and not r.get("resumed") and r.get("seconds"):
      eta.add(r["flops"], r["seconds"], r.get("train_seconds"))
  todo = [p for p in points if statuses[p.name] != "done" and (only is None or p.name == only)]
  done = sum(statuses[p.name] == "done" for p in points)
  stopped = False
  for i, p in enumerate(todo):
    left = eta.seconds_for([q.flops for q in todo[i:]])
    _say(f"[sweep {done + 1}/{len(points)}] {p.name}: N {_format_count(p.params_nonembedding)} "
         f"non-embedding ({_format_count(p.params)} in all), D {_format_count(p.tokens)} tokens, "
         f"C {p.flops:.3g} FLOPs, {p.steps} steps" +
         (" (resuming)" if statuses[p.name] == "partial" else "") +
         (f"; about {format_duration(left)} left" if left is not None else ""))
    start = time.perf_counter()
    result = train_lib.train(p.cfg, p.workdir, progress=progress)
    seconds = time.perf_counter() - start
    if result["stopped_by"]:
      _say(f"Sweep stopped during {p.name} ({result['stopped_by']}); its checkpoint is saved. "
           "Rerun the same command to resume.")
      stopped = True
      break
    val = _final_val(p, result)
    record = {**p.summary(), "val_loss": val["loss"],
              "bits_per_byte": val.get("bits_per_byte"), "val_perplexity": val.get("perplexity"),
              "train_loss": result["train"].get("loss"), "epochs": _epochs(p),
              "seconds": seconds, "train_seconds": _train_seconds(p),
              "resumed": statuses[p.name] == "partial"}
    if is_writer:
      (epath.Path(p.workdir) / "result.json").write_text(json.dumps(record, indent=1))
      write_results(points, workdir)
    if not record["resumed"]:
      eta.add(p.flops, seconds, record["train_seconds"])
    done += 1
    bpb = record["bits_per_byte"]
    left = eta.seconds_for([q.flops for q in todo[i + 1:]])
    _say(f"[sweep {done}/{len(points)}] {p.name} done in {format_duration(seconds)}: val loss "
         f"{record['val_loss']:.4f}" + (f", {bpb:.4f} bits/byte" if bpb is not None else "") +
         (f"; about {format_duration(left)} left" if left and i + 1 < len(todo) else ""))
  results = write_results(points, workdir) if is_writer else []
  if not stopped and only is None:
    missing = [p.name for p in points if read_result(p) is None] if is_writer else []
    _say(f"Sweep finished: {len(results)} of {len(points)} points in "
         f"{os.path.join(workdir, 'results.jsonl')}" +
         (f" (missing: {', '.join(missing)})" if missing else "") +
         f". Fit the scaling law: lmjax fit --workdir={workdir}")
  return {"results": results, "stopped": stopped, "points": points}


def data_ready(cfg) -> bool:
  from lmjax import data as data_lib
  return cfg.data.source == "synthetic" or data_lib.is_prepared(cfg, "")


def prepare_data(s, workdir: str, cfg=None) -> None:
  """Tokenizer and token shards for every point (they share data.prepared_dir), made once."""
  from lmjax import data as data_lib
  from lmjax import sharding as sharding_lib
  cfg = cfg or make_plan(s, workdir)[0][0].cfg
  if jax.process_index() == 0 and not data_ready(cfg):
    data_lib.prepare(cfg, workdir)
  sharding_lib.sync("lmjax:sweep-prepare")
  _say(f"Data ready in {cfg.data.prepared_dir}.")


# ---- cluster launch ----------------------------------------------------------------------------

def launch_commands(s, spec: str, workdir: str, overrides=(), kind: str = "slurm") -> list[str]:
  """Shell commands that run the unfinished points through launch/: `slurm`, one sbatch job per
  point (the scheduler runs them side by side); `tpu`, the whole sweep on one slice, the points
  one after another, each on every chip."""
  points, _ = make_plan(s, workdir)  # every point's config is checked
  flags = [f"--config={spec}", f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]
  if kind == "tpu":  # the sweep on the slice skips and resumes points itself
    if "://" not in workdir:
      raise ConfigError("A TPU slice's workers share the sweep through a bucket: pass "
                        "--workdir=gs://BUCKET/sweeps/NAME.")
    return [shlex.join(["launch/tpu.sh", "sweep", *flags])]
  for p in points:
    check_point_config(p)
  todo = [p for p in points if status(p) != "done"]
  if kind == "slurm":
    lines, after = [], []
    if todo and not data_ready(points[0].cfg):
      # one job prepares the shared tokenizer and shards; the points wait for it (afterok)
      lines.append("prep=$(" + shlex.join(["sbatch", "--parsable", "--job-name=lmjax-prepare",
                                           "launch/slurm.sbatch", "sweep", *flags,
                                           "--prepare_only"]) + ")")
      after = ["--dependency=afterok:${prep%%;*}"]
    for p in todo:
      command = shlex.join(["sbatch", f"--job-name=lmjax-{p.name}", "launch/slurm.sbatch",
                            "sweep", *flags, f"--point={p.name}"])
      if after:  # the dependency's ${...} must reach the shell unquoted
        command = command.replace("sbatch ", f"sbatch {after[0]} ", 1)
      lines.append(command)
    return lines
  raise ConfigError(f"--launch must be slurm or tpu, got '{kind}'.")


def main_sweep(spec: str, workdir: str, overrides=(), point: str | None = None,
               launch: str | None = None, plan: bool = False, prepare_only: bool = False,
               progress: bool = True) -> int:
  """`lmjax sweep`: plan, prepare, launch or run."""
  from lmjax.sharding import initialize_distributed
  s = load_sweep(spec, overrides)
  initialize_distributed(s.base)  # before any JAX work: the points of a multi-host sweep
  if plan:
    points, left_out = make_plan(s, workdir)
    for p in points:
      check_point_config(p)
    print(format_plan(points, left_out, {p.name: status(p) for p in points}))
  elif launch:
    lines = launch_commands(s, spec, workdir, overrides, launch)
    print("\n".join(lines) if lines else f"# every point of {workdir} is done")
  elif prepare_only:
    prepare_data(s, workdir)
  else:
    run(s, spec, workdir, overrides, progress=progress, only=point)
  return 0
