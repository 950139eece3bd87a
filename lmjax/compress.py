"""`lmjax quantize`: a trained run's projections to int8 or int4 (quantize.py) in a new run.

The new run's config is the source's with model.quantize / model.quant_group set, so every
command that reads a model (eval, generate, serve, the lm-eval adapter) restores it as it is:
integer kernels and float32 scales in the Orbax checkpoint, dequantized inside the matmul.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import quantize as quantize_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError
from lmjax.metrics import log
from lmjax.prune import derived_config

# the Projection modules (model.py) and how many of their kernel's leading axes contract
PROJECTIONS = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1}


def quantized_params(params, kind: str, group: int, scanned: bool) -> tuple[dict, int]:
  """Host params -> (the same tree with every projection's kernel as kernel_q + kernel_scale,
  the number of kernels quantized). Scanned layers quantize each layer's slice."""
  count = 0

  def walk(tree, name, in_layers):
    nonlocal count
    if not isinstance(tree, dict):
      return tree
    if name in PROJECTIONS and "kernel" in tree:
      count += 1
      out = {k: v for k, v in tree.items() if k != "kernel"}
      kernel = np.asarray(jax.device_get(tree["kernel"]), np.float32)
      fn = lambda w: quantize_lib.quantize_kernel(w, PROJECTIONS[name], kind, group)  # noqa: E731
      if in_layers:
        parts = [fn(w) for w in kernel]
        out["kernel_q"] = np.stack([q for q, _ in parts])
        out["kernel_scale"] = np.stack([s for _, s in parts])
      else:
        out["kernel_q"], out["kernel_scale"] = fn(kernel)
      return out
    return {k: walk(v, k, in_layers or (scanned and k == "layers")) for k, v in tree.items()}

  return walk(params, "", False), count


def nbytes(tree) -> int:
  """Bytes of a tree of arrays (as held in memory)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def quantize_run(workdir: str, out: str, bits: int, group: int = 128) -> dict:
  """Quantizes the latest params of `workdir` into the new run `out`; returns the sizes."""
  kind = {8: "int8", 4: "int4"}.get(bits)
  if kind is None:
    raise ConfigError(f"--bits must be 8 or 4, got {bits}.")
  cfg = workdir_lib.load_config(workdir)
  if cfg.model.quantize != "none":
    raise ConfigError(f"{workdir} is already quantized (model.quantize={cfg.model.quantize}); "
                      "quantize the float run it came from.")
  if cfg.finetune.task == "classification" or cfg.finetune.lora_rank:
    raise ConfigError(f"{workdir} is a {'LoRA ' if cfg.finetune.lora_rank else ''}fine-tuned "
                      f"{cfg.finetune.task} run: `lmjax finetune --export` it to a plain run "
                      "first, then quantize that.")
  workdir_lib.require_new(out)
  new_cfg = derived_config(cfg, workdir, quantize=kind, quant_group=group)
  small = builder.build(new_cfg, builder.pretraining_objective(new_cfg))  # its errors first
  cfg, run, params, step = builder.load_params(workdir)
  host, count = quantized_params(params, kind, group, cfg.model.scan_layers)
  placed = builder.place(host, small.abstract_state.params)
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(out),
                                 new_cfg.train.keep_checkpoints) as checkpoints:
    checkpoints.save_params(step, placed)
  if jax.process_index() == 0:  # config.json last: its presence means the run is whole
    workdir_lib.write_config(new_cfg, out)
  sizes = {"params_bytes_before": nbytes(params), "params_bytes_after": nbytes(placed),
           "checkpoint_bytes": directory_bytes(workdir_lib.checkpoint_dir(out)),
           "kernels": count, "step": step}
  log(f"Quantized {count} projection kernels of {workdir} (step {step}) to {kind}"
      f"{f' in groups of {group}' if kind == 'int4' else ' per output channel'} in {out}: "
      f"params {sizes['params_bytes_before'] / 2**20:.2f} MiB -> "
      f"{sizes['params_bytes_after'] / 2**20:.2f} MiB.")
  return sizes
