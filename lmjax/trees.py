"""Param trees as flat {"a/b/c": leaf} dicts, and scanned layers (`layers/x`, a leading layer axis)
as the unscanned `layer_{i}/x` that HF mappings and LoRA layouts name."""
from __future__ import annotations

import jax
import numpy as np


def flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = value
  return out


def unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def unscanned_shapes(abstract_params, num_layers: int) -> dict:
  """{unscanned path: (shape, dtype)} of abstract params, scanned or not."""
  shapes = {}
  for path, x in flatten(abstract_params).items():
    if path.startswith("layers/"):  # scanned: the leading axis is the layer
      for i in range(num_layers):
        shapes[f"layer_{i}/" + path[len("layers/"):]] = (tuple(x.shape[1:]), x.dtype)
    else:
      shapes[path] = (tuple(x.shape), x.dtype)
  return shapes


def to_host(x) -> np.ndarray:
  """The whole value of an array on this host. An array sharded across processes is gathered (a
  collective: every process must call this for the same arrays, in the same order)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
