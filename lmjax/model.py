"""The Transformer: GPT-2 style and LLaMA style decoders in one linen module, chosen by config
(model.causal=False makes it a bidirectional encoder, as for masked LM).

Shape letters in names:
  B batch, T query length, S key/value length (the cache in decoding), D d_model,
  N query heads, K key/value heads, G = N // K, H head dim, F mlp hidden, V vocabulary, L layers.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, kv, mlp, norm, layers) and
the main activations are constrained to (batch, length, act_*); `sharding.py` maps them to the mesh.
Decoding uses the 'cache' collection: call with decode=True and mutable=["cache"]. LoRA adapters
(finetune.py) come in the 'lora' collection, mirroring the params of the projections they adapt.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  style: str = "gpt2"
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 256
  vocab_size: int = 256
  max_len: int = 128
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"
  causal: bool = True  # False: every position attends to the whole sequence (an encoder)
  parametrization: str = "sp"  # sp | mup (maximal update parametrization; see width_mult)
  mup_base_width: int = 0  # mup: the d_model at which the hyperparameters were tuned

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.model.to_dict().items() if k in names})

  @property
  def llama(self) -> bool:
    return self.style == "llama"

  # muP (Yang et al. 2022, "Tensor Programs V"), relative to the base width where it equals sp:
  # hidden matrices (attention and MLP kernels) start with std / sqrt(width_mult), attention
  # logits are scaled by 1/head_dim instead of 1/sqrt(head_dim), the logits by 1/width_mult, and
  # the optimizer gives hidden matrices lr / width_mult (optim.py). Embeddings, norms and biases
  # keep sp's init and learning rate.
  @property
  def width_mult(self) -> float:
    return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

  @property
  def hidden_std(self) -> float:
    return self.init_std / math.sqrt(self.width_mult)

  @property
  def attention_scale(self) -> float | None:  # None: jax's default 1/sqrt(head_dim)
    return 1.0 / self.head_dim if self.parametrization == "mup" else None


def _init(std: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _constrain(x, names: tuple):
  return nn.with_logical_constraint(x, names)


class Norm(nn.Module):
  """LayerNorm (GPT-2) or RMSNorm (LLaMA), computed in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    pdt = DTYPES[c.param_dtype]
    x = x_BTD.astype(jnp.float32)
    if c.llama:
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps)
    else:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps)
    x = x * self.param("scale", _ones(("norm",)), (c.d_model,), pdt)
    if not c.llama:
      x = x + self.param("bias", _zeros(("norm",)), (c.d_model,), pdt)
    return x.astype(DTYPES[c.dtype])


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


class Projection(nn.Module):
  """A matmul with a kernel of any rank (so every axis has its logical name) and optional bias."""
  shape: tuple
  axes: tuple
  equation: str
  std: float
  bias: bool
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    dt, pdt = DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
    kernel = self.param("kernel", _init(self.std, self.axes), self.shape, pdt)
    y = jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt))
    if self.has_variable("lora", "a"):  # LoRA (finetune.py): + x a b; a [in..., R], b [R, out...]
      a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")  # b carries the scale
      xa = jnp.tensordot(x.astype(dt), a.astype(dt), a.ndim - 1)
      y = y + jnp.tensordot(xa, b.astype(dt), 1)
    if self.bias:
      out_rank = len(self.equation.split("->")[1]) - 2  # features after B, T
      bias_shape, bias_axes = self.shape[-out_rank:], self.axes[-out_rank:]
      if bias_axes == ("embed",):
        bias_axes = ("norm",)  # output biases are tiny: replicate
      y = y + self.param("bias", _zeros(bias_axes), bias_shape, pdt).astype(dt)
    return y


