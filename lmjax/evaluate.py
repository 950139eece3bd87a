"""Evaluation on the validation split: loss, perplexity, bits per byte (masked LM: loss,
perplexity and accuracy over the masked tokens; no bits per byte, which needs every token scored).

Training's periodic eval and `lmjax eval` both call `evaluate_split`.
"""
from __future__ import annotations

import math

import jax

from lmjax import data as data_lib
from lmjax import sharding as sharding_lib


def evaluate_batches(setup, eval_step, params, batches) -> dict:
  """Mean loss over `batches` (this process's rows of each global batch). `eval_step` returns
  (loss sum, predicted tokens) or, for masked LM, (loss sum, masked tokens, correct ones)."""
  sums = None
  with setup.context():
    for local in batches:
      out = [float(x) for x in eval_step(params, sharding_lib.put_batch(local,
                                                                         setup.batch_sharding))]
      sums = out if sums is None else [a + b for a, b in zip(sums, out)]
  loss_sum, count, *correct = sums or [0.0, 0.0]
  loss = loss_sum / max(count, 1.0)
  result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
  if correct:
    result["masked_accuracy"] = correct[0] / max(count, 1.0)
  return result


def evaluate_split(cfg, workdir: str, setup, eval_step, params, split: str = "val",
                   num_batches: int | None = None) -> dict:
  """The first `num_batches` (default train.eval_batches) batches of a split, the same every time.

  Bits per byte = loss (nats/token) / ln 2 * tokens / UTF-8 bytes of the split's text: comparable
  across tokenizers. It is absent for synthetic data, which has no text.
  """
  num_batches = num_batches or cfg.train.eval_batches
  iterator = data_lib.make_iterator(cfg, workdir, split, jax.process_index(), jax.process_count())
  # a small split would wrap around: count each window once
  num_batches = min(num_batches, getattr(iterator, "batches_per_epoch", None) or num_batches)
  try:
    result = evaluate_batches(setup, eval_step, params,
                              (next(iterator) for _ in range(num_batches)))
  finally:
    iterator.close()
  bytes_per_token = data_lib.bytes_per_token(cfg, workdir, split)
  if bytes_per_token and "masked_accuracy" not in result:
    result["bits_per_byte"] = result["loss"] / math.log(2) / bytes_per_token
  return result


def format_result(step: int, result: dict) -> str:
  text = f"step {step}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
  if "masked_accuracy" in result:
    text = (f"step {step}: val masked-token loss {result['loss']:.4f}, perplexity "
            f"{result['perplexity']:.2f}, masked accuracy {result['masked_accuracy']:.4f}")
  if "bits_per_byte" in result:
    text += f", bits/byte {result['bits_per_byte']:.4f}"
  return text
