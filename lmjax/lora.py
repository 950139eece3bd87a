"""LoRA (Hu et al. 2021): low-rank adapters on the projections of a frozen model.

A targeted projection computes W x + (x A) B * scale with scale = lora_alpha / lora_rank, A random
(uniform, +-1/sqrt(fan in)) and B zero, so training starts from exactly the base model. A and B
live in the params' "lora" part with the kernel's logical axis names (sharded like the kernel);
the model reads them from its 'lora' collection (model.Projection), B with the scale folded in.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmjax.trees import flatten, unflatten

# How many leading axes of each projection's kernel are its input: [D, N, H] (query) has 1,
# [N, H, D] (out) has 2.
IN_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1}


def scale(lora_rank: int, lora_alpha: float) -> float:
  return lora_alpha / lora_rank if lora_rank else 0.0


def layout(model_params, model_specs, targets, rank: int) -> dict:
  """{'path/of/module': (a_shape, a_names, b_shape, b_names)} for every kernel of `targets`:
  A [layers?, in..., R] and B [layers?, R, out...] with the kernel's logical axis names."""
  specs = flatten(model_specs)
  out = {}
  for path, leaf in flatten(model_params).items():
    *module, name = path.split("/")
    if name != "kernel" or len(module) < 2 or module[-1] not in targets or module[-2] not in (
        "attn", "mlp"):
      continue
    lead = 1 if module[0] == "layers" else 0  # scanned layers: a leading [L] axis
    cut = lead + IN_DIMS[module[-1]]
    shape, names = tuple(leaf.shape), tuple(specs[path])
    out["/".join(module)] = (shape[:cut] + (rank,), names[:cut] + (None,),
                             shape[:lead] + (rank,) + shape[cut:],
                             names[:lead] + (None,) + names[cut:])
  return out


def init(key, layout_: dict, dtype) -> dict:
  flat = {}
  for i, (path, (a_shape, _, b_shape, _)) in enumerate(sorted(layout_.items())):
    fan_in = math.prod(a_shape[1 if path.startswith("layers/") else 0:-1])  # A's input dims
    bound = 1.0 / math.sqrt(fan_in)
    flat[path + "/a"] = jax.random.uniform(jax.random.fold_in(key, i), a_shape, dtype, -bound,
                                           bound)
    flat[path + "/b"] = jnp.zeros(b_shape, dtype)
  return unflatten(flat)


def variables(lora: dict, scale_: float) -> dict:
  """The 'lora' collection the model reads: A, and B with the scale folded in."""
  flat = flatten(lora)
  return unflatten({k: v * scale_ if k.endswith("/b") else v for k, v in flat.items()})


def merge(model_params: dict, lora: dict, scale_: float) -> dict:
  """Plain model params: every adapted kernel W + A B scale (per layer when scanned)."""
  flat, lora = flatten(model_params), flatten(lora)
  product = lambda a, b: jnp.tensordot(a, b, 1, precision=jax.lax.Precision.HIGHEST)
  for module in (path[:-2] for path in lora if path.endswith("/a")):
    a, b = (lora[f"{module}/{x}"].astype(jnp.float32) for x in "ab")
    delta = (jax.vmap(product) if module.startswith("layers/") else product)(a, b * scale_)
    kernel = flat[module + "/kernel"]
    flat[module + "/kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return unflatten(flat)
