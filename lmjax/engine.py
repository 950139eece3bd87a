"""The serving engine: requests from many clients decoded together, one token per step.

One background thread owns the model. It takes every request waiting in the queue (up to
`max_batch`, after a short `window` for more to arrive), left-pads their prompts into one batch
(decode.py's layout) and decodes it step by step; each step's token goes to its request's queue
at once (streaming), and a row leaves the batch when it hits eos, a stop string or max_tokens, or
when its client goes away. Requests that arrive during a batch form the next one.

Shapes are bucketed so that nothing recompiles per request: rows to a power of two (at most
max_batch), prompt length and new tokens to powers of two (at least 16). Sampling settings are
per row and traced (temperature 0 = greedy, top_p, a seed each), so they never recompile either.
Log-probabilities are the model's own (log-softmax of the logits, before temperature), with the
`TOP` most likely alternatives, as the OpenAI API reports them.
"""
from __future__ import annotations

import dataclasses
import functools
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import decode
from lmjax.errors import UsageError
from lmjax.model import Transformer

TOP = 5  # alternatives kept per position for `logprobs` (the OpenAI API allows up to 5)
MIN_BUCKET = 16


def bucket(n: int, cap: int | None = None) -> int:
  """The power of two >= n (at least MIN_BUCKET), at most `cap`."""
  b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
  return min(b, cap) if cap else b


@dataclasses.dataclass
class Request:
  """One row to decode; the engine puts ("token", id, logprob, top) and finally ("done",
  reason) on `events`; set `cancelled` to free the row."""
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  cancelled: bool = False


def _top(logits_BV):
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  top_vals, top_ids = jax.lax.top_k(logp_BV, TOP)
  return logp_BV, top_vals, top_ids


def _choose(logits_BV, keys_B, step, temperature_B, top_p_B, vocab):
  """Per-row sampling: greedy where temperature is 0, else temperature + nucleus (top_p); ids
  from `vocab` on (a model's padded vocabulary past the tokenizer's) are never chosen."""
  logp_BV, top_vals, top_ids = _top(logits_BV)  # the model's own, as `score` reports them
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab, logits_BV, -jnp.inf)
  sampling_B = temperature_B > 0

  def sample(logits_BV):  # only when a row samples; the nucleus's sort only when a row needs it
    scaled = logits_BV / jnp.where(sampling_B, temperature_B, 1.0)[:, None]
    scaled = jax.lax.cond(jnp.any(sampling_B & (top_p_B < 1)), lambda x: decode.filter_top_k_top_p(
        x, jnp.int32(0), top_p_B[:, None]), lambda x: x, scaled)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  sampled = jax.lax.cond(jnp.any(sampling_B), sample,
                         lambda x: jnp.zeros(x.shape[:1], jnp.int32), logits_BV)
  tokens_B = jnp.where(sampling_B, sampled, jnp.argmax(logits_BV, -1)).astype(jnp.int32)
  chosen = jnp.take_along_axis(logp_BV, tokens_B[:, None], -1)[:, 0]
  return tokens_B, chosen, top_vals, top_ids


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _start(model: Transformer, params, tokens_BP, pad_B, keys_B, temperature_B, top_p_B, vocab, *,
           cache_len: int):
  cache = decode.init_cache(model, tokens_BP.shape[0], cache_len)
  kv_mask_BS = decode.kv_mask(pad_B, cache_len)
  logits_BV, cache = decode.prefill(model, params, cache, tokens_BP, pad_B, kv_mask_BS)
  return cache, _choose(logits_BV, keys_B, 0, temperature_B, top_p_B, vocab)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(model: Transformer, params, cache, tokens_B, positions_B, kv_mask_BS, keys_B, step,
          temperature_B, top_p_B, vocab):
  logits_BV, cache = decode.decode_step(model, params, cache, tokens_B, positions_B, kv_mask_BS)
  return cache, _choose(logits_BV, keys_B, step, temperature_B, top_p_B, vocab)


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model: Transformer, params, tokens_BT):
  """Right-padded rows -> each token's log-probability given the ones before it (position 0:
  0), with the top alternatives at every position: ([B, T], [B, T, TOP], [B, T, TOP])."""
  logits_BTV = model.apply({"params": params}, tokens_BT)
  logp_BTV, top_vals, top_ids = _top(logits_BTV)
  chosen = jnp.take_along_axis(logp_BTV[:, :-1], tokens_BT[:, 1:, None], -1)[..., 0]
  pad = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], 1)  # noqa: E731
  return pad(chosen), pad(top_vals[:, :-1]), pad(top_ids[:, :-1])


