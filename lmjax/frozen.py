"""Objectives with a second, frozen model next to the trained one: distillation (a teacher) and
preference tuning (a reference).

The frozen model is a `Frozen`: its `Forward` (its own architecture) and its params, which the
jitted step takes as an argument beside the state (sharded on the same mesh, never
differentiated, no optimizer state, not in the checkpoint). A loss that needs one takes it as
`frozen=`; `Objective.frozen` says so.

  distill  alpha * next-token cross-entropy + (1 - alpha) * T^2 * KL between the teacher's and
           the student's distributions softened by temperature T: forward KL(teacher || student)
           (mean-seeking, Hinton et al.) or reverse KL(student || teacher) (mode-seeking, as in
           MiniLLM). Both heads run `model.loss_chunk` positions at a time (256 when 0), so the
           [B, T, V] logits of neither model exist at once.
  dpo/ipo  Packed preference pairs: in each row, segment 2k - 1 is pair k's prompt + chosen
           response and segment 2k its prompt + rejected response; h = (log pi - log ref)(chosen)
           - (log pi - log ref)(rejected), summed over response tokens. DPO (Rafailov et al.,
           finetune.dpo_loss=sigmoid): -log sigmoid(beta h); IPO (Azar et al., ipo):
           (h - 1 / (2 beta))^2, on the summed log-ratios (TRL's IPO averages them per token).
           The policy runs without dropout, as the reference does. The reference is the
           frozen init model, or with LoRA the base model itself (the adapters off: no copy).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lmjax.losses import (SFT_ROWS, TOKENS, Forward, Objective, causal_lm_loss, chunked,
                          document_segments, head_logits, head_of, lm_losses, token_metrics)
from lmjax.losses import objective as losses_objective

DISTILL_CHUNK = 256  # positions a chunk when model.loss_chunk is 0


@dataclasses.dataclass(frozen=True)
class Frozen:
  forward: Forward
  params: Any


# --- distillation -------------------------------------------------------------------------------

def _distill_chunk(cs, ct, head_s, head_t, hs_BCD, ht_BCD, targets_BC, temperature, kl):
  """One chunk: the student's cross-entropy and the softened KL [B, C]."""
  logits_s = head_logits(cs, hs_BCD, head_s)
  logits_t = jax.lax.stop_gradient(head_logits(ct, ht_BCD, head_t))
  logp_s = jax.nn.log_softmax(logits_s)
  ce_BC = -jnp.take_along_axis(logp_s, targets_BC[..., None], -1)[..., 0]
  soft_s = jax.nn.log_softmax(logits_s / temperature)
  soft_t = jax.nn.log_softmax(logits_t / temperature)
  if kl == "forward":
    kl_BC = (jnp.exp(soft_t) * (soft_t - soft_s)).sum(-1)
  else:
    kl_BC = (jnp.exp(soft_s) * (soft_s - soft_t)).sum(-1)
  return ce_BC, kl_BC


def distill_loss(forward, params, batch, rng, deterministic=False, *, frozen: Frozen,
                 alpha: float, temperature: float, kl: str, eos_id: int | None = None):
  """alpha * CE + (1 - alpha) * T^2 * KL per token of {"tokens": [B, T + 1]}; sums of both.
  With eos_id (data.packing="documents"), both models see each document alone and the
  prediction made at an eos is not scored, as in causal_lm_loss."""
  tokens_BT1 = batch["tokens"]
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  positions_BT = segments_BT = None
  scored_BT = jnp.ones(inputs_BT.shape, jnp.float32)
  if eos_id is not None:
    positions_BT, segments_BT = document_segments(inputs_BT, eos_id)
    scored_BT = (inputs_BT != eos_id).astype(jnp.float32)
  hs_BTD = forward(params, inputs_BT, positions_BT, segments_BT, rng=rng,
                   deterministic=deterministic, hidden=True)
  ht_BTD = jax.lax.stop_gradient(frozen.forward(frozen.params, inputs_BT, positions_BT,
                                                segments_BT, hidden=True))
  cs, ct = forward.model.cfg, frozen.forward.model.cfg
  one = functools.partial(_distill_chunk, cs, ct, head_of(cs, params),
                          jax.lax.stop_gradient(head_of(ct, frozen.params)),
                          temperature=temperature, kl=kl)
  ce_BT, kl_BT = chunked(one, cs.loss_chunk or DISTILL_CHUNK, hs_BTD, ht_BTD, targets_BT)
  ce_BT, kl_BT = ce_BT * scored_BT, kl_BT * scored_BT
  loss_BT = alpha * ce_BT + (1.0 - alpha) * temperature**2 * kl_BT
  return loss_BT.sum(), {"tokens": scored_BT.sum(), "ce": ce_BT.sum(), "kl": kl_BT.sum()}


def _distill(alpha=0.5, temperature=1.0, kl="forward", eos_id=None, **_) -> Objective:
  """The student's loss; evaluation scores the student alone (its next-token loss)."""
  return Objective("distill", functools.partial(distill_loss, alpha=alpha,
                                                temperature=temperature, kl=kl, eos_id=eos_id),
                   TOKENS, eval_sums=functools.partial(_plain_sums, eos_id=eos_id),
                   frozen="teacher")


def _plain_sums(forward, params, batch, eos_id=None) -> dict:
  loss, sums = causal_lm_loss(forward, params, batch, None, deterministic=True, eos_id=eos_id)
  return {"loss": loss, **sums}


# --- preference tuning --------------------------------------------------------------------------

def pair_log_ratios(forward, params, batch, rng, frozen: Frozen | None, max_segments: int):
  """(chosen, rejected, valid) [B, K]: the summed response-token log-ratios log pi - log ref of
  each row's pairs (segments 2k - 1 and 2k), and which pairs exist."""
  args = (batch["inputs"], batch["targets"], batch["positions"], batch["segments"])
  # no dropout in the policy either (as TRL): its log-ratios against the reference start at 0
  nll_BT, _ = lm_losses(forward, params, *args, rng=rng, deterministic=True)
  if frozen is None:  # LoRA: the base model without its adapters is the reference
    frozen = Frozen(Forward(forward.model), {"model": params["model"]})
  ref_nll_BT, _ = lm_losses(frozen.forward, jax.lax.stop_gradient(frozen.params), *args)
  weights_BT = batch["weights"]
  one_hot_BTS = jax.nn.one_hot(batch["segments"], max_segments + 1, dtype=jnp.float32)
  ratio_BS = jnp.einsum("bt,bts->bs", (jax.lax.stop_gradient(ref_nll_BT) - nll_BT) * weights_BT,
                        one_hot_BTS)
  present_BS = jnp.einsum("bt,bts->bs", weights_BT, one_hot_BTS) > 0
  valid_BK = (present_BS[:, 1::2] & present_BS[:, 2::2]).astype(jnp.float32)
  return ratio_BS[:, 1::2], ratio_BS[:, 2::2], valid_BK


def preference_loss(forward, params, batch, rng, deterministic=False, *, frozen=None,
                    beta: float, kind: str, max_segments: int):
  """DPO or IPO summed over the pairs; sums of preference accuracy, reward margin and the
  chosen and rejected rewards (beta times the log-ratio). "tokens" counts pairs."""
  del deterministic  # the policy runs without dropout (pair_log_ratios)
  chosen_BK, rejected_BK, valid_BK = pair_log_ratios(forward, params, batch, rng, frozen,
                                                     max_segments)
  h_BK = chosen_BK - rejected_BK
  if kind == "sigmoid":
    loss_BK = -jax.nn.log_sigmoid(beta * h_BK)
  else:
    loss_BK = (h_BK - 1.0 / (2.0 * beta)) ** 2
  total = lambda x: (x * valid_BK).sum()
  return total(loss_BK), {"tokens": valid_BK.sum(), "accuracy": total(h_BK > 0),
                          "margin": total(beta * h_BK), "chosen_reward": total(beta * chosen_BK),
                          "rejected_reward": total(beta * rejected_BK)}


def preference_metrics(sums: dict) -> dict:
  out = token_metrics(sums)
  out.pop("perplexity")
  out["pairs"] = out.pop("tokens")
  return out


def _dpo(beta=0.1, dpo_loss="sigmoid", max_segments=2, **_) -> Objective:
  return Objective("dpo", functools.partial(preference_loss, beta=beta, kind=dpo_loss,
                                            max_segments=max_segments), SFT_ROWS,
                   summarize=preference_metrics, frozen="reference")


OBJECTIVES = {"distill": _distill, "dpo": _dpo}


def objective(name: str, **facts) -> Objective:
  """Any objective by name: these, or losses.objective's."""
  if name in OBJECTIVES:
    return OBJECTIVES[name](**facts)
  return losses_objective(name, **facts)
