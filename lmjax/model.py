"""The Transformer: GPT-2 style and LLaMA style decoders in one linen module, chosen by config
(model.causal=False makes it a bidirectional encoder, as for masked LM).

Shape letters in names:
  B batch, T query length, S key/value length (the cache in decoding), D d_model,
  N query heads, K key/value heads, G = N // K, H head dim, F mlp hidden, V vocabulary, L layers.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, kv, mlp, norm, layers) and
the main activations are constrained to (batch, length, act_*); `sharding.py` maps them to the mesh.
Decoding uses the 'cache' collection: call with decode=True and mutable=["cache"]. LoRA adapters
(lora.py) come in the 'lora' collection, mirroring the params of the projections they adapt.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import config as config_lib
from lmjax import quantize
from lmjax.ops import attention, cudnn_attention, gelu, rope, splash_attention, swiglu

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The config's model section as a hashable value (for linen and jit). Its fields are the
  schema's model keys, with no defaults of their own: `from_config` reads a resolved config,
  `create` starts from `config.default_config()`."""
  style: str
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  max_len: int
  tie_embeddings: bool
  rope_theta: float
  norm_eps: float
  init_std: float
  dropout: float
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: str
  attention: str
  causal: bool  # False: every position attends to the whole sequence (an encoder)
  loss_chunk: int  # positions per chunk of the LM head + cross-entropy (losses.py); 0 = all
  parametrization: str  # sp | mup (maximal update parametrization; see width_mult)
  mup_base_width: int  # mup: the d_model at which the hyperparameters were tuned
  quantize: str  # none | int8 | int4: the projections' weights (quantize.py)
  quant_group: int  # int4: inputs per scale along the contracting axis

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    return cls(**{f.name: cfg.model[f.name] for f in dataclasses.fields(cls)})

  @classmethod
  def create(cls, **changes) -> "ModelConfig":
    """The default config's model with `changes`, derived values filled (tests, scripts)."""
    m = config_lib.default_config().model
    m.update(changes)
    return cls(**config_lib.finalize_model(m).to_dict())

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


def constrain(x, names: tuple):
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
    if self.cfg.quantize != "none":  # weight-only quantized (quantize.py): dequantized here
      kernel = quantize.declare(self, self.shape, self.axes, self.equation, dt)
    else:
      kernel = self.param("kernel", _init(self.std, self.axes), self.shape, pdt).astype(dt)
    y = jnp.einsum(self.equation, x.astype(dt), kernel)
    if self.has_variable("lora", "a"):  # LoRA (lora.py): + x a b; a [in..., R], b [R, out...]
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
    q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "kv"))

    if self.decode:
      if not c.causal:
        raise ValueError("KV-cache decoding needs a causal model (model.causal=True).")
      out_BTNH = self._cached_attention(q_BTNH, k_BTKH, v_BTKH, kv_mask_BS)
    else:
      kernel = c.attention if c.attention != "auto" else "xla"  # unresolved (resolve_attention)
      if kernel == "xla":
        out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, _xla_mask(kv_mask_BS, segment_ids_BT),
                             c.causal, c.attention_scale)
      else:  # the kernels take segment ids only: pads (False) become segment 0, never a token's
        if kv_mask_BS is not None:
          real_BT = kv_mask_BS.astype(jnp.int32)
          segment_ids_BT = real_BT if segment_ids_BT is None else segment_ids_BT * real_BT
        if kernel == "splash":
          out_BTNH = _sharded_splash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, c)
        else:
          out_BTNH = cudnn_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, causal=c.causal,
                                     scale=c.attention_scale)
    out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "kv"))
    if self.is_mutable_collection("intermediates"):  # pruning's importance: each head's output
      self.sow("intermediates", "head_norm",
               jnp.sqrt(jnp.square(out_BTNH.astype(jnp.float32)).sum(-1)).sum((0, 1)))
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


def _xla_mask(kv_mask_BS, segment_ids_BT):
  """The XLA attention's boolean mask [B, 1, T or 1, S]: kv_mask_BS (True = a real token) hides
  pads from every query; packed examples attend within their own segment."""
  mask = None if kv_mask_BS is None else kv_mask_BS.astype(bool)[:, None, None, :]
  if segment_ids_BT is not None:
    same_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    mask = same_B1TS if mask is None else mask & same_B1TS
  return mask


