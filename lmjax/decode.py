"""Generation with a KV cache: one prefill call, then one token per step, all in one jit.

Shape letters as in model.py, plus P the (padded) prompt length and M = max_new_tokens.

A batch of prompts of different lengths is left-padded to the longest, so every row's next token
is written at the same cache slot (the cache's `index` is shared by all rows). Each row has its own
positions (`slot - pad_count`, so a padded prompt sees the same positions as it would alone) and
`kv_mask_BS` hides its pad slots from attention. Slots past the cache index are hidden by the
model's causal mask, so the key mask never changes during decoding.

The whole loop is a `jax.lax.while_loop` inside one `jax.jit`: it compiles once per (model,
batch size, prompt length, max_new_tokens, sampling mode) and stops as soon as every row has
produced `eos_id`. Temperature, top-k, top-p, eos and the seed are traced values, so changing them
does not recompile; only switching between greedy, plain sampling and filtered sampling does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.errors import UsageError
from lmjax.model import Transformer
from lmjax.trees import to_host

# Sampling modes, a static argument: greedy needs no sort, plain sampling needs no sort, and only
# top-k / top-p filtering pays for sorting the vocabulary every step.
GREEDY, SAMPLE, SAMPLE_FILTERED = "greedy", "sample", "sample_filtered"


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (tokens_BP left-padded with pad_id, pad_B = number of pads in each row)."""
  p = max(len(prompt) for prompt in prompts)
  tokens_BP = np.full((len(prompts), p), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BP[row, p - len(prompt):] = prompt
  pad_B = np.array([p - len(prompt) for prompt in prompts], np.int32)
  return tokens_BP, pad_B


def init_cache(model: Transformer, batch_size: int, cache_len: int):
  """A zero KV cache for `batch_size` rows of `cache_len` slots (the init call sizes it)."""
  tokens_BS = jnp.zeros((batch_size, cache_len), jnp.int32)
  mask_BS = jnp.ones((batch_size, cache_len), bool)
  # eval_shape: only the shapes of the init call are needed, no parameter is materialized.
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens_BS, tokens_BS, mask_BS, decode=True))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def kv_mask(pad_B, cache_len: int):
  """[B, S]: True where a slot may be attended to, i.e. everywhere but the row's left pads."""
  return jnp.arange(cache_len)[None, :] >= pad_B[:, None]


def prefill(model: Transformer, params, cache, tokens_BP, pad_B, kv_mask_BS):
  """Runs the left-padded prompts through the model from an empty cache.

  Returns the logits for the token after each prompt [B, V] and the filled cache.
  """
  p = tokens_BP.shape[1]
  positions_BP = jnp.maximum(jnp.arange(p)[None, :] - pad_B[:, None], 0)  # pads sit at 0
  logits_BPV, variables = model.apply({"params": params, "cache": cache}, tokens_BP, positions_BP,
                                      kv_mask_BS, decode=True, mutable=["cache"])
  return logits_BPV[:, -1], variables["cache"]


def decode_step(model: Transformer, params, cache, tokens_B, positions_B, kv_mask_BS):
  """Feeds one token per row at the cache index; returns the next-token logits [B, V], cache."""
  logits_B1V, variables = model.apply({"params": params, "cache": cache}, tokens_B[:, None],
                                      positions_B[:, None], kv_mask_BS, decode=True,
                                      mutable=["cache"])
  return logits_B1V[:, 0], variables["cache"]


def filter_top_k_top_p(logits_BV, top_k, top_p):
  """Sets to -inf every logit outside the top_k (0 = all) and outside the nucleus of mass top_p.

  The nucleus is the smallest set of most likely tokens whose probability reaches top_p (taken
  over the top-k survivors, as in Hugging Face). Ties with the last kept logit are kept too.
  """
  v = logits_BV.shape[-1]
  sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_top_k_V = jnp.arange(v) < k
  probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # The best token is always kept (its mass_before is 0 < top_p); `in_top_k_V` guards against
  # rounding leaving the cumulative mass just below a top_p of 1.
  num_kept_B = jnp.sum(in_top_k_V & (mass_before_BV < top_p), axis=-1)
  threshold_B1 = jnp.take_along_axis(sorted_BV, num_kept_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def sample(logits_BV, rng, temperature, top_k, top_p, mode: str):
  """Next tokens [B] from float32 logits; `mode` (static) is GREEDY, SAMPLE or SAMPLE_FILTERED."""
  if mode == GREEDY:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if mode == SAMPLE_FILTERED:
    logits_BV = filter_top_k_top_p(logits_BV, top_k, top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "mode"))
def _generate_padded(model: Transformer, params, tokens_BP, pad_B, rng, temperature, top_k, top_p,
                     eos_id, *, max_new_tokens: int, mode: str):
  """The jitted loop: left-padded prompts -> new tokens [B, M] and the number of steps taken.

  Slots after a row's eos hold eos again; eos_id = -1 means none.
  """
  b, p = tokens_BP.shape
  sample_fn = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                mode=mode)
  cache = init_cache(model, b, p + max_new_tokens)
  kv_mask_BS = kv_mask(pad_B, p + max_new_tokens)
  logits_BV, cache = prefill(model, params, cache, tokens_BP, pad_B, kv_mask_BS)
  tokens_B = sample_fn(logits_BV, jax.random.fold_in(rng, 0))
  out_BM = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tokens_B)
  done_B = tokens_B == eos_id

  def not_finished(carry):
    step, _, _, done_B, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def step_fn(carry):
    # Feeds the token chosen at step - 1 (it sits at slot p + step - 1) and picks the next one.
    step, cache, tokens_B, done_B, out_BM = carry
    positions_B = p + step - 1 - pad_B
    logits_BV, cache = decode_step(model, params, cache, tokens_B, positions_B, kv_mask_BS)
    tokens_B = sample_fn(logits_BV, jax.random.fold_in(rng, step))
    tokens_B = jnp.where(done_B, eos_id, tokens_B)
    out_BM = jax.lax.dynamic_update_slice(out_BM, tokens_B[:, None], (0, step))
    return step + 1, cache, tokens_B, done_B | (tokens_B == eos_id), out_BM

  carry = (jnp.int32(1), cache, tokens_B, done_B, out_BM)
  steps, _, _, _, out_BM = jax.lax.while_loop(not_finished, step_fn, carry)
  return out_BM, steps


