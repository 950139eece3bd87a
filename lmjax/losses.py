"""Objectives as losses: next-token (causal LM), masked LM, SFT and sequence classification.

Every loss has one signature,

    loss(forward, params, batch, rng, deterministic) -> (loss sum, sums)

`forward` runs the model on `params` (a `Forward`), `batch` is a dict of arrays (the fields its
objective's `batch_fields` name), `rng` feeds dropout. The loss is a sum over what it scores, and
`sums` holds "tokens" (how many were scored: the denominator) and any other sums to report per
scored item (correct predictions). The train step divides by "tokens" only after summing over
micro-batches, so an accumulated step equals the large batch's exactly.

An `Objective` is a loss with what the step and evaluation need around it; `objective(name, ...)`
makes one by name (`train.objective` or `finetune.task`), with the facts it needs (the mask token,
the number of classes) as arguments. A new objective is a loss function, an entry in OBJECTIVES and
its name in schema.CHOICES.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import lora as lora_lib
from lmjax import masking as masking_lib
from lmjax.model import DTYPES, Transformer, constrain


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model as losses call it. `params` is a run's params: the model's tree, or, when the run
  has parts besides the model, {"model": tree, "lora": adapters, "head": classifier}."""
  model: Transformer
  lora_scale: float = 0.0

  def __call__(self, params, inputs_BT, positions_BT=None, segments_BT=None, *, rng=None,
               deterministic: bool = True, hidden: bool = False):
    """Logits [B, T, V] (float32), or with hidden=True the final-norm states [B, T, D]."""
    if "model" in params:
      variables = {"params": params["model"]}
      if "lora" in params:
        variables["lora"] = lora_lib.variables(params["lora"], self.lora_scale)
    else:
      variables = {"params": params}
    rngs = {"dropout": rng if rng is not None else jax.random.PRNGKey(0)}
    return self.model.apply(variables, inputs_BT, positions_BT, segment_ids_BT=segments_BT,
                            deterministic=deterministic, return_hidden=hidden, rngs=rngs)


# --- the LM head and cross-entropy, in chunks ---------------------------------------------------

def head_logits(c, hidden_BCD, head):
  """Logits [B, C, V] (float32) exactly as the model's head makes them: compute-dtype matmul,
  muP's 1/width_mult."""
  dt = DTYPES[c.dtype]
  equation = "BCD,VD->BCV" if c.tie_embeddings else "BCD,DV->BCV"
  logits_BCV = jnp.einsum(equation, hidden_BCD.astype(dt), head.astype(dt))
  if c.parametrization == "mup":
    logits_BCV = logits_BCV / c.width_mult
  return constrain(logits_BCV, ("batch", "length", "act_vocab")).astype(jnp.float32)


def head_of(c, params):
  """The LM head's matrix of a model's params (of a run's params): the tied embedding or head."""
  tree = params["model"] if "model" in params else params
  return tree["embed"]["embedding"] if c.tie_embeddings else tree["head"]["kernel"]


def _head_nll(c, hidden_BCD, head, targets_BC):
  """One chunk: the head's logits, their cross-entropy with the targets and their argmax."""
  logits_BCV = head_logits(c, hidden_BCD, head)
  nll_BC = optax.softmax_cross_entropy_with_integer_labels(logits_BCV, targets_BC)
  return nll_BC, jnp.argmax(logits_BCV, -1).astype(jnp.int32)


def chunked(fn: Callable, chunk: int, *arrays_BT):
  """`fn(*chunks)` over `chunk` positions of every row at a time (each row keeps its device: the
  chunks cut the sequence, not the batch), each chunk rebuilt in the backward instead of kept:
  what `fn` makes inside ([B, chunk, V] logits) lives one chunk at a time, never [B, T, V].
  `fn` returns a tuple of [B, C] arrays; the result is that tuple over [B, T]. A sequence the
  chunk does not divide is padded to whole chunks (the pads' outputs are dropped); chunk 0, or
  one as long as the sequence, is one plain pass."""
  b, t = arrays_BT[0].shape[:2]
  if chunk == 0 or chunk >= t:
    return fn(*arrays_BT)
  n = -(-t // chunk)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
  split = lambda x: pad(x).reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)
  outs = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(x) for x in arrays_BT))
  return tuple(x_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for x_NBC in outs)


