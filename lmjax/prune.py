"""Structured pruning (`lmjax prune`): a trained run in, an ordinary smaller dense run out.

Importance is measured on calibration batches of the run's training split, from activations
(as in Minitron, Muralidharan et al. 2024), all on the unpruned model:

  heads   each attention head's output norm, summed over tokens; with grouped-query attention
          whole KV groups go (a group's score is its query heads' sum), the same number in every
          layer, the query heads of a kept group with it
  mlp     each MLP channel's mean |activation| (after the nonlinearity, SwiGLU's product)
  layers  block importance, 1 - mean cos(block input, block output): the layers that change
          their input least go

`--target=heads=N,mlp=F,layers=L` gives the new sizes (any of them). The result is a run with
config.json (the smaller model, the same head_dim, tokenizer and prepared data) and its params
as a checkpoint of step 0 with no optimizer state, as an import writes: eval, generate,
convert --to_hf, finetune and distill take it as they take any run; `lmjax distill
--workdir=OUT --teacher=RUN` continues it toward the unpruned model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError
from lmjax.metrics import log
from lmjax.trees import to_host

TARGETS = ("heads", "mlp", "layers")


def parse_target(spec: str, c) -> dict:
  """{"heads": N, "mlp": F, "layers": L} (the kept sizes; missing ones stay) from
  "heads=N,mlp=F,layers=L", checked against the model `c` (config.model)."""
  out = {"heads": c.num_heads, "mlp": c.mlp_dim, "layers": c.num_layers}
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    key, _, value = part.partition("=")
    if key not in TARGETS or not value.strip().isdigit():
      raise ConfigError(f"--target: '{part}' is not NAME=SIZE with NAME one of "
                        f"{', '.join(TARGETS)} (e.g. --target=heads=2,mlp=512,layers=3).")
    out[key] = int(value)
  group = c.num_heads // c.num_kv_heads
  for key, old in (("heads", c.num_heads), ("mlp", c.mlp_dim), ("layers", c.num_layers)):
    if not 1 <= out[key] <= old:
      raise ConfigError(f"--target {key}={out[key]} must be between 1 and the model's {old}.")
  if out["heads"] % group:
    raise ConfigError(f"--target heads={out['heads']} must be a multiple of {group}: the model "
                      f"has {c.num_kv_heads} KV groups of {group} query heads, and pruning "
                      "removes whole groups.")
  return out


def check_mesh(cfg, target: dict) -> None:
  """The pruned widths must still divide the mesh axes that shard them."""
  tensor = cfg.mesh.tensor
  kv = target["heads"] // (cfg.model.num_heads // cfg.model.num_kv_heads)
  for name, size in (("heads", target["heads"]), ("KV heads", kv), ("mlp", target["mlp"])):
    if tensor > 1 and size % tensor:
      raise ConfigError(f"The pruned model's {size} {name} do not divide mesh.tensor={tensor}: "
                        "choose a multiple of it, or run the pruned model with a smaller "
                        "mesh.tensor.")


def _layers(params, c) -> list:
  """The model's per-layer trees, in order (a scanned model's stack split)."""
  if c.scan_layers:
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
            for i in range(c.num_layers)]
  return [params[f"layer_{i}"] for i in range(c.num_layers)]


def importance(run, params, batches) -> dict:
  """Summed activation statistics over `batches`: per layer, head norms [L, N], MLP |act|
  [L, F] and block cosines [L], and the token count."""
  c = run.model.cfg

  def stats(params, tokens_BT1):
    _, state = run.model.apply({"params": params}, tokens_BT1[:, :-1], return_hidden=True,
                               mutable=["intermediates"])
    inter = state["intermediates"]
    get = {"heads": lambda t: t["attn"]["head_norm"][0], "mlp": lambda t: t["mlp"]["mlp_abs"][0],
           "cos": lambda t: t["block_cos"][0]}
    if c.scan_layers:  # stacked over layers already
      return {k: f(inter["layers"]) for k, f in get.items()}
    return {k: jnp.stack([f(inter[f"layer_{i}"]) for i in range(c.num_layers)])
            for k, f in get.items()}

  step = jax.jit(stats, in_shardings=(run.state_shardings.params,
                                      run.batch_shardings["tokens"]))
  total, tokens = None, 0
  for batch in batches:
    with run.context():
      out = step(params, run.put_batch(batch)["tokens"])
    out = jax.tree_util.tree_map(lambda x: np.asarray(to_host(x), np.float64), out)
    total = out if total is None else jax.tree_util.tree_map(np.add, total, out)
    tokens += run.cfg.train.batch_size * run.cfg.data.seq_len
  return {**total, "tokens": tokens}


def choose(scores: dict, c, target: dict) -> dict:
  """What stays: the layers (in order), and per kept layer its KV groups and MLP channels."""
  block_importance = 1.0 - scores["cos"] / scores["tokens"]
  layers = sorted(np.argsort(-block_importance, kind="stable")[:target["layers"]].tolist())
  group = c.num_heads // c.num_kv_heads
  groups, channels = {}, {}
  for i in layers:
    group_scores = scores["heads"][i].reshape(c.num_kv_heads, group).sum(-1)
    groups[i] = sorted(np.argsort(-group_scores, kind="stable")[:target["heads"] // group])
    channels[i] = sorted(np.argsort(-scores["mlp"][i], kind="stable")[:target["mlp"]])
  return {"layers": layers, "groups": groups, "channels": channels,
          "block_importance": block_importance}


def _prune_layer(layer: dict, kv_groups, channels, group: int) -> dict:
  """One layer's tree with only the kept KV groups (their query heads) and MLP channels."""
  heads = np.asarray([g * group + j for g in kv_groups for j in range(group)])
  kv = np.asarray(kv_groups)
  channels = np.asarray(channels)
  take = lambda x, idx, axis: np.take(np.asarray(x), idx, axis=axis)
  out = jax.tree_util.tree_map(np.asarray, layer)
  attn, mlp = out["attn"], out["mlp"]
  for name, idx in (("query", heads), ("key", kv), ("value", kv)):
    attn[name]["kernel"] = take(attn[name]["kernel"], idx, 1)  # [D, N, H]
    if "bias" in attn[name]:
      attn[name]["bias"] = take(attn[name]["bias"], idx, 0)  # [N, H]
  attn["out"]["kernel"] = take(attn["out"]["kernel"], heads, 0)  # [N, H, D]
  for name in ("up", "gate"):
    if name in mlp:
      mlp[name]["kernel"] = take(mlp[name]["kernel"], channels, 1)  # [D, F]
      if "bias" in mlp[name]:
        mlp[name]["bias"] = take(mlp[name]["bias"], channels, 0)
  mlp["down"]["kernel"] = take(mlp["down"]["kernel"], channels, 0)  # [F, D]
  return out