class Attention(nn.Module):
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, kv_mask_BS=None, segment_ids_BT=None):
    c = self.cfg
    out_std = c.hidden_std / math.sqrt(2 * c.num_layers)

    def proj(name, heads, axis):
      return Projection((c.d_model, heads, c.head_dim), ("embed", axis, "kv"), "BTD,DNH->BTNH",
                        c.hidden_std, bias=not c.llama, cfg=c, name=name)(x_BTD)

    q_BTNH = proj("query", c.num_heads, "heads")
    k_BTKH = proj("key", c.num_kv_heads, "kv_heads")
    v_BTKH = proj("value", c.num_kv_heads, "kv_heads")
    if c.llama:
      q_BTNH = rope(q_BTNH, positions_BT, c.rope_theta)
      k_BTKH = rope(k_BTKH, positions_BT, c.rope_theta)
    q_BTNH = _constrain(q_BTNH, ("batch", "length", "act_heads", "kv"))

    if self.decode:
      if not c.causal:
        raise ValueError("KV-cache decoding needs a causal model (model.causal=True).")
      out_BTNH = self._cached_attention(q_BTNH, k_BTKH, v_BTKH, kv_mask_BS)
    else:
      # kv_mask_BS (True = a real token) hides pads from every query, which matters when the
      # attention is bidirectional
      mask = None if kv_mask_BS is None else kv_mask_BS.astype(bool)[:, None, None, :]
      if segment_ids_BT is not None:  # packed examples: each attends within its own segment
        same_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
        mask = same_B1TS if mask is None else mask & same_B1TS
      if c.attention == "xla":
        out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, mask, c.causal, c.attention_scale)
      else:  # cudnn (flash attention), or auto: JAX picks
        impl = None if c.attention == "auto" else c.attention
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask,
                                                scale=c.attention_scale,
                                                is_causal=c.causal, implementation=impl)
    out_BTNH = _constrain(out_BTNH, ("batch", "length", "act_heads", "kv"))
    return Projection((c.num_heads, c.head_dim, c.d_model), ("heads", "kv", "embed"),
                      "BTNH,NHD->BTD", out_std, bias=not c.llama, cfg=c, name="out")(out_BTNH)

  def _cached_attention(self, q_BTNH, k_BTKH, v_BTKH, kv_mask_BS):
    """Writes this call's keys/values at the cache index, attends over the whole cache."""
    b, t = q_BTNH.shape[:2]
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BTKH.shape, k_BTKH.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BTKH.shape, v_BTKH.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():  # the init call only sizes the cache: [B, S, K, H]
      return jnp.zeros_like(q_BTNH)
    i = index.value
    k_BSKH = jax.lax.dynamic_update_slice(cached_k.value, k_BTKH, (0, i, 0, 0))
    v_BSKH = jax.lax.dynamic_update_slice(cached_v.value, v_BTKH, (0, i, 0, 0))
    cached_k.value, cached_v.value, index.value = k_BSKH, v_BSKH, i + t
    s = k_BSKH.shape[1]
    causal_TS = jnp.arange(s)[None, :] <= (i + jnp.arange(t))[:, None]
    mask_BTS = causal_TS[None] & kv_mask_BS[:, None, :].astype(bool)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                        scale=self.cfg.attention_scale)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    out_std = c.hidden_std / math.sqrt(2 * c.num_layers)

    def up(name):  # the same params (kernel [D, F], bias) as nn.Dense, and LoRA-capable
      return Projection((c.d_model, c.mlp_dim), ("embed", "mlp"), "BTD,DF->BTF", c.hidden_std,
                        bias=not c.llama, cfg=c, name=name)(x_BTD)

    if c.llama:  # SwiGLU
      h_BTF = swiglu(up("gate"), up("up"))
    else:
      h_BTF = gelu(up("up"))
    h_BTF = _constrain(h_BTF, ("batch", "length", "act_mlp"))
    return Projection((c.mlp_dim, c.d_model), ("mlp", "embed"), "BTF,FD->BTD", out_std,
                      bias=not c.llama, cfg=c, name="down")(h_BTF)


