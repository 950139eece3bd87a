"""Weight-only post-training quantization of the projections: int8 per output channel, int4
group-wise (two values packed per byte), dequantized inside the jitted matmul.

A quantized run is a run whose config says `model.quantize = "int8" | "int4"`: every Projection
(attention query/key/value/out, the MLP's up/gate/down) then holds `kernel_q` (int8; for int4 the
last contracting axis is halved, two 4-bit values per byte) and `kernel_scale` (float32) instead of
`kernel`, so restore, eval, generate and serve read it like any run. Embeddings, the untied LM
head, norms and biases stay in their float dtype.

Scales are symmetric absmax: int8 keeps one scale per output channel (the kernel's contracting
axes reduced); int4 keeps one per output channel and per group of `model.quant_group` inputs along
the last contracting axis (the group shrinks to the axis size's gcd with it, e.g. 64 for a 64-wide
head; the attention output keeps separate groups per head). Pure functions on arrays: model.py
declares the params with `shapes` and dequantizes with `dequantize`; compress.py fills them with
`quantize_kernel`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

QMAX = {"int8": 127, "int4": 7}


def group_size(n: int, group: int) -> int:
  """The group along a contracting axis of size n: the largest divisor of n that divides group."""
  return math.gcd(n, group)


def shapes(kernel_shape: tuple, n_contract: int, kind: str, group: int) -> tuple[tuple, tuple]:
  """(kernel_q shape, kernel_scale shape) for a kernel whose first n_contract axes contract."""
  shape = list(kernel_shape)
  last = n_contract - 1
  if kind == "int8":
    return tuple(shape), tuple(1 if a < n_contract else s for a, s in enumerate(shape))
  g = group_size(shape[last], group)
  if g % 2:
    raise ValueError(f"int4 packs two values per byte: the contracting axis of size {shape[last]}"
                     f" needs an even group, got {g}.")
  scale = [s if a != last else s // g for a, s in enumerate(shape)]
  packed = list(shape)
  packed[last] //= 2
  return tuple(packed), tuple(scale)


def _grouped(w, n_contract: int, g: int):
  """[..., n, out...] -> [..., n // g, g, out...] along the last contracting axis."""
  last = n_contract - 1
  return w.reshape(w.shape[:last] + (w.shape[last] // g, g) + w.shape[last + 1:])


def quantize_kernel(w: np.ndarray, n_contract: int, kind: str, group: int):
  """A float kernel -> (kernel_q, kernel_scale) as numpy arrays (shapes as `shapes` gives)."""
  w = np.asarray(w, np.float32)
  qmax = QMAX[kind]
  if kind == "int8":
    scale = np.abs(w).max(axis=tuple(range(n_contract)), keepdims=True) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8), scale
  last = n_contract - 1
  g = group_size(w.shape[last], group)
  wg = _grouped(w, n_contract, g)
  scale = np.abs(wg).max(axis=last + 1, keepdims=True) / qmax
  scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
  q = np.clip(np.round(wg / scale), -qmax, qmax).astype(np.int8).reshape(w.shape)
  return pack_int4(q, last), np.squeeze(scale, axis=last + 1)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
  """int8 values in [-8, 7] -> int8 bytes holding pairs along `axis` (even index in the low
  nibble)."""
  q = np.moveaxis(q, axis, -1)
  low, high = q[..., 0::2], q[..., 1::2]
  packed = ((high.astype(np.int16) << 4) | (low.astype(np.int16) & 0xF)).astype(np.uint8)
  return np.moveaxis(packed.view(np.int8), -1, axis)


def unpack_int4(packed, axis: int):
  """The inverse of pack_int4, in jax (inside the jit): sign-extended nibbles as int8."""
  p = jnp.moveaxis(packed, axis, -1)
  low = jnp.right_shift(jnp.left_shift(p, 4), 4)  # arithmetic shifts sign-extend
  high = jnp.right_shift(p, 4)
  q = jnp.stack([low, high], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
  return jnp.moveaxis(q, -1, axis)


def dequantize(kernel_q, scale, n_contract: int, kind: str, dtype):
  """(kernel_q, kernel_scale) -> the kernel in `dtype`, traced inside the matmul's jit."""
  if kind == "int8":
    return (kernel_q.astype(dtype) * scale.astype(dtype)).astype(dtype)
  last = n_contract - 1
  q = unpack_int4(kernel_q, last)
  g = q.shape[last] // scale.shape[last]
  qg = _grouped(q.astype(dtype), n_contract, g)
  w = qg * jnp.expand_dims(scale.astype(dtype), last + 1)
  return w.reshape(q.shape)


def declare(module: nn.Module, shape: tuple, axes: tuple, equation: str, dtype):
  """Inside a Projection (model.py): its kernel_q / kernel_scale params, dequantized to `dtype`.
  The scale keeps the logical axis names of the kernel axes it spans (the rest are 1)."""
  c, n_contract = module.cfg, len(equation.split(",")[0]) - 2  # input axes after B, T
  q_shape, scale_shape = shapes(shape, n_contract, c.quantize, c.quant_group)
  scale_axes = tuple(a if n == s else None for a, n, s in zip(axes, shape, scale_shape))
  kernel_q = module.param("kernel_q", nn.with_logical_partitioning(
      lambda *_: jnp.zeros(q_shape, jnp.int8), axes), q_shape)
  scale = module.param("kernel_scale", nn.with_logical_partitioning(
      lambda *_: jnp.ones(scale_shape, jnp.float32), scale_axes), scale_shape)
  return dequantize(kernel_q, scale, n_contract, c.quantize, dtype)
