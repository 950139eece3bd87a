"""The model's ops: rotary embeddings, attention in plain XLA, and elementwise functions whose
backward keeps one tensor.

Shape letters as in model.py: B batch, T query length, S key/value length, N query heads,
K key/value heads, G = N // K, H head dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope(x_BTNH, positions_BT, theta: float):
  """Rotary embeddings, rotate-half convention (as in Hugging Face Llama checkpoints)."""
  h = x_BTNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(jnp.concatenate([angles_BTh, angles_BTh], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles_BTh, angles_BTh], -1))[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  rotated = jnp.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
  return (x * cos + rotated * sin).astype(x_BTNH.dtype)


# Elementwise functions whose backward keeps one tensor: written plainly, jax.grad would keep
# every intermediate (tanh-GELU keeps 5 tensors of [B, T, F], jax.nn.softmax 3 of [B, N, T, S]).
# Less memory, and on CPU fewer passes over memory (see BENCHMARKS.md).

@jax.custom_jvp
def softmax(x):
  """Softmax over the last axis; its backward needs only its output."""
  e = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  return e / e.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = softmax(x)
  return y, y * (dx - (y * dx).sum(-1, keepdims=True))


_GELU_C = math.sqrt(2 / math.pi)


def _gelu_parts(x):
  x = x.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x ** 3))
  dy_dx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)
  return 0.5 * x * (1 + t), dy_dx


@jax.custom_jvp
def gelu(x):
  """GELU, tanh approximation (GPT-2's), computed in float32."""
  return _gelu_parts(x)[0].astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y, dy_dx = _gelu_parts(x)
  return y.astype(x.dtype), (dy_dx * dx).astype(x.dtype)


@jax.custom_jvp
def swiglu(gate, up):
  """silu(gate) * up (LLaMA's MLP), computed in float32."""
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(up.dtype)


@swiglu.defjvp
def _swiglu_jvp(primals, tangents):
  (gate, up), (dgate, dup) = primals, tangents
  g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
  s = jax.nn.sigmoid(g)
  silu = g * s
  dsilu = s * (1 + g * (1 - s))
  y = (silu * u).astype(up.dtype)
  return y, (dsilu * u * dgate + silu * dup).astype(up.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, mask=None, is_causal=False, scale=None):
  """Softmax attention in plain XLA ops (model.attention="xla"), grouped-query aware.

  `mask` ([B, 1 or N, T or 1, S], True = attend) and `is_causal` combine. Scores and softmax are
  float32; masked scores get a large negative bias, so a fully masked row averages instead of
  giving NaN (as jax.nn.dot_product_attention does). Both matmuls are batched over (B, K) with
  the scores laid out [B, K, G, T, S]: no transposes of the [T, S] tensors, and the backward
  keeps only the probabilities.
  """
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  scale = h ** -0.5 if scale is None else scale
  q_BKGTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).reshape(b, t, k, n // k, h)
  q_BKGTH = q_BKGTH.transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  scores_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH,
                            preferred_element_type=jnp.float32)
  if is_causal:
    causal_TS = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    mask = causal_TS if mask is None else mask & causal_TS
  if mask is not None:
    if mask.ndim == 4:  # [B, N, T, S] -> [B, K, G, T, S]
      mask = mask.reshape(mask.shape[0], -1, n // k if mask.shape[1] == n else 1, *mask.shape[2:])
    big_negative = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    scores_BKGTS = scores_BKGTS + jnp.where(mask, jnp.float32(0), big_negative)
  probs_BKGTS = softmax(scores_BKGTS).astype(v_BSKH.dtype)
  out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
