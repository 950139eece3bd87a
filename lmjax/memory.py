"""The memory bill of a config per device, computed from the config alone (no devices needed):
parameters, optimizer state, gradients, activations and workspace. The README's memory table
comes from the TPU compiler instead (`lmjax compile`, benchmarks/tpu_memory.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from lmjax import config as config_lib
from lmjax import sharding as sharding_lib
from lmjax.model import DTYPES, REMAT_POLICIES, Block, ModelConfig, Transformer, resolve_attention
from lmjax.optim import make_optimizer

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _mesh_sizes(cfg, num_devices: int) -> dict:
  return dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(cfg, num_devices)))


def _bytes_per_device(abstract_tree, spec_tree, sizes: dict) -> int:
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  specs = jax.tree_util.tree_leaves(
      spec_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return sum(math.ceil(x.size * x.dtype.itemsize / sharding_lib.shards_of(s, sizes))
             for x, s in zip(leaves, specs))


def _abstract_params_and_specs(cfg):
  """Params as ShapeDtypeStructs and their mesh PartitionSpecs, without any device work."""
  model = Transformer(ModelConfig.from_config(cfg))
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, cfg.data.seq_len), jnp.int32))["params"])
  rules = sharding_lib.logical_rules(cfg)
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  return nn.unbox(boxed), specs


def _mesh_axes_size(cfg, logical: str, sizes: dict) -> int:
  axes = nn.logical_to_mesh_axes((logical,), sharding_lib.logical_rules(cfg))[0]
  return sharding_lib.shards_of((axes,), sizes)


def _saved_bytes(fn, *args) -> int:
  """Bytes of the residuals jax.grad keeps from `fn`'s forward pass for its backward, not
  counting `fn`'s own inputs (abstract tracing only: nothing is computed or allocated)."""
  closed = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1])(*args)
  inputs = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
  residuals = {v for v in closed.jaxpr.outvars
               if not isinstance(v, jax_core.Literal) and v not in inputs}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in residuals)


@functools.lru_cache(maxsize=256)
def layer_residual_bytes(c: ModelConfig, seq_len: int, remat: str) -> int:
  """Bytes one layer keeps for the backward pass per sequence (one row of seq_len tokens), under
  a remat policy: the model's own residuals, found by tracing a Block (GELU/softmax keep one
  tensor each, see model.py). With remat, the layer input, which the scan carries, is added."""
  block_cls = nn.remat(Block, policy=REMAT_POLICIES[remat]) if remat != "none" else Block
  block = block_cls(c)
  x = jax.ShapeDtypeStruct((1, seq_len, c.d_model), DTYPES[c.dtype])
  positions = jnp.arange(seq_len)[None]
  params = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                             positions))
  saved = _saved_bytes(lambda p, h: block.apply(p, h, positions), params, x)
  if remat != "none":
    saved += seq_len * c.d_model * x.dtype.itemsize
  return saved


def _workspace_bytes(c: ModelConfig, sizes: dict, tensor: int) -> int:
  """One layer's weights gathered over fsdp (and cast to the compute dtype), twice: XLA
  prefetches the next layer's while the current one computes; and the embedding table, whole on
  every device for the lookup, in the compute dtype (model.py's Embed), with an untied head
  gathered like a layer."""
  if not (sizes["fsdp"] > 1 or c.dtype != c.param_dtype):
    return 0
  compute = DTYPE_BYTES[c.dtype]
  layer_params = (c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) +
                  c.d_model * c.mlp_dim * (3 if c.llama else 2)) / tensor
  tables = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return int(2 * layer_params * compute + tables * compute)