def _check_args(model: Transformer, prompts, max_new_tokens, temperature, top_k, top_p):
  c = model.cfg
  if not prompts or any(len(prompt) == 0 for prompt in prompts):
    raise UsageError("generate needs at least one prompt and every prompt needs at least one "
                     "token (start empty prompts with a BOS token).")
  if max_new_tokens < 0:
    raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  bad = [t for prompt in prompts for t in prompt if not 0 <= t < c.vocab_size]
  if bad:
    raise UsageError(f"prompt token ids must be in [0, {c.vocab_size}); got {bad[:5]}.")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UsageError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                     f"temperature={temperature}, top_k={top_k}, top_p={top_p}.")
  longest = max(len(prompt) for prompt in prompts)
  if c.style == "gpt2" and longest + max_new_tokens > c.max_len:
    raise UsageError(
        f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
        f"{longest + max_new_tokens} exceeds the model's max_len of {c.max_len} learned "
        f"positions. Shorten the prompts (e.g. keep their last {max(c.max_len - max_new_tokens, 0)}"
        f" tokens) or lower max_new_tokens to {max(c.max_len - longest, 0)}.")


def generate(model: Transformer, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
  """Continues each prompt; returns only the new tokens, one list per prompt.

  temperature 0 is greedy (top_k / top_p then do nothing); otherwise logits are divided by the
  temperature, filtered to the top_k (0 = no limit) and to the top_p nucleus, and sampled. The same
  seed, prompts and settings give the same tokens; a row's samples depend on the whole batch.
  A row stops at its first `eos_id`, which is NOT included in its output; generation stops when
  every row has stopped or after max_new_tokens. `pad_id` only fills the left padding (which is
  masked out), so any valid token id works.

  Raises UsageError (a ValueError) for a gpt2-style model (learned positions) when the longest
  prompt plus max_new_tokens exceeds cfg.max_len; RoPE models have no such limit.
  """
  _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
  if not 0 <= pad_id < model.cfg.vocab_size:  # the pads are embedded, even though masked out
    raise UsageError(f"pad_id must be a token id in [0, {model.cfg.vocab_size}), got {pad_id}.")
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  if temperature == 0:
    mode = GREEDY
  else:
    mode = SAMPLE_FILTERED if top_k > 0 or top_p < 1 else SAMPLE
  tokens_BP, pad_B = left_pad(prompts, pad_id)
  # Fixed dtypes so that Python ints vs floats never change the jit cache key. Greedy never
  # divides by the temperature; 1.0 just keeps the unused traced value finite.
  out_BM, _ = _generate_padded(
      model, params, tokens_BP, pad_B, jax.random.key(seed), np.float32(temperature or 1.0),
      np.int32(top_k), np.float32(top_p), np.int32(-1 if eos_id is None else eos_id),
      max_new_tokens=max_new_tokens, mode=mode)
  out_BM = to_host(out_BM)
  results = []
  for row in out_BM.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    results.append(row)
  return results


@functools.partial(jax.jit, static_argnames=("model",))
def _full_forward(model: Transformer, params, tokens_1T):
  return model.apply({"params": params}, tokens_1T)


def generate_reference(model: Transformer, params, prompt: list[int], max_new_tokens: int,
                       eos_id: int | None = None) -> list[int]:
  """Greedy generation without a cache, for tests: one full forward pass per new token.

  Sequences are right-padded to max_len (or longer for RoPE models) so every call shares one
  compiled forward; the causal mask keeps the padding from affecting the last real token's logits.
  """
  _check_args(model, [prompt], max_new_tokens, 0.0, 0, 1.0)
  length = max(model.cfg.max_len, len(prompt) + max_new_tokens)
  tokens = list(prompt)
  for _ in range(max_new_tokens):
    tokens_1T = np.zeros((1, length), np.int32)
    tokens_1T[0, :len(tokens)] = tokens
    logits_1TV = _full_forward(model, params, tokens_1T)
    token = int(jnp.argmax(logits_1TV[0, len(tokens) - 1]))
    if token == eos_id:
      break
    tokens.append(token)
  return tokens[len(prompt):]


def generate_from_text(model: Transformer, params, tokenizer, prompts: list[str],
                       **kwargs) -> list[str]:
  """Text in, text out, through a data.tokenizer.Tokenizer (prompts framed by
  `encode_prompt`: an empty prompt starts from bos); a row stops at the tokenizer's eos."""
  return generate_from_ids(model, params, tokenizer,
                           [tokenizer.encode_prompt(prompt) for prompt in prompts], **kwargs)


def generate_from_ids(model: Transformer, params, tokenizer, prompts: list[list[int]],
                      **kwargs) -> list[str]:
  """Prompts already tokenized (e.g. a chat template's) -> decoded continuations."""
  eos = tokenizer.eos_id
  out = generate(model, params, prompts, eos_id=eos if eos >= 0 else None, **kwargs)
  return [tokenizer.decode(row) for row in out]