def token_losses(c, hidden_BTD, head, targets_BT):
  """(nll [B, T], argmax [B, T]) of the LM head on the final hidden states, `model.loss_chunk`
  positions at a time (`chunked`)."""
  return chunked(lambda h_BCD, y_BC: _head_nll(c, h_BCD, head, y_BC), c.loss_chunk, hidden_BTD,
                 targets_BT)


def lm_losses(forward, params, inputs_BT, targets_BT, positions_BT=None, segments_BT=None, *,
              rng=None, deterministic: bool = True):
  """(nll [B, T], argmax [B, T]) of predicting `targets_BT` from `inputs_BT`: the model's final
  hidden states, then the LM head and cross-entropy in chunks (token_losses)."""
  hidden_BTD = forward(params, inputs_BT, positions_BT, segments_BT, rng=rng,
                       deterministic=deterministic, hidden=True)
  c = forward.model.cfg
  return token_losses(c, hidden_BTD, head_of(c, params), targets_BT)


# --- the losses ---------------------------------------------------------------------------------

def causal_lm_loss(forward, params, batch, rng, deterministic=False, *, eos_id=None):
  """Next-token cross-entropy over every position of {"tokens": [B, T + 1]} (inputs [:, :-1],
  targets [:, 1:]). With eos_id (data.packing="documents"), each document of the window is its
  own sequence: attention stays inside it, positions restart at 0, and the prediction made at
  an eos (the next document's first token, from another document) is not scored."""
  tokens_BT1 = batch["tokens"]
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  if eos_id is None:
    nll_BT, _ = lm_losses(forward, params, inputs_BT, targets_BT, rng=rng,
                          deterministic=deterministic)
    return nll_BT.sum(), {"tokens": jnp.asarray(nll_BT.size, jnp.float32)}
  positions_BT, segments_BT = document_segments(inputs_BT, eos_id)
  nll_BT, _ = lm_losses(forward, params, inputs_BT, targets_BT, positions_BT, segments_BT,
                        rng=rng, deterministic=deterministic)
  scored_BT = (inputs_BT != eos_id).astype(jnp.float32)
  return (nll_BT * scored_BT).sum(), {"tokens": scored_BT.sum()}


def document_segments(inputs_BT, eos_id: int):
  """(positions, segment ids) [B, T] of windows of eos-terminated documents: a document starts
  at the window's first token and after every eos (an eos belongs to the document it ends);
  segment ids count documents from 1 in each row, positions count from 0 in each document."""
  starts_BT = jnp.pad(inputs_BT[:, :-1] == eos_id, ((0, 0), (1, 0)), constant_values=True)
  segments_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32)
  index_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
  first_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
  return index_BT - first_BT, segments_BT


def masked_lm_loss(forward, params, batch, rng, deterministic=False):
  """Cross-entropy at the selected positions of {inputs, targets, weights} (masking.py), and how
  many of them the argmax predicts."""
  targets_BT, weights_BT = batch["targets"], batch["weights"]
  nll_BT, argmax_BT = lm_losses(forward, params, batch["inputs"], targets_BT, rng=rng,
                                deterministic=deterministic)
  correct_BT = (argmax_BT == targets_BT).astype(jnp.float32)
  return (nll_BT * weights_BT).sum(), {"tokens": weights_BT.sum(),
                                       "masked_accuracy": (correct_BT * weights_BT).sum()}