def score(model: Transformer, params, rows: list[list[int]]):
  """Prompt log-probabilities for `echo`/`logprobs` and lm-eval: per row, a list of
  (logprob or None for the first token, {token_id: logprob} of the top alternatives)."""
  t = bucket(max(len(r) for r in rows))
  b = bucket(len(rows), None) if len(rows) > 1 else 1
  tokens = np.zeros((b, t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  chosen, vals, ids = jax.device_get(_score(model, params, tokens))
  return [[(None if j == 0 else float(chosen[i, j]),
            {} if j == 0 else dict(zip(ids[i, j].tolist(), vals[i, j].tolist())))
           for j in range(len(r))] for i, r in enumerate(rows)]


class Engine:
  """Owns the model on one thread; `submit` is safe from any thread."""

  def __init__(self, model: Transformer, params, eos_id: int, vocab: int, max_batch: int = 16,
               window: float = 0.005):
    self.model, self.params, self.eos_id, self.vocab = model, params, eos_id, vocab
    self.max_batch, self.window = max_batch, window
    self.pending: queue.Queue = queue.Queue()
    self.lock = threading.Lock()  # the model is used by one thread at a time (score too)
    self.batches = 0  # decode batches run, and the largest, for tests and logs
    self.largest = 0
    self.cancelled = 0  # rows whose client left (or that hit a stop string) mid-batch
    self.thread = threading.Thread(target=self._loop, daemon=True, name="lmjax-engine")
    self.thread.start()

  def submit(self, request: Request) -> Request:
    c = self.model.cfg
    if c.style == "gpt2" and len(request.prompt) + request.max_tokens > c.max_len:
      raise UsageError(f"the prompt ({len(request.prompt)} tokens) + max_tokens "
                       f"({request.max_tokens}) exceeds the model's context of {c.max_len}.")
    self.pending.put(request)
    return request

  def score(self, rows):
    with self.lock:
      return score(self.model, self.params, rows)

  def _loop(self):
    while True:
      batch = [self.pending.get()]
      deadline = threading.Event()
      deadline.wait(self.window)  # a short window for requests arriving together
      while len(batch) < self.max_batch:
        try:
          batch.append(self.pending.get_nowait())
        except queue.Empty:
          break
      batch = [r for r in batch if not r.cancelled]
      if batch:
        try:
          with self.lock:
            self._run(batch)
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
          for r in batch:
            r.events.put(("error", f"{type(e).__name__}: {e}"))

  def _run(self, batch: list[Request]):
    self.batches, self.largest = self.batches + 1, max(self.largest, len(batch))
    n = len(batch)
    b = min(1 << (n - 1).bit_length(), self.max_batch)
    rows = batch + [dataclasses.replace(batch[0], cancelled=True, events=queue.Queue())
                    for _ in range(b - n)]
    p = bucket(max(len(r.prompt) for r in rows))
    new = bucket(max(r.max_tokens for r in rows))
    tokens_BP, pad_B = decode.left_pad([r.prompt for r in rows], 0)
    tokens_BP = np.concatenate([np.zeros((b, p - tokens_BP.shape[1]), np.int32), tokens_BP], 1)
    pad_B = pad_B + (p - max(len(r.prompt) for r in rows))
    keys = jax.vmap(jax.random.key)(np.array([r.seed for r in rows], np.uint32))
    temperature = np.array([r.temperature for r in rows], np.float32)
    top_p = np.array([r.top_p for r in rows], np.float32)
    vocab = np.int32(self.vocab)
    cache, out = _start(self.model, self.params, tokens_BP, pad_B, keys, temperature, top_p,
                        vocab, cache_len=p + new)
    kv_mask = decode.kv_mask(pad_B, p + new)
    done = [r.cancelled for r in rows]
    produced = [0] * b
    for step in range(1, new + 1):
      tokens, chosen, vals, ids = jax.device_get(out)
      for i, r in enumerate(rows):
        if done[i]:
          continue
        if r.cancelled:
          self.cancelled += 1
          r.events.put(("done", "cancelled"))
          done[i] = True
          continue
        token = int(tokens[i])
        if token == self.eos_id:
          r.events.put(("done", "stop"))
          done[i] = True
          continue
        r.events.put(("token", token, float(chosen[i]), dict(zip(ids[i].tolist(),
                                                               vals[i].tolist()))))
        produced[i] += 1
        if produced[i] >= r.max_tokens:
          r.events.put(("done", "length"))
          done[i] = True
      if all(done) or step == new:
        break
      positions = p + step - 1 - pad_B
      cache, out = _step(self.model, self.params, cache, tokens, positions, kv_mask, keys,
                         np.int32(step), temperature, top_p, vocab)
    for i, r in enumerate(rows):  # a row still going at the bucket's end (cannot happen: the
      if not done[i]:             # bucket holds every row's max_tokens) ends as "length"
        r.events.put(("done", "length"))