def pruned_params(params, c, kept: dict) -> dict:
  """The smaller model's params (host arrays): the kept layers, renumbered, each pruned."""
  group = c.num_heads // c.num_kv_heads
  layers = _layers(params, c)
  new = [_prune_layer(jax.tree_util.tree_map(to_host, layers[i]), kept["groups"][i],
                      kept["channels"][i], group) for i in kept["layers"]]
  out = {k: jax.tree_util.tree_map(to_host, v) for k, v in params.items()
         if k != "layers" and not k.startswith("layer_")}
  if c.scan_layers:
    out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *new)
  else:
    out.update({f"layer_{i}": layer for i, layer in enumerate(new)})
  return out


def derived_config(cfg, workdir: str, **model_changes):
  """The config of a run made from `workdir`'s (pruned, quantized): a run of its own (no
  fine-tuning, distillation or tracking keys), the model keys changed, reading the source run's
  tokenizer and prepared data."""
  out = config_lib.ConfigDict(cfg.to_dict())
  defaults = config_lib.default_config()
  out.finetune, out.distill = defaults.finetune, defaults.distill
  out.train.wandb_project, out.train.profile_steps = "", ""
  out.model.update(model_changes)
  if cfg.data.source != "synthetic":
    out.data.tokenizer = workdir_lib.absolute(workdir_lib.tokenizer_path(cfg, workdir))
    out.data.prepared_dir = workdir_lib.absolute(workdir_lib.prepared_dir(cfg, workdir))
  return config_lib.finalize(out)


def pruned_config(cfg, workdir: str, target: dict):
  """The smaller run's config: the same model but the pruned sizes (head_dim kept)."""
  group = cfg.model.num_heads // cfg.model.num_kv_heads
  return derived_config(cfg, workdir, head_dim=cfg.model.head_dim, num_heads=target["heads"],
                        num_kv_heads=target["heads"] // group, mlp_dim=target["mlp"],
                        num_layers=target["layers"])


def prune(workdir: str, out: str, target_spec: str, calibration_batches: int = 8) -> dict:
  """Prunes the latest params of `workdir` into the new run `out`; returns what was kept and
  the size before and after."""
  cfg = workdir_lib.load_config(workdir)
  target = parse_target(target_spec, cfg.model)
  check_mesh(cfg, target)
  workdir_lib.require_new(out)
  new_cfg = pruned_config(cfg, workdir, target)
  small = builder.build(new_cfg, builder.pretraining_objective(new_cfg))  # its errors first
  cfg, run, params, step = builder.load_params(workdir)
  iterator = data_lib.make_iterator(cfg, workdir, "train", run.process_rows)
  batches = [next(iterator) for _ in range(calibration_batches)]
  getattr(iterator, "close", lambda: None)()
  kept = choose(importance(run, params, batches), cfg.model, target)
  host = pruned_params(params, cfg.model, kept)
  placed = builder.place(host, small.abstract_state.params)
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(out),
                                 new_cfg.train.keep_checkpoints) as checkpoints:
    checkpoints.save_params(0, placed)  # params only: training makes its optimizer state
  if jax.process_index() == 0:  # config.json last: its presence means the run is whole
    workdir_lib.write_config(new_cfg, out)
  log(f"Pruned {workdir} (step {step}, {run.num_params / 1e6:.2f}M params) to {out} "
      f"({small.num_params / 1e6:.2f}M params): layers {kept['layers']} of {cfg.model.num_layers}"
      f", {target['heads']} of {cfg.model.num_heads} heads and {target['mlp']} of "
      f"{cfg.model.mlp_dim} MLP channels a layer, by importance on {calibration_batches} "
      "calibration batches of the training split.")
  if cfg.model.style == "gpt2" and target["heads"] < cfg.model.num_heads:
    log("Note: HF GPT-2 ties head_dim x heads to d_model, so `lmjax convert --to_hf` refuses a "
        "GPT-2-style run with pruned heads (Llama-style runs export with any head count).")
  return {"kept": kept, "params_before": run.num_params, "params_after": small.num_params,
          "config": new_cfg, "step": step}


def evaluate(workdir: str) -> dict:
  """The val split's loss of a run's latest params (as `lmjax eval` computes it)."""
  _, run, params, _ = builder.load_params(workdir)
  return evaluate_lib.evaluate_split(run, workdir, run.jit_eval_step(), params)
