"""Evaluation: the objective's sums over batches, summarized (loss, perplexity and bits per byte;
masked-token accuracy; classification accuracy and macro-F1).

Training's periodic eval, `lmjax eval` and fine-tuning's held-out eval all sum `run.jit_eval_step()`
over batches and hand the sums to `objective.summarize`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import builder
from lmjax import sharding as sharding_lib
from lmjax import workdir as workdir_lib
from lmjax import data as data_lib
from lmjax.data import mixture, tasks


def evaluate_batches(run, eval_step, params, batches) -> dict:
  """The objective's summary of the sums of `eval_step(params, batch)` over `batches` (this
  process's rows of each global batch). `eval_step` may add sums of its own ("bytes")."""
  sums = None
  with run.context():
    for local in batches:
      out = jax.device_get(eval_step(params, run.put_batch(local)))
      out = {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64)
             for k, v in out.items()}
      sums = out if sums is None else {k: sums[k] + v for k, v in out.items()}
  return run.objective.summarize(sums or {"loss": 0.0, "tokens": 0.0})


def evaluate_split(run, workdir: str, eval_step, params, split: str = "val",
                   num_batches: int | None = None, cfg=None) -> dict:
  """The first `num_batches` (default train.eval_batches) batches of a pretraining split, the same
  every time, each window at most once.

  Bits per byte = the summed loss (nats) / ln 2 / the UTF-8 bytes of the tokens it scored (each
  target token's text, `tokenizer.token_bytes`): comparable across tokenizers. It is absent for
  synthetic data, which has no text, and for a masked LM, which does not score every token.
  A mixture (data.mixture) is evaluated on each source's split: its numbers as KEY_NAME, and the
  mixture's (each number averaged with the mixture's weights; perplexity = exp(loss)).
  `cfg`: the data to read (default run.cfg's).
  """
  cfg = cfg or run.cfg
  if cfg.data.mixture:
    return _evaluate_mixture(run, workdir, eval_step, params, split, num_batches, cfg)
  num_batches = num_batches or cfg.train.eval_batches
  iterator = data_lib.make_iterator(cfg, workdir, split, run.process_rows)
  # a small split would wrap around: count each window once
  num_batches = min(num_batches, getattr(iterator, "batches_per_epoch", None) or num_batches)
  with_bytes = cfg.data.source != "synthetic" and run.objective.name in ("causal_lm", "distill")
  if with_bytes:
    eval_step = _with_scored_bytes(run, eval_step, workdir, cfg)
  try:
    result = evaluate_batches(run, eval_step, params,
                              (next(iterator) for _ in range(num_batches)))
  finally:
    iterator.close()
  if with_bytes:
    scored_bytes = result.pop("bytes") * result["tokens"]  # summarize divided every sum by tokens
    result["bits_per_byte"] = result["loss"] * result["tokens"] / math.log(2) / max(
        scored_bytes, 1.0)
  return result


def _evaluate_mixture(run, workdir: str, eval_step, params, split, num_batches, cfg) -> dict:
  parts = {name: (weight, evaluate_split(run, workdir, eval_step, params, split, num_batches,
                                         mixture.source_config(cfg, workdir, name)))
           for name, weight, _ in mixture.parse(cfg.data.mixture)}
  result = {}
  for key in next(iter(parts.values()))[1]:
    values = [(weight, r[key]) for weight, r in parts.values()]
    result[key] = (sum(v for _, v in values) if key in ("tokens", "examples") else
                   sum(weight * v for weight, v in values))
  result["perplexity"] = math.exp(min(result["loss"], 80.0))
  for name, (_, r) in parts.items():
    result.update({f"{key}_{name}": v for key, v in r.items() if key != "perplexity"})
  return result


def _with_scored_bytes(run, eval_step, workdir: str, cfg):
  """eval_step plus "bytes": the UTF-8 bytes of the batch's target tokens, summed on the mesh
  (each global row once, however the rows are spread over processes). With document masking, a
  target after an eos is not scored (losses.causal_lm_loss), so its bytes do not count."""
  count = _bytes_counter(workdir_lib.tokenizer_path(cfg, workdir),
                         run.batch_shardings["tokens"], cfg.data.packing == "documents")
  return lambda params, batch: {**eval_step(params, batch), "bytes": count(batch["tokens"])}


@functools.lru_cache(maxsize=8)
def _bytes_counter(tokenizer_path: str, sharding, documents: bool = False):
  """tokens [B, T + 1] -> the UTF-8 bytes of tokens[:, 1:] (with `documents`, those not after an
  eos), jitted once per tokenizer and sharding (not again at every periodic eval)."""
  tokenizer = data_lib.load_tokenizer(tokenizer_path)
  table = jnp.asarray(tokenizer.token_bytes())
  eos_id = tokenizer.eos_id if documents else -1  # -1: no token is after it
  return jax.jit(lambda tokens: jnp.where(tokens[:, :-1] != eos_id, table[tokens[:, 1:]],
                                          0).sum(dtype=jnp.float32),
                 in_shardings=(sharding,), out_shardings=sharding_lib.replicated(sharding.mesh))


def evaluate_rows(run, eval_step, params, rows: dict) -> dict:
  """Every one of fine-tuning's held-out rows, once."""
  batches = tasks.eval_batches(rows, run.cfg.train.batch_size, run.process_rows)
  return evaluate_batches(run, eval_step, params, batches)


def evaluate_checkpoint(workdir: str, step: int | None = None, num_batches: int | None = None,
                        overrides=()) -> tuple[int, dict]:
  """`lmjax eval`: (step, result) of a run's checkpoint (latest, or `step`) on its val split."""
  _, run, params, step = builder.load_params(workdir, step, overrides)
  return step, evaluate_split(run, workdir, run.jit_eval_step(), params, num_batches=num_batches)


def format_result(step: int, result: dict, objective: str = "causal_lm") -> str:
  if "macro_f1" in result:
    return (f"step {step}: val loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, "
            f"macro-F1 {result['macro_f1']:.4f} ({result['examples']} examples)")
  if "pairs" in result:  # preference tuning
    return (f"step {step}: val loss {result['loss']:.4f}, preference accuracy "
            f"{result['accuracy']:.4f}, reward margin {result['margin']:.4f} ({result['pairs']} "
            "pairs)")
  if "masked_accuracy" in result:
    return (f"step {step}: val masked-token loss {result['loss']:.4f}, perplexity "
            f"{result['perplexity']:.2f}, masked accuracy {result['masked_accuracy']:.4f}")
  scored = " (response tokens)" if objective == "sft" else ""
  text = f"step {step}: val loss {result['loss']:.4f}{scored}, perplexity {result['perplexity']:.2f}"
  if "bits_per_byte" in result:
    text += f", bits/byte {result['bits_per_byte']:.4f}"
  per_source = [k[len("tokens_"):] for k in result if k.startswith("tokens_")]
  if per_source:  # a mixture's sources
    text += "; " + ", ".join(f"{name} {result['loss_' + name]:.4f}" for name in per_source)
  return text
