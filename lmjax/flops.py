"""Counting: parameters (all, and without the lookup tables) and training FLOPs per token."""
from __future__ import annotations

import jax

from lmjax.model import ModelConfig

EMBEDDING_PARAMS = ("embedding", "pos_embed", "head")  # lookup tables and the untied output layer


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def count_nonembedding(params) -> int:
  """Parameters outside the token and position tables and an untied output layer (Kaplan et al.
  2020's N: the tables are lookups, which dominate small models without computing much)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(x.size for path, x in leaves
             if not any(str(getattr(k, "key", k)) in EMBEDDING_PARAMS for k in path))


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