class Block(nn.Module):
  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, kv_mask_BS=None, segment_ids_BT=None):
    c = self.cfg
    drop = nn.Dropout(c.dropout, deterministic=self.deterministic or c.dropout == 0)
    h = Attention(c, self.decode, name="attn")(Norm(c, name="attn_norm")(x_BTD), positions_BT,
                                               kv_mask_BS, segment_ids_BT)
    x_BTD = x_BTD + drop(h)
    x_BTD = x_BTD + drop(Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(x_BTD)))
    return _constrain(x_BTD, ("batch", "length", "act_embed"))


class ScanBlock(Block):
  """Block with the (carry, xs) -> (carry, ys) signature that nn.scan needs."""

  def __call__(self, x_BTD, positions_BT, kv_mask_BS=None, segment_ids_BT=None):
    return super().__call__(x_BTD, positions_BT, kv_mask_BS, segment_ids_BT), None


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Embed(nn.Module):
  """The token table [V, D]: a lookup at the input, and (tied) the output projection."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    self.embedding = self.param("embedding", _init(c.init_std, ("vocab", "embed")),
                                (c.vocab_size, c.d_model), DTYPES[c.param_dtype])

  def __call__(self, tokens_BT):
    # Gather from a whole table (all-gathered, as FSDP does for every layer): XLA cannot move a
    # gather from a sharded table to batch-sharded activations efficiently (it would replicate
    # the table anyway, with a warning).
    table_VD = _constrain(self.embedding, (None, None))
    return jnp.take(table_VD, tokens_BT, axis=0).astype(DTYPES[self.cfg.dtype])

  def attend(self, x_BTD):
    dt = DTYPES[self.cfg.dtype]
    return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding.astype(dt))


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (float32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, kv_mask_BS=None, *, decode=False,
               deterministic=True, return_hidden=False, segment_ids_BT=None):
    c = self.cfg
    dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed = Embed(c, name="embed")
    x_BTD = embed(tokens_BT)
    if not c.llama:
      pos_LD = self.param("pos_embed", _init(c.init_std / 2, ("length", "embed")),
                          (c.max_len, c.d_model), pdt)
      pos_LD = _constrain(pos_LD, (None, None))  # whole table for the gather, as in Embed
      x_BTD = x_BTD + jnp.take(pos_LD, positions_BT, axis=0).astype(dt)
    x_BTD = nn.Dropout(c.dropout, deterministic=deterministic or c.dropout == 0)(x_BTD)
    x_BTD = _constrain(x_BTD, ("batch", "length", "act_embed"))

    block = ScanBlock if c.scan_layers else Block
    if c.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0, "cache": 0, "lora": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, _ = layers(c, decode, deterministic, name="layers")(x_BTD, positions_BT, kv_mask_BS,
                                                                 segment_ids_BT)
    else:
      for i in range(c.num_layers):
        x_BTD = block(c, decode, deterministic, name=f"layer_{i}")(x_BTD, positions_BT, kv_mask_BS,
                                                                   segment_ids_BT)

    x_BTD = Norm(c, name="final_norm")(x_BTD)
    if return_hidden:  # final-norm states [B, T, D] (float32), e.g. for a classification head
      return x_BTD.astype(jnp.float32)
    if c.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                            kernel_init=_init(c.init_std, ("embed", "vocab")), name="head")(x_BTD)
    if c.parametrization == "mup":
      logits_BTV = logits_BTV / c.width_mult
    logits_BTV = _constrain(logits_BTV, ("batch", "length", "act_vocab"))
    return logits_BTV.astype(jnp.float32)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * (matmul params) + 12 * L * T * N * H (attention scores and
  values, forward + backward, causal mask not discounted: the PaLM / nanoGPT convention).

  Matmul params exclude the position table (a lookup) and count the output projection to the
  vocabulary once, whether or not it is tied to the input embedding (the input lookup is free).
  """
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = c.d_model * c.mlp_dim * (3 if c.llama else 2)
  matmul_params = c.num_layers * (attn + mlp) + c.d_model * c.vocab_size
  return 6.0 * matmul_params + 12.0 * c.num_layers * seq_len * c.num_heads * c.head_dim