def estimate_memory(cfg, num_devices: int, device=None) -> dict:
  """Bytes per device to train `cfg` on `num_devices`: params, optimizer state, gradients,
  activations and workspace, with their `total`. An estimate: XLA adds temporaries and
  fragmentation (keep ~10% headroom); `device` (one of the run's, or a TPU topology's) says
  which attention model.attention=auto traces; on GPU, JAX preallocates 75% of memory unless
  XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.

  Params, optimizer state and gradients are exact (every leaf's shape and sharding from the
  config's rules). Activations are what the backward pass needs: every layer's residuals under
  the remat policy (traced from the model itself, on the per-device shard of the heads and MLP),
  plus, with remat, one layer's full residuals rebuilt during the backward, plus one loss
  chunk's float32 logits and their gradient; the workspace holds the gathered weights of a
  layer (twice: the next one is prefetched) and the embedding table in the compute dtype.
  """
  c = ModelConfig.from_config(cfg)
  if device is not None:  # the attention model.attention=auto picks on it (TPU: splash)
    c = resolve_attention(c, device)
  sizes = _mesh_sizes(cfg, num_devices)
  params, param_specs = _abstract_params_and_specs(cfg)
  optimizer_state = jax.eval_shape(make_optimizer(cfg).init, params)
  pairs = jax.tree_util.tree_map(lambda x, s: (x.shape, s), params, param_specs)
  optimizer_specs = sharding_lib.spec_for_like(pairs, optimizer_state)
  params_bytes = _bytes_per_device(params, param_specs, sizes)
  # the train step sums micro-batch gradients into a second buffer when accumulating
  gradient_copies = 1 if cfg.optim.accumulation_steps == 1 else 2

  compute = DTYPE_BYTES[c.dtype]
  batch_shards = _mesh_axes_size(cfg, "batch", sizes)
  rows = cfg.train.batch_size // batch_shards // cfg.optim.accumulation_steps
  tokens = rows * cfg.data.seq_len
  tensor = _mesh_axes_size(cfg, "act_heads", sizes)
  # the layer as one device runs it: its share of the heads and of the MLP
  local = dataclasses.replace(c, num_heads=max(c.num_heads // tensor, 1),
                              num_kv_heads=max(c.num_kv_heads // tensor, 1),
                              mlp_dim=max(c.mlp_dim // tensor, 1), dropout=0.0)
  per_row = c.num_layers * layer_residual_bytes(local, cfg.data.seq_len, c.remat)
  if c.remat != "none":
    per_row += layer_residual_bytes(local, cfg.data.seq_len, "none")
  vocab_shards = _mesh_axes_size(cfg, "act_vocab", sizes)
  # float32 logits of one chunk of the loss (model.loss_chunk positions of every row; losses.py
  # rebuilds each chunk's in the backward): their exp (kept by the cross-entropy), their
  # gradient and one more buffer of that size for the backward's matmuls (measured on CPU), plus
  # the compute-dtype logits before the cast when computing in 16 bits; then embeddings and the
  # final norm (float32 hidden states and their gradient)
  logits_tokens = rows * min(c.loss_chunk or cfg.data.seq_len, cfg.data.seq_len)
  logits_bytes = logits_tokens * c.vocab_size / vocab_shards * (12 + (compute if compute < 4
                                                                       else 0))
  activations = rows * per_row + logits_bytes + tokens * 3 * c.d_model * 4

  workspace = _workspace_bytes(c, sizes, tensor)
  result = {
      "params": params_bytes,
      "optimizer": _bytes_per_device(optimizer_state, optimizer_specs, sizes),
      "gradients": gradient_copies * params_bytes,
      "activations": int(activations),
      "workspace": int(workspace),
  }
  result["total"] = sum(result.values())
  result["tokens_per_device"] = tokens
  return result


# --- LLaMA-shaped configs for tests and scripts ---------------------------------------------------

# LLaMA-style shapes (layers, d_model, heads, kv_heads, mlp_dim) from published models
LLAMA_LADDER = {
    "125m": (12, 768, 12, 4, 2048),
    "1b": (22, 2048, 32, 4, 5632),  # TinyLlama
    "3b": (26, 3200, 32, 32, 8640),  # OpenLLaMA 3B
    "7b": (32, 4096, 32, 32, 11008),  # Llama 2 7B
    "8b": (32, 4096, 32, 8, 14336),  # Llama 3 8B (with the 32,000 vocabulary used throughout)
    "13b": (40, 5120, 40, 40, 13824),  # Llama 2 13B
    "34b": (48, 8192, 64, 8, 22016),  # Code Llama 34B
    "70b": (80, 8192, 64, 8, 28672),  # Llama 2 70B
    "405b": (126, 16384, 128, 8, 53248),  # Llama 3.1 405B
}


def ladder_config(name: str, num_devices: int, seq_len: int = 2048, rows_per_device: int = 1,
                  remat: str = "full"):
  """A LLaMA-style config (as configs/llama.py) of a ladder shape: FSDP over all devices,
  bfloat16 compute, float32 params and AdamW state, scan over layers, `rows_per_device`
  sequences of `seq_len` tokens per device."""
  layers, d, heads, kv_heads, mlp = LLAMA_LADDER[name]
  cfg = config_lib.default_config()
  m = cfg.model
  m.style, m.num_layers, m.d_model, m.num_heads = "llama", layers, d, heads
  m.num_kv_heads, m.mlp_dim, m.vocab_size, m.tie_embeddings = kv_heads, mlp, 32000, False
  m.dtype, m.param_dtype, m.scan_layers, m.remat = "bfloat16", "float32", True, remat
  m.max_len, cfg.data.seq_len = seq_len, seq_len
  cfg.train.batch_size = rows_per_device * num_devices
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  cfg = config_lib.finalize(cfg)
  return cfg
