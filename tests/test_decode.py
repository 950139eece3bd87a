"""KV-cache generation: equals the no-cache reference, per-step logits, eos, sampling, compiles.

Compilation dominates the run time on CPU, so tests reuse shapes (PROMPTS, NEW = 8 tokens) and
hence the compiled functions of earlier tests wherever they can.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import decode
from lmjax.model import ModelConfig, Transformer

PROMPTS = [[5, 17, 3, 88, 41], [9, 2], [60, 61, 62, 63, 64, 65, 66, 67]]
NEW = 8

CONFIGS = {
    "gpt2": dict(style="gpt2"),
    "gpt2_scan": dict(style="gpt2", scan_layers=True),
    "llama_gqa": dict(style="llama", num_kv_heads=2),
    "llama_gqa_scan": dict(style="llama", num_kv_heads=2, scan_layers=True),
}


@functools.cache
def tiny(name: str, dtype: str = "float32"):
  """A tiny model with random N(0, 0.5) weights (unit norm scales), large enough that the argmax
  depends on the context. Numpy fills the shapes: compiling the init takes seconds on CPU."""
  cfg = ModelConfig.create(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=128,
                    vocab_size=97, max_len=64, dtype=dtype, **CONFIGS[name])
  model = Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(1)

  def fill(path, s):
    if path[-1].key == "scale":
      return np.ones(s.shape, s.dtype)
    return (0.5 * rng.standard_normal(s.shape)).astype(s.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes["params"]))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_logits(model, params, tokens_BP, pad_B, continuation_BM):
  """Cached logits [B, M + 1, V]: prefill, then feed the given continuation one token a step."""
  b, p = tokens_BP.shape
  cache_len = p + continuation_BM.shape[1]
  cache = decode.init_cache(model, b, cache_len)
  kv_mask_BS = decode.kv_mask(pad_B, cache_len)
  logits_BV, cache = decode.prefill(model, params, cache, tokens_BP, pad_B, kv_mask_BS)

  def step(cache, i_and_tokens_B):
    i, tokens_B = i_and_tokens_B
    logits_BV, cache = decode.decode_step(model, params, cache, tokens_B, p + i - pad_B,
                                          kv_mask_BS)
    return cache, logits_BV

  steps = jnp.arange(continuation_BM.shape[1])
  _, logits_MBV = jax.lax.scan(step, cache, (steps, continuation_BM.T))
  return jnp.concatenate([logits_BV[:, None], logits_MBV.transpose(1, 0, 2)], axis=1)


def _full_logits(model, params, prompt, continuation):
  """No-cache logits predicting each continuation token and the one after: [M + 1, V]."""
  tokens = prompt + continuation
  tokens_1T = np.zeros((1, model.cfg.max_len), np.int32)  # the reference's shape: no new compile
  tokens_1T[0, :len(tokens)] = tokens
  logits_1TV = decode._full_forward(model, params, tokens_1T)
  return np.asarray(logits_1TV[0, len(prompt) - 1:len(tokens)])


def _cached_and_full_logits(model, params, continuations):
  tokens_BP, pad_B = decode.left_pad(PROMPTS, pad_id=0)
  cached = _teacher_forced_logits(model, params, tokens_BP, pad_B,
                                  np.array(continuations, np.int32))
  for row, (prompt, cont) in enumerate(zip(PROMPTS, continuations)):
    yield np.asarray(cached[row]), _full_logits(model, params, prompt, cont)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_reference(name):
  model, params = tiny(name)
  out = decode.generate(model, params, PROMPTS, max_new_tokens=NEW)
  assert out == [decode.generate_reference(model, params, p, NEW) for p in PROMPTS]
  assert all(len(row) == NEW for row in out)
  assert len({t for row in out for t in row}) > 3  # not a degenerate constant output


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_scan"])  # the greedy test covers all four
def test_cached_logits_match_full_forward(name):
  model, params = tiny(name)
  continuations = decode.generate(model, params, PROMPTS, max_new_tokens=NEW)
  for cached, full in _cached_and_full_logits(model, params, continuations):
    # Logits here reach ~10, so float32 summation-order noise is ~1e-6 of that scale.
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_bfloat16_greedy_matches_reference():
  model, params = tiny("llama_gqa_scan", "bfloat16")
  out = decode.generate(model, params, PROMPTS, max_new_tokens=NEW)
  assert [len(row) for row in out] == [NEW] * 3
  for prompt, row in zip(PROMPTS, out):
    ref = decode.generate_reference(model, params, prompt, NEW)
    if row != ref:
      # bf16 rounds differently on the cached and the full path, which may only flip a near-tie:
      # the reference's two best logits at the first difference must be a few bf16 ulps apart.
      i = next(i for i, (a, b) in enumerate(zip(row, ref)) if a != b)
      logits_V = _full_logits(model, params, prompt, ref[:i])[-1]
      best, second = np.sort(logits_V)[-2:][::-1]
      assert best - second < 0.05 * np.abs(logits_V).max(), (row, ref)


def test_batch_rows_equal_prompts_alone():
  model, params = tiny("llama_gqa")
  batch = decode.generate(model, params, PROMPTS, max_new_tokens=NEW, pad_id=7)
  for prompt, row in zip(PROMPTS[:2], batch):  # the most padded rows; each alone compiles anew
    assert decode.generate(model, params, [prompt], max_new_tokens=NEW) == [row]


def test_eos_stops_row_and_is_excluded():
  model, params = tiny("gpt2")
  free = decode.generate(model, params, PROMPTS, max_new_tokens=NEW)
  eos = free[0][3]  # row 0 stops at step 3 or earlier
  out = decode.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_id=eos)
  for free_row, row in zip(free, out):
    assert row == (free_row[:free_row.index(eos)] if eos in free_row else free_row)
  assert len(out[0]) <= 3
  assert out == [decode.generate_reference(model, params, p, NEW, eos_id=eos) for p in PROMPTS]


def test_stops_early_when_all_rows_finished():
  model, params = tiny("llama_gqa")
  prompt = PROMPTS[1]
  first = decode.generate(model, params, [prompt], max_new_tokens=NEW)[0][0]
  tokens_BP, pad_B = decode.left_pad([prompt], 0)
  _, steps = decode._generate_padded(
      model, params, tokens_BP, pad_B, jax.random.key(0), np.float32(1), np.int32(0),
      np.float32(1), np.int32(first), max_new_tokens=NEW, mode=decode.GREEDY)
  assert int(steps) == 1  # the prefill's token was eos: the loop ran no decode step
  assert decode.generate(model, params, [prompt], max_new_tokens=NEW, eos_id=first) == [[]]


def test_max_new_tokens_respected():
  model, params = tiny("llama_gqa")
  assert decode.generate(model, params, PROMPTS, max_new_tokens=0) == [[], [], []]
  assert [len(r) for r in decode.generate(model, params, PROMPTS, max_new_tokens=1)] == [1, 1, 1]
  sampled = decode.generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=1.0)
  assert [len(r) for r in sampled] == [NEW] * 3


def test_sampling():
  model, params = tiny("llama_gqa")
  gen = functools.partial(decode.generate, model, params, PROMPTS, max_new_tokens=NEW)
  greedy = gen()
  assert gen(temperature=1.0, top_k=1, seed=3) == greedy
  assert gen(temperature=1.0, top_p=1e-6, seed=3) == greedy
  assert gen(temperature=1.0, seed=5) == gen(temperature=1.0, seed=5)
  assert gen(temperature=1.0, seed=5) != gen(temperature=1.0, seed=6)
  combined = gen(temperature=0.8, top_k=20, top_p=0.9, seed=1)
  compiled = decode._generate_padded._cache_size()
  assert combined == gen(temperature=0.8, top_k=20, top_p=0.9, seed=1)
  assert combined != gen(temperature=0.8, top_k=20, top_p=0.9, seed=2)
  # Temperature, top-k/p and the seed are traced values: changing them compiles nothing.
  gen(temperature=1.7, top_k=3, top_p=1.0, seed=4)
  assert decode._generate_padded._cache_size() == compiled


def test_filter_top_k_top_p():
  logits_1V = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  filter_fn = jax.jit(decode.filter_top_k_top_p)
  kept = lambda k, p: np.isfinite(filter_fn(logits_1V, k, p))[0].tolist()
  assert kept(0, 1.0) == [True] * 4
  assert kept(2, 1.0) == [False, True, False, True]
  assert kept(0, 0.75) == [False, True, False, True]  # 0.5 + 0.3: the smallest set with >= 0.75
  assert kept(0, 0.85) == [False, True, True, True]
  assert kept(3, 0.1) == [False, True, False, False]
  # Sampling only ever returns kept tokens, and returns each of them.
  logits_BV = jnp.tile(logits_1V, (500, 1))
  sample_fn = jax.jit(decode.sample, static_argnames="mode")
  tokens_B = sample_fn(logits_BV, jax.random.key(0), 1.0, 2, 1.0, mode=decode.SAMPLE_FILTERED)
  assert set(np.asarray(tokens_B).tolist()) == {1, 3}


def test_the_servers_per_row_choice():
  """engine._choose: per-row greedy / temperature / nucleus in one batch; the nucleus's sort and
  the sampling are skipped (lax.cond) when no row needs them, with the same choices."""
  from lmjax import engine
  probs = jnp.array([0.05, 0.5, 0.15, 0.3, 0.0])
  logits_BV = jnp.tile(jnp.log(probs + 1e-9), (600, 1)).at[:, 4].set(10.0)  # id 4: past vocab
  keys_B = jax.random.split(jax.random.key(0), 600)
  choose = jax.jit(engine._choose)
  rows = lambda t, p: (jnp.full(600, t), jnp.full(600, p))  # noqa: E731
  tokens = lambda t, p: np.asarray(choose(logits_BV, keys_B, 1, *rows(t, p), 4)[0])  # noqa: E731
  assert set(tokens(0.0, 1.0).tolist()) == {1}  # greedy, and the padded id 4 is never chosen
  sampled = tokens(1.0, 1.0)
  assert set(sampled.tolist()) == {0, 1, 2, 3}
  assert abs(np.mean(sampled == 1) - 0.5) < 0.07
  assert set(tokens(1.0, 0.75).tolist()) == {1, 3}
  # one batch of mixed rows gives each row what it gives alone
  temperature_B = jnp.array([0.0, 1.0, 1.0] * 200)
  top_p_B = jnp.array([1.0, 1.0, 0.75] * 200)
  mixed = np.asarray(choose(logits_BV, keys_B, 1, temperature_B, top_p_B, 4)[0])
  assert (mixed[0::3] == 1).all() and (mixed[1::3] == sampled[1::3]).all()
  assert set(mixed[2::3].tolist()) <= {1, 3}
  assert (mixed[2::3] == tokens(1.0, 0.75)[2::3]).all()


def test_no_recompilation_per_token_and_rope_past_max_len(monkeypatch):
  model, params = tiny("llama_gqa_scan")
  traces, original_step = [], decode.decode_step

  def counting_step(*args):
    traces.append(1)  # runs when jax traces the step, never when the compiled loop runs
    return original_step(*args)

  monkeypatch.setattr(decode, "decode_step", counting_step)
  # A shape no other test uses, so the first call must trace. 50 + 20 tokens also runs past
  # max_len = 64, which RoPE allows (it has no position table).
  prompts = [list(range(1, 51))] * 5
  size_before = decode._generate_padded._cache_size()
  out = decode.generate(model, params, prompts, max_new_tokens=20)
  assert [len(row) for row in out] == [20] * 5
  assert len(traces) == 1  # one trace of the loop body, not one per token
  assert decode._generate_padded._cache_size() == size_before + 1
  traces.clear()
  decode.generate(model, params, [list(range(2, 52))] * 5, max_new_tokens=20, eos_id=9)
  assert not traces and decode._generate_padded._cache_size() == size_before + 1


def test_gpt2_max_len_error():
  model, params = tiny("gpt2")  # max_len 64
  with pytest.raises(ValueError, match="exceeds the model's max_len of 64"):
    decode.generate(model, params, [[1] * 60], max_new_tokens=5)
  decode._check_args(model, [[1] * 56], NEW, 0.0, 0, 1.0)  # exactly max_len is fine
  # llama decoding past max_len is tested with the compile counts.


def test_bad_arguments():
  model, params = tiny("gpt2")
  with pytest.raises(ValueError, match="at least one token"):
    decode.generate(model, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="token ids"):
    decode.generate(model, params, [[1, 97]], max_new_tokens=2)
  with pytest.raises(ValueError, match="pad_id"):
    decode.generate(model, params, [[1]], max_new_tokens=2, pad_id=-1)
  with pytest.raises(ValueError, match="top_p"):
    decode.generate(model, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
