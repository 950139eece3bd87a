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


# --- kernels: splash attention (TPU, Pallas) and cuDNN flash attention (NVIDIA GPUs) ------------

def _splash_block(t: int) -> int:
  """The largest of 512, 256, 128 that divides the sequence (the whole sequence if none does,
  which the kernel refuses: the model sends such sequences to the XLA attention instead)."""
  return next((b for b in (512, 256, 128) if t % b == 0), t)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, causal: bool, scale=None,
                     interpret: bool = False):
  """Flash-style attention on TPU (jax.experimental.pallas.ops.tpu.splash_attention): the
  [T, S] scores live in VMEM blocks, never in HBM; the backward recomputes them. Causal or
  bidirectional, grouped-query (K divides N) and packed (a token attends only within its
  segment id). Single-device shapes: model.py runs it per device under shard_map. `interpret`
  runs the kernel's Pallas program on any backend (the CPU tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kern
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  b, t, n, h = q_BTNH.shape
  s = k_BSKH.shape[1]
  scale = h ** -0.5 if scale is None else scale
  q_BNTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  head_mask = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
  bq, bkv = _splash_block(t), _splash_block(s)
  blocks = kern.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                           block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                           block_kv_dq=bkv)
  kernel = kern.make_splash_mha(masks.MultiHeadMask([head_mask] * n), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
  if segment_ids_BT is None:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  else:
    def one_row(q, k, v, segments_T):
      return kernel(q, k, v, segment_ids=kern.SegmentIds(segments_T, segments_T))
    out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT.astype(jnp.int32))
  return out_BNTH.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)


def segments_as_lengths(segment_ids_BT):
  """Packed rows as cuDNN takes them: (lengths [B, T], offsets [B, T + 1]) of every segment, -1
  past a row's last; T bounds the number of segments a row can hold. lmjax packs rows as
  contiguous segments 1, 2, ..., k then pads (0) at the end, so each segment starts where the
  ones before it end. O(B x T): no [T, T] comparison is built."""
  b, t = segment_ids_BT.shape
  counts_BM1 = jnp.zeros((b, t + 1), jnp.int32).at[jnp.arange(b)[:, None], segment_ids_BT].add(1)
  lengths_BM = counts_BM1[:, 1:]  # index 0 counted the pads
  present_BM = lengths_BM > 0
  ends_BM = jnp.cumsum(lengths_BM, axis=1)
  starts_BM = ends_BM - lengths_BM
  count_B = present_BM.sum(-1)
  offsets_BM1 = jnp.concatenate([jnp.where(present_BM, starts_BM, -1),
                                 jnp.full((b, 1), -1, jnp.int32)], 1)
  offsets_BM1 = offsets_BM1.at[jnp.arange(b), count_B].set(ends_BM[:, -1])
  return jnp.where(present_BM, lengths_BM, -1), offsets_BM1


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, causal: bool, scale=None):
  """cuDNN flash attention (NVIDIA GPUs, 16-bit compute). Packed rows go to cuDNN as each
  segment's length and offset (its packed layout), not as a dense [B, 1, T, S] mask: no T x S
  tensor is built, and cuDNN skips the blocks outside every segment."""
  scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # packing is not public in jax.nn
  lengths_BM, offsets_BM1 = segments_as_lengths(segment_ids_BT)
  mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
  return cudnn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths_BM,
                                     kv_seqlen=lengths_BM, q_offsets=offsets_BM1,
                                     kv_offsets=offsets_BM1, scale=scale, mask_type=mask_type)