def sft_loss(forward, params, batch, rng, deterministic=False):
  """Cross-entropy on the response tokens (weights 1) of packed rows {inputs, targets, weights,
  positions, segments}: each example has its own positions and attends within its segment."""
  nll_BT, _ = lm_losses(forward, params, batch["inputs"], batch["targets"], batch["positions"],
                        batch["segments"], rng=rng, deterministic=deterministic)
  return (nll_BT * batch["weights"]).sum(), {"tokens": batch["weights"].sum()}


def pool(hidden_BTD, segments_BT, pooling: str):
  """[B, D]: the last token (the eos), the mean over tokens, or the first token."""
  if pooling == "first":
    return hidden_BTD[:, 0]
  if pooling == "mean":
    mask_BT = (segments_BT > 0).astype(hidden_BTD.dtype)
    return (hidden_BTD * mask_BT[..., None]).sum(1) / jnp.maximum(mask_BT.sum(1), 1.0)[:, None]
  last_B = jnp.maximum((segments_BT > 0).sum(1) - 1, 0)
  return jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]


def class_logits(forward, params, batch, pooling: str, rng=None, deterministic=True):
  """[B, C]: params["head"] on the pooled final hidden states of {inputs, positions, segments}."""
  hidden_BTD = forward(params, batch["inputs"], batch["positions"], batch["segments"], rng=rng,
                       deterministic=deterministic, hidden=True)
  pooled_BD = pool(hidden_BTD, batch["segments"], pooling)
  head = params["head"]
  return pooled_BD @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def classification_loss(forward, params, batch, rng, deterministic=False, *, pooling="last"):
  """Cross-entropy of the labels over the valid rows (eval batches are padded with invalid ones),
  and how many the argmax gets right. "tokens" counts examples here."""
  logits_BC = class_logits(forward, params, batch, pooling, rng, deterministic)
  nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
  correct_B = (jnp.argmax(logits_BC, -1) == batch["labels"]).astype(jnp.float32)
  valid_B = batch["valid"]
  return (nll_B * valid_B).sum(), {"tokens": valid_B.sum(), "accuracy": (correct_B *
                                                                          valid_B).sum()}


def classification_eval_sums(forward, params, batch, *, pooling: str, num_classes: int) -> dict:
  """The loss's sums and the confusion matrix [label, prediction] over the valid rows (macro-F1
  from sums: the same whatever order or device the rows came in)."""
  logits_BC = class_logits(forward, params, batch, pooling)
  nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
  predicted_B = jnp.argmax(logits_BC, -1)
  valid_B = batch["valid"]
  labels_BC = jax.nn.one_hot(batch["labels"], num_classes) * valid_B[:, None]
  return {"loss": (nll_B * valid_B).sum(), "tokens": valid_B.sum(),
          "accuracy": ((predicted_B == batch["labels"]) * valid_B).sum(),
          "confusion": labels_BC.T @ jax.nn.one_hot(predicted_B, num_classes)}


# --- what evaluation reports --------------------------------------------------------------------

def token_metrics(sums: dict) -> dict:
  """Mean loss per scored token, its perplexity, the count, and every other sum per token."""
  count = max(sums["tokens"], 1.0)
  loss = sums["loss"] / count
  result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(sums["tokens"])}
  result.update({k: v / count for k, v in sums.items() if k not in ("loss", "tokens")})
  return result


def macro_f1_from_confusion(confusion_CC) -> float:
  """Mean over the classes that occur (as label or prediction) of 2TP / (2TP + FP + FN)."""
  confusion_CC = np.asarray(confusion_CC, np.float64)
  tp = np.diag(confusion_CC)
  fp, fn = confusion_CC.sum(0) - tp, confusion_CC.sum(1) - tp
  occurs = (confusion_CC.sum(0) + confusion_CC.sum(1)) > 0
  scores = 2 * tp[occurs] / (2 * tp[occurs] + fp[occurs] + fn[occurs])
  return float(np.mean(scores)) if len(scores) else 0.0


def macro_f1(labels, predictions) -> float:
  classes = int(max(np.max(labels, initial=0), np.max(predictions, initial=0))) + 1
  confusion = np.zeros((classes, classes))
  np.add.at(confusion, (np.asarray(labels), np.asarray(predictions)), 1)
  return macro_f1_from_confusion(confusion)


