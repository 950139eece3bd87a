"""An embedding + LSTM + linear classifier: the recurrent baseline for `lmjax finetune`'s
classification task, on the same data, tokenizer and held-out split, with the same metrics.

The examples are read and encoded by lmjax's own fine-tuning data code (lmjax.data.tasks: the
text's tokens cut to seq_len - 1, then eos; labels as finetune numbers them; the held-out split
drawn by `seed` with `val_fraction`). An LSTM (flax.linen's OptimizedLSTMCell under nn.scan)
reads the tokens left to right; its output at the eos, which has seen the whole text, goes
through a dense layer to the class logits (padding comes after the eos, so it changes nothing).

  python -m examples.lstm_classifier.train --workdir=runs/lstm --config.data=FILE.jsonl \
      --config.tokenizer=RUN_OR_TOKENIZER_FILE

Evaluation: loss, accuracy and macro-F1 over every held-out example, printed as `lmjax finetune`
prints them. Shapes: B batch, T tokens, E embedding, H LSTM state, C classes.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from ml_collections import ConfigDict

from examples import common
from lmjax import evaluate as evaluate_lib, losses, metrics, workdir as workdir_lib
from lmjax.data import tasks
from lmjax.errors import ConfigError, DataError

CONFIG = os.path.join(os.path.dirname(__file__), "config.py")


class LSTMClassifier(nn.Module):
  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_classes: int

  @nn.compact
  def __call__(self, inputs_BT, segments_BT):
    x_BTE = nn.Embed(self.vocab_size, self.embed_dim)(inputs_BT)
    lstm = nn.scan(nn.OptimizedLSTMCell, variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=1, out_axes=1)(self.hidden_dim)
    carry = lstm.initialize_carry(jax.random.key(0), x_BTE[:, 0].shape)
    _, h_BTH = lstm(carry, x_BTE)
    last_B = segments_BT.sum(1) - 1  # the eos
    h_BH = jnp.take_along_axis(h_BTH, last_B[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.num_classes)(h_BH)


def tokenizer_file(path: str) -> str:
  """config.tokenizer: a run's directory (the tokenizer it trained with) or a tokenizer file."""
  if not path:
    raise ConfigError("Set --config.tokenizer=RUN (a run directory, e.g. runs/quickstart) or a "
                      "tokenizer.model / tokenizer.json file: the tokenizer to compare under.")
  if not epath.Path(path).exists():
    raise DataError(f"--config.tokenizer={path} does not exist: pass a run directory or a "
                    "tokenizer.model / tokenizer.json file.")
  if workdir_lib.config_path(path).exists():
    return workdir_lib.tokenizer_path(workdir_lib.load_config(path), path)
  return workdir_lib.tokenizer_model_file(path)


def load_data(cfg):
  """lmjax finetune's classification data (lmjax.data.tasks.TaskData) for this config."""
  if not cfg.data:
    raise ConfigError("Set --config.data=FILE.jsonl: {\"text\": ..., \"label\": ...} lines.")
  if not epath.Path(cfg.data).exists():
    raise DataError(f"--config.data={cfg.data} does not exist.")
  task = ConfigDict({"finetune": {"task": "classification", "data": cfg.data, "num_classes": 0,
                                  "val_fraction": cfg.val_fraction},
                     "data": {"tokenizer": tokenizer_file(cfg.tokenizer), "seq_len": cfg.seq_len},
                     "train": {"seed": cfg.seed}})
  data = tasks.load_task_data(task)
  if data.val is None:
    raise ConfigError("val_fraction=0 holds nothing out: there would be nothing to compare.")
  return data, tasks.load_tokenizer(task.data.tokenizer).vocab_size


def make_functions(cfg, model, optimizer):
  def loss_fn(params, batch):
    logits_BC = model.apply(params, batch["inputs"], batch["segments"])
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
    return nll_B.mean(), (jnp.argmax(logits_BC, -1) == batch["labels"]).mean()

  @jax.jit
  def step(state, batch, rng):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, {
        "loss": loss, "accuracy": accuracy}

  @jax.jit
  def predict(params, batch):
    logits_BC = model.apply(params, batch["inputs"], batch["segments"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"]), jnp.argmax(
        logits_BC, -1)
  return step, predict


def evaluate(predict, params, rows: dict, batch_size: int) -> dict:
  """Loss, accuracy and macro-F1 over every held-out example (lmjax.losses' macro-F1)."""
  nll, predicted = [], []
  for batch in tasks.eval_batches(rows, batch_size):
    nll_B, predicted_B = jax.device_get(predict(params, batch))
    valid_B = batch["valid"] > 0
    nll.append(nll_B[valid_B])
    predicted.append(predicted_B[valid_B])
  nll, predicted = np.concatenate(nll), np.concatenate(predicted)
  labels = rows["labels"]
  return {"loss": float(nll.mean()), "accuracy": float((predicted == labels).mean()),
          "macro_f1": losses.macro_f1(labels, predicted), "examples": len(labels)}


def run(cfg, workdir: str, stop_at_step: int | None = None) -> dict:
  common.check_workdir(cfg, workdir)  # before any work
  data, vocab_size = load_data(cfg)
  model = LSTMClassifier(vocab_size, cfg.embed_dim, cfg.hidden_dim, data.stats["classes"])
  optimizer = optax.adam(cfg.learning_rate)
  params = model.init(jax.random.key(cfg.seed), data.train["inputs"][:1],
                      data.train["segments"][:1])
  metrics.log(f"{data.stats['train']['examples']} training and {data.stats['val']['examples']} "
              f"held-out examples, {len(data.labels)} classes; "
              f"{sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.2f}M params")
  step, predict = make_functions(cfg, model, optimizer)
  num_train = len(data.train["labels"])
  _, val = common.train(
      cfg, workdir, {"params": params, "opt_state": optimizer.init(params)}, step,
      lambda i: {k: v[common.batch_indices(num_train, cfg.batch_size, cfg.seed, i)]
                 for k, v in data.train.items()},
      lambda s: evaluate(predict, s["params"], data.val, cfg.batch_size), stop_at_step,
      describe=evaluate_lib.format_result)
  return val


if __name__ == "__main__":
  common.main(run, None, CONFIG)
