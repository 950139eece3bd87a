"""The muP coordinate check: does a few steps of training change activations by the same amount at
every width?

Under the maximal update parametrization (`model.parametrization="mup"`, see model.py and optim.py)
the mean absolute change of every layer's output after a few optimizer steps stays flat as d_model
grows; under the standard one (`sp`) with the same learning rate it grows with width (about
linearly with Adam), which is why sp's best learning rate shrinks as models get wider. This is the
check of Yang et al. 2022 (Tensor Programs V, section 8.2 / the mup package's coord check), run on
synthetic tokens, so it needs no data.

  lmjax coordcheck --config=configs/quickstart.py --widths=64,128,256,512
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import builder
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax.errors import ConfigError
from lmjax.losses import objective
from lmjax.plotting import no_minor_labels, pyplot


def width_config(cfg, width: int, parametrization: str, base_width: int):
  """`cfg` at another d_model: head_dim kept (more heads), mlp_dim and the key/value heads scaled
  in proportion; layers scanned off so that each layer's output has its own name."""
  m = cfg.model
  if width % m.head_dim:
    raise ConfigError(f"Coordinate-check width {width} is not a multiple of "
                      f"model.head_dim={m.head_dim}.")
  heads = width // m.head_dim
  kv_heads = max(1, heads * m.num_kv_heads // m.num_heads)
  return config_lib.finalize(config_lib.apply_overrides(cfg, [
      f"model.d_model={width}", f"model.num_heads={heads}", f"model.num_kv_heads={kv_heads}",
      f"model.mlp_dim={max(1, round(m.mlp_dim * width / m.d_model))}",
      f"model.parametrization={parametrization}", f"model.mup_base_width={base_width}",
      "model.scan_layers=false", "model.remat=none", "model.dropout=0.0",
      # a constant learning rate from the first step: the check is about update sizes
      "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=0.0",
      "optim.accumulation_steps=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]))


def _activations(model, params, inputs_BT) -> dict:
  """The outputs of the embedding, of each layer's attention and MLP, of each layer (the residual
  stream) and the logits, by name."""
  logits, state = model.apply({"params": params}, inputs_BT, capture_intermediates=True,
                              mutable=["intermediates"])
  inter = state["intermediates"]
  out = {"embedding": inter["embed"]["__call__"][0]}
  for i in range(model.cfg.num_layers):
    layer = inter[f"layer_{i}"]
    out[f"layer_{i}.attn"] = layer["attn"]["__call__"][0]
    out[f"layer_{i}.mlp"] = layer["mlp"]["__call__"][0]
    out[f"layer_{i}"] = layer["__call__"][0]
  out["logits"] = logits
  return out


def _changes(wcfg, tokens_BT1, steps: int) -> dict:
  """Mean |change| of each activation of the `wcfg` model after `steps` steps on one batch (the
  run's own init and train step, unjitted: one program holds every width)."""
  run = builder.build(wcfg, objective("causal_lm"), devices=jax.devices()[:1])
  state, train_step = run.init_state(), run.train_step()
  batch = {"tokens": tokens_BT1}
  before = _activations(run.model, state.params, tokens_BT1[:, :-1])
  state = jax.lax.fori_loop(0, steps, lambda _, s: train_step(s, batch)[0], state)
  after = _activations(run.model, state.params, tokens_BT1[:, :-1])
  return {name: jnp.mean(jnp.abs(after[name] - before[name])) for name in before}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _all_changes(cfg_jsons: tuple, tokens_BT1, steps: int) -> list:
  # one program for every model: XLA's fixed cost per compilation dominates at these sizes
  return [_changes(config_lib.from_json(j), tokens_BT1, steps) for j in cfg_jsons]


def coord_check(cfg, widths=(64, 128, 256, 512), steps: int = 3, base_width: int | None = None,
                parametrizations=("sp", "mup"), batch_size: int = 8) -> dict:
  """{parametrization: {activation: [mean |change| at each width]}} after `steps` optimizer steps
  on one fixed batch of synthetic tokens, plus "slopes": d log(change) / d log(width) per
  activation (0 = flat, 1 = grows like the width)."""
  base_width = base_width or cfg.model.mup_base_width or min(widths)
  cfg = config_lib.apply_overrides(cfg, ["data.source=synthetic", f"train.batch_size={batch_size}"])
  tokens_BT1 = jnp.asarray(next(data_lib.make_iterator(config_lib.finalize(cfg), ""))["tokens"])
  runs = [(p, w) for p in parametrizations for w in widths]
  changes = jax.device_get(_all_changes(
      tuple(config_lib.to_json(width_config(cfg, w, p, base_width)) for p, w in runs),
      tokens_BT1, steps))
  names = ["embedding"] + [f"layer_{i}{part}" for i in range(cfg.model.num_layers)
                           for part in (".attn", ".mlp", "")] + ["logits"]
  result = {"widths": list(widths), "steps": steps, "base_width": base_width,
            "learning_rate": cfg.optim.learning_rate, "slopes": {}}
  for p in parametrizations:
    result[p] = {n: [float(c[n]) for (q, _), c in zip(runs, changes) if q == p] for n in names}
    result["slopes"][p] = {
        n: float(np.polyfit(np.log(widths), np.log(np.maximum(v, 1e-30)), 1)[0])
        for n, v in result[p].items()}
  return result


def format_table(result: dict) -> str:
  widths = result["widths"]
  lines = [(f"Mean |change| of each activation after {result['steps']} steps at learning rate "
            f"{result['learning_rate']:g} (mup base width {result['base_width']}); slope = "
            "d log(change) / d log(width): 0 is flat, 1 grows like the width.")]
  for parametrization in ("sp", "mup"):
    if parametrization not in result:
      continue
    lines.append(f"\n{parametrization}:")
    lines.append(f"  {'activation':<14}" + "".join(f"{'d=' + str(w):>11}" for w in widths) +
                 f"{'slope':>8}")
    for name, values in result[parametrization].items():
      slope = result["slopes"][parametrization][name]
      lines.append(f"  {name:<14}" + "".join(f"{v:11.3e}" for v in values) + f"{slope:8.2f}")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  plt = pyplot()
  names = [p for p in ("sp", "mup") if p in result]
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), sharey=True, dpi=90)
  axes = np.atleast_1d(axes)
  for ax, parametrization in zip(axes, names):
    for name, values in result[parametrization].items():
      ax.plot(result["widths"], values, marker="o", ms=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="d_model", title=parametrization)
    ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
    no_minor_labels(ax)
  axes[0].set_ylabel(f"mean |change| after {result['steps']} steps")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
