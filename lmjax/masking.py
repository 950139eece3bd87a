"""Masked LM (BERT) corruption: which tokens to predict and what the encoder sees instead.

BERT's recipe (Devlin et al. 2019): every non-pad token is selected with probability `prob`
(train.mask_prob, 0.15); a selected token is replaced by the mask token (`mask_fraction`, 0.8), by
a random token (`random_fraction`, 0.1) or kept (the rest), and the encoder (model.causal=False)
predicts the original token at the selected positions only (losses.masked_lm_loss).

The train step draws the corruption from its RNG (part of the checkpoint) for the whole global
batch at once, before it is split into micro-batches. A resumed run, a run on another mesh (random
bits do not depend on sharding: jax_threefry_partitionable, JAX's default) and a run with gradient
accumulation therefore draw the same masks. Evaluation draws its masks from the batch's tokens
(`eval_rng`), so `lmjax eval` and training's periodic eval score the same positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Masking:
  mask_id: int  # the token that replaces most selected tokens (a fact of the tokenizer)
  random_vocab: int  # random replacements are ids in [0, random_vocab)
  prob: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1
  pad_id: int = 0  # never selected (lmjax tokenizers' pad)


def corrupt(rng, tokens_BT, m: Masking):
  """-> (inputs_BT: tokens with the selected ones replaced or kept, selected_BT: bool)."""
  select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  shape = tokens_BT.shape
  selected_BT = (jax.random.uniform(select_rng, shape) < m.prob) & (tokens_BT != m.pad_id)
  kind_BT = jax.random.uniform(kind_rng, shape)  # < mask_fraction: mask; then random; then keep
  random_BT = jax.random.randint(token_rng, shape, 0, m.random_vocab, tokens_BT.dtype)
  inputs_BT = jnp.where(selected_BT & (kind_BT < m.mask_fraction), m.mask_id, tokens_BT)
  use_random = selected_BT & (kind_BT >= m.mask_fraction) & (
      kind_BT < m.mask_fraction + m.random_fraction)
  return jnp.where(use_random, random_BT, inputs_BT), selected_BT


def masked_batch(rng, batch: dict, m: Masking) -> dict:
  """A loader batch {"tokens": [B, seq_len + 1]} -> {inputs, targets, weights} [B, seq_len] over
  its first seq_len tokens (the last one starts the next window)."""
  targets_BT = batch["tokens"][:, :-1]
  inputs_BT, selected_BT = corrupt(rng, targets_BT, m)
  return {"inputs": inputs_BT, "targets": targets_BT, "weights": selected_BT.astype(jnp.float32)}


def eval_rng(tokens_BT1):
  """A key that is a function of the batch alone (so every eval of a batch masks alike)."""
  weights = jnp.arange(1, tokens_BT1.size + 1, dtype=jnp.uint32).reshape(tokens_BT1.shape)
  digest = jnp.sum(tokens_BT1.astype(jnp.uint32) * weights, dtype=jnp.uint32)
  return jax.random.fold_in(jax.random.PRNGKey(0), digest)