def classification_metrics(sums: dict) -> dict:
  count = max(sums["tokens"], 1.0)
  return {"loss": sums["loss"] / count, "accuracy": sums["accuracy"] / count,
          "macro_f1": macro_f1_from_confusion(sums["confusion"]), "examples": int(sums["tokens"])}


# --- objectives ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Callable  # (forward, params, batch, rng, deterministic) -> (loss sum, sums)
  batch_fields: dict  # the batch's arrays: name -> number of dimensions (rows first)
  # (rng, batch) -> batch: applied by the train step to the whole global batch, before it is
  # split into micro-batches (masked LM draws its masks here); None: the batch as it comes
  prepare: Callable | None = None
  prepare_eval: Callable = lambda batch: batch  # batch -> batch, for evaluation (no step RNG)
  eval_sums: Callable | None = None  # (forward, params, batch) -> sums; None: the loss's sums
  summarize: Callable = token_metrics  # summed eval sums -> the reported numbers
  num_classes: int = 0  # classes of a classification head (0: the run has no head)
  # a second, frozen model the loss takes as `frozen=` (frozen.py): "teacher", "reference"
  # (optional: LoRA's base is one), or "" for none
  frozen: str = ""

  def _loss(self, frozen) -> Callable:
    return functools.partial(self.loss, frozen=frozen) if self.frozen else self.loss

  def train_loss(self, forward: Forward, frozen=None) -> Callable:
    """(params, batch, rng) -> (loss sum, sums): what the train step differentiates."""
    loss = self._loss(frozen)
    return lambda params, batch, rng: loss(forward, params, batch, rng, deterministic=False)

  def evaluate(self, forward: Forward, params, batch, frozen=None) -> dict:
    """The sums of one evaluation batch: {"loss": sum, "tokens": count, ...}."""
    batch = self.prepare_eval(batch)
    if self.eval_sums is not None:
      return self.eval_sums(forward, params, batch)
    loss, sums = self._loss(frozen)(forward, params, batch, None, deterministic=True)
    return {"loss": loss, **sums}


TOKENS = {"tokens": 2}
SFT_ROWS = {"inputs": 2, "targets": 2, "weights": 2, "positions": 2, "segments": 2}
CLASSIFICATION_ROWS = {"inputs": 2, "positions": 2, "segments": 2, "labels": 1, "valid": 1}


def _causal_lm(eos_id: int | None = None, **_) -> Objective:
  return Objective("causal_lm", functools.partial(causal_lm_loss, eos_id=eos_id), TOKENS)


def _masked_lm(masking: masking_lib.Masking, **_) -> Objective:
  return Objective(
      "masked_lm", masked_lm_loss, TOKENS,
      prepare=lambda rng, batch: masking_lib.masked_batch(rng, batch, masking),
      prepare_eval=lambda batch: masking_lib.masked_batch(
          masking_lib.eval_rng(batch["tokens"]), batch, masking))


def _sft(**_) -> Objective:
  return Objective("sft", sft_loss, SFT_ROWS)


def _classification(num_classes: int, pooling: str = "last", **_) -> Objective:
  return Objective(
      "classification", functools.partial(classification_loss, pooling=pooling),
      CLASSIFICATION_ROWS, num_classes=num_classes, summarize=classification_metrics,
      eval_sums=functools.partial(classification_eval_sums, pooling=pooling,
                                  num_classes=num_classes))


OBJECTIVES = {"causal_lm": _causal_lm, "masked_lm": _masked_lm, "sft": _sft,
              "classification": _classification}


def objective(name: str, **facts) -> Objective:
  """The objective `name` (a train.objective or finetune.task value) with its facts: `eos_id`
  (causal_lm with document masking), `masking` (masked_lm), `num_classes` and `pooling`
  (classification)."""
  return OBJECTIVES[name](**facts)