def _sharded_splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, c: ModelConfig):
  """Splash attention on each device's rows and heads (shard_map over the current mesh: rows
  over the mesh axes of "batch", heads over those of "act_heads"); in Pallas interpret mode
  unless the mesh is TPU's. Key/value heads that the head shards do not divide are repeated
  to one per query head first."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None) if mesh is not None and mesh.shape else None
  interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"
  if q_BTNH.shape[1] % 128 or k_BSKH.shape[1] % 128:
    # the kernel tiles sequences in blocks of 128 (in interpret mode too): a shorter or ragged
    # one (a short eval or classification batch) takes the XLA attention, which computes the same
    return attention(q_BTNH, k_BSKH, v_BSKH, _xla_mask(None, segment_ids_BT), c.causal,
                     c.attention_scale)
  kernel = functools.partial(splash_attention, causal=c.causal, scale=c.attention_scale,
                             interpret=interpret)
  if device is None:  # no mesh: one device
    return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  rows, heads = nn.logical_to_mesh_axes(("batch", "act_heads"))
  head_shards = math.prod(mesh.shape[a] for a in _axes(heads))
  if k_BSKH.shape[2] % head_shards:
    repeat = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSKH, v_BSKH = (jnp.repeat(x, repeat, axis=2) for x in (k_BSKH, v_BSKH))
  qkv = P(rows, None, heads, None)
  args, specs = (q_BTNH, k_BSKH, v_BSKH), (qkv, qkv, qkv)
  if segment_ids_BT is not None:
    args, specs = args + (segment_ids_BT,), specs + (P(rows, None),)
  # check_vma=False: the Pallas call declares no varying mesh axes for its output
  return jax.shard_map(kernel, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def _axes(entry) -> tuple:
  return () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def resolve_attention(c: ModelConfig, device) -> ModelConfig:
  """model.attention="auto" made concrete for the devices a run is on (`device`: one of them, or
  the compile-only device of a TPU topology): splash on TPU, cuDNN flash attention on NVIDIA
  GPUs (16-bit compute, head_dim a multiple of 8 up to 128), lmjax's XLA attention otherwise."""
  if c.attention != "auto":
    return c
  choice = "xla"
  if device.platform == "tpu":
    choice = "splash"
  elif ("nvidia" in device.device_kind.lower() and c.dtype != "float32" and
        c.head_dim % 8 == 0 and c.head_dim <= 128):
    choice = "cudnn"
  return dataclasses.replace(c, attention=choice)


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
    h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"))
    if self.is_mutable_collection("intermediates"):  # pruning's importance: each channel's
      self.sow("intermediates", "mlp_abs", jnp.abs(h_BTF.astype(jnp.float32)).sum((0, 1)))
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
    in_BTD = x_BTD
    h = Attention(c, self.decode, name="attn")(Norm(c, name="attn_norm")(x_BTD), positions_BT,
                                               kv_mask_BS, segment_ids_BT)
    x_BTD = x_BTD + drop(h)
    out_BTD = x_BTD + drop(Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(x_BTD)))
    if self.is_mutable_collection("intermediates"):  # pruning: how much the block changes x
      a, b = in_BTD.astype(jnp.float32), out_BTD.astype(jnp.float32)
      cos_BT = (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) *
                                             jnp.linalg.norm(b, axis=-1), 1e-12)
      self.sow("intermediates", "block_cos", cos_BT.sum())
    return constrain(out_BTD, ("batch", "length", "act_embed"))


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
    # the table anyway, with a warning). Cast first: the all-gather moves, and every device
    # holds, the table in the compute dtype (half of float32's in bfloat16).
    table_VD = constrain(self.embedding.astype(DTYPES[self.cfg.dtype]), (None, None))
    return jnp.take(table_VD, tokens_BT, axis=0)

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
      pos_LD = constrain(pos_LD.astype(dt), (None, None))  # whole, in dt, as in Embed
      x_BTD = x_BTD + jnp.take(pos_LD, positions_BT, axis=0)
    x_BTD = nn.Dropout(c.dropout, deterministic=deterministic or c.dropout == 0)(x_BTD)
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))

    block = ScanBlock if c.scan_layers else Block
    if c.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0, "cache": 0, "lora": 0,
                                                   "intermediates": 0},
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
    logits_BTV = constrain(logits_BTV, ("batch", "length", "act_vocab"))
    return logits_BTV.astype(jnp.float32)
