"""The optax optimizer from config: schedule, clipping, weight-decay mask, AdamW / Lion / Adafactor.

Gradient accumulation is not here: the train step sums gradients over micro-batches and applies
one update, which equals the large-batch update exactly (step.accumulate_gradients).
"""
from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("scale", "bias")  # norms and biases


def learning_rate_schedule(cfg) -> optax.Schedule:
  o, steps = cfg.optim, cfg.train.steps
  peak, warmup = o.learning_rate, min(o.warmup_steps, steps)
  end = peak * o.min_lr_ratio
  decay_steps = max(steps - warmup, 1)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_norms_and_biases: bool = False):
  def decays(path, _):
    return decay_norms_and_biases or str(getattr(path[-1], "key", path[-1])) not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def is_hidden_matrix(path) -> bool:
  """Attention and MLP kernels: the matrices whose fan-in and fan-out both grow with width."""
  names = [str(getattr(k, "key", k)) for k in path]
  return names[-1] == "kernel" and ("attn" in names or "mlp" in names)


def scale_hidden_updates(width_mult: float) -> optax.GradientTransformation:
  """muP for Adam-type optimizers (AdamW, Lion, Adafactor: updates of a size independent of the
  gradient's): hidden matrices learn at lr / width_mult; embeddings, the output layer, norms and
  biases at lr. Scaling the whole update scales weight decay with it, as the mup package's MuAdamW
  does (torch's AdamW decays by lr * weight_decay)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u / width_mult if is_hidden_matrix(path) else u, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optim
  lr = learning_rate_schedule(cfg)
  mask = lambda p: weight_decay_mask(p, o.decay_norms_and_biases)
  if o.name == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  elif o.name == "lion":
    opt = optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
  else:  # adafactor: factored second moments, no first moment by default
    opt = optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=None,
                          weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask)
  if cfg.model.parametrization == "mup":
    opt = optax.chain(opt, scale_hidden_updates(cfg.model.d_model / cfg.model.mup_base_width))
  if o.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt
