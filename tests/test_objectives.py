"""Objectives are losses: the registry matches the config's choices, the step takes any loss, and
a new objective is one loss function plus a config value."""
import numpy as np
import optax
import pytest
from conftest import tiny_config

from lmjax import config as config_lib
from lmjax import losses
from lmjax import train as train_lib
from lmjax.metrics import read_metrics


def test_every_configurable_objective_has_a_loss():
  from lmjax import frozen
  # distill is train.objective=causal_lm with a distill.teacher
  assert set(losses.OBJECTIVES) | set(frozen.OBJECTIVES) == (
      set(config_lib.CHOICES["train.objective"]) | set(config_lib.FINETUNE_TASKS) | {"distill"})


def label_smoothed_loss(forward, params, batch, rng, deterministic=False):
  """Next-token cross-entropy against targets smoothed by 0.1 (a new objective for the test)."""
  tokens_BT1 = batch["tokens"]
  logits_BTV = forward(params, tokens_BT1[:, :-1], rng=rng, deterministic=deterministic)
  targets_BTV = optax.smooth_labels(
      jax_one_hot(tokens_BT1[:, 1:], logits_BTV.shape[-1]), 0.1)
  nll_BT = optax.softmax_cross_entropy(logits_BTV, targets_BTV)
  return nll_BT.sum(), {"tokens": np.float32(nll_BT.size), "smoothed": nll_BT.sum()}


def jax_one_hot(x, n):
  import jax
  return jax.nn.one_hot(x, n)


def test_a_new_objective_is_a_loss_and_a_config_value(tmp_path, monkeypatch):
  choices = dict(config_lib.CHOICES)
  choices["train.objective"] = (*choices["train.objective"], "smoothed_lm")
  monkeypatch.setattr(config_lib, "CHOICES", choices)
  monkeypatch.setitem(losses.OBJECTIVES, "smoothed_lm",
                      lambda **_: losses.Objective("smoothed_lm", label_smoothed_loss,
                                                   losses.TOKENS))
  with pytest.raises(config_lib.ConfigError, match="needs model.causal"):  # relations still hold
    tiny_config("train.objective=smoothed_lm", "model.causal=false")
  cfg = tiny_config("train.objective=smoothed_lm", "train.steps=12", "train.log_every=4")
  result = train_lib.train(cfg, str(tmp_path), progress=False)
  train = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]  # the step optimized the new loss
  assert train[-1]["smoothed"] == pytest.approx(train[-1]["loss"])  # its sums are reported
  assert result["val"]["loss"] > 0 and "perplexity" in result["val"]
