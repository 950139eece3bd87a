"""Masked LM (BERT): which tokens to corrupt, how, the loss on them, and the mask token's id.

BERT's recipe (Devlin et al. 2019): every non-pad token is selected with probability
`train.mask_prob` (0.15); a selected token is replaced by the mask token (`mask_token_fraction`,
0.8), by a random token (`random_token_fraction`, 0.1) or kept (the rest), and the encoder
(`model.causal=False`) predicts the original token at the selected positions only. Loss and
accuracy are over the selected positions; perplexity is exp(that loss).

The corruption is drawn inside the jitted train step from the step's RNG (part of the checkpoint)
for the whole global batch at once, before it is split into micro-batches. A resumed run, a run on
another mesh (random bits do not depend on sharding: jax_threefry_partitionable, JAX's default)
and a run with gradient accumulation therefore draw the same masks. Evaluation draws its masks from
the batch's tokens, so `lmjax eval` and training's periodic eval score the same positions.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

from lmjax.config import ConfigError
from lmjax.data.tokenizer import MASK_PIECE, PAD_ID


@dataclasses.dataclass(frozen=True)
class Masking:
  mask_id: int  # the token that replaces most selected tokens
  random_vocab: int  # random replacements are ids in [0, random_vocab)
  prob: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1
  pad_id: int = PAD_ID  # never selected


def is_masked_lm(cfg) -> bool:
  return cfg.train.objective == "masked_lm"


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


def masked_batch(rng, tokens_BT1, m: Masking):
  """A loader batch [B, seq_len + 1] -> (inputs_BT, targets_BT, weights_BT) over its first seq_len
  tokens (the last one starts the next window)."""
  targets_BT = tokens_BT1[:, :-1]
  inputs_BT, selected_BT = corrupt(rng, targets_BT, m)
  return inputs_BT, targets_BT, selected_BT.astype(jnp.float32)


def masked_lm_loss(model, params, inputs_BT, targets_BT, weights_BT, rng,
                   deterministic: bool = True):
  """Sum of cross-entropy over the selected positions, and {tokens: their number, correct: how
  many the argmax predicts}."""
  logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=deterministic,
                           rngs={"dropout": rng})
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  correct_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  return (nll_BT * weights_BT).sum(), {"tokens": weights_BT.sum(),
                                       "correct": (correct_BT * weights_BT).sum()}


def eval_rng(tokens_BT1):
  """A key that is a function of the batch alone (so every eval of a batch masks alike)."""
  weights = jnp.arange(1, tokens_BT1.size + 1, dtype=jnp.uint32).reshape(tokens_BT1.shape)
  digest = jnp.sum(tokens_BT1.astype(jnp.uint32) * weights, dtype=jnp.uint32)
  return jax.random.fold_in(jax.random.PRNGKey(0), digest)


def masking_for(cfg, workdir: str | None = None) -> Masking | None:
  """The run's Masking (None for causal LM). The mask id: train.mask_token_id if set; synthetic
  data: vocab_size - 1 (which the synthetic stream then never contains); text: the tokenizer's
  "[MASK]" piece (trained in when train.objective=masked_lm), else the first id after the
  tokenizer's pieces if model.vocab_size leaves room. Without a tokenizer to read (a benchmark of
  a text config with no workdir), vocab_size - 1 stands in."""
  if not is_masked_lm(cfg):
    return None
  t, vocab = cfg.train, cfg.model.vocab_size
  explicit = t.mask_token_id if t.mask_token_id >= 0 else None
  if cfg.data.source == "synthetic":
    mask_id, random_vocab = vocab - 1, vocab - 1
  else:
    from lmjax.data.tokenizer import load_tokenizer, prepared_dir
    path = cfg.data.tokenizer or (
        os.path.join(prepared_dir(cfg, workdir), "tokenizer.model") if workdir else "")
    if path and os.path.isfile(path):
      sp = load_tokenizer(path)
      size = sp.get_piece_size()
      piece_id = sp.piece_to_id(MASK_PIECE)
      random_vocab = size
      if sp.id_to_piece(piece_id) == MASK_PIECE:
        mask_id = piece_id
      elif size < vocab:
        mask_id = size  # an id no text encodes to
      elif explicit is None:
        raise ConfigError(
            f"The tokenizer {path} has no '{MASK_PIECE}' piece and model.vocab_size={vocab} "
            f"leaves no spare id for one. Set --config.model.vocab_size={size + 1} (or more), or "
            f"--config.train.mask_token_id=ID, or prepare the data with "
            f"train.objective=masked_lm (which trains the piece into a new tokenizer).")
      else:
        mask_id = explicit
    else:
      mask_id, random_vocab = vocab - 1, vocab
  return Masking(mask_id=explicit if explicit is not None else mask_id,
                 random_vocab=random_vocab, prob=t.mask_prob,
                 mask_fraction=t.mask_token_fraction, random_fraction=t.random_token_fraction)
