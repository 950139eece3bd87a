"""The train state and the pure train step.

`train_step(state, batch) -> (state, metrics)` is the whole math of one optimizer step. It does
not know the objective: it differentiates the loss it is given. What trains is static state
(`TrainState.trainable`), not a flag: with LoRA only the adapters (and a head) get gradients and
optimizer state, and the frozen base passes through the step untouched.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array  # completed optimizer steps
  params: Any
  opt_state: Any  # of the trainable params only
  rng: jax.Array  # raw uint32 key: split every step, so it is part of the checkpoint
  # top-level keys of params that train (LoRA: ("lora",) or ("lora", "head")); None: all params
  trainable: tuple | None = struct.field(pytree_node=False, default=None)

  def trainable_params(self):
    if self.trainable is None:
      return self.params
    return {k: self.params[k] for k in self.trainable}

  def with_trainable_params(self, trained):
    """The full params with the trainable part replaced."""
    return trained if self.trainable is None else {**self.params, **trained}


def accumulate_gradients(loss_fn: Callable, params, batch: dict, rng, steps: int):
  """Gradient sum and loss sums of `loss_fn(params, micro_batch, rng) -> (loss sum, sums)` over
  `steps` micro-batches of `batch`: rows j, j + steps, j + 2 steps, ... form micro-batch j, so
  every micro-batch stays spread over all devices with no communication. Sums, not means: the
  accumulated gradient equals the whole batch's exactly."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(carry, xs):
    grad_sum, sums = carry
    micro_batch, i = xs
    (loss, aux), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
    grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
    return (grad_sum, jax.tree_util.tree_map(jnp.add, sums, {"loss": loss, **aux})), None

  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  micro = jax.tree_util.tree_map(
      lambda x: x.reshape(rows // steps, steps, *x.shape[1:]).swapaxes(0, 1), batch)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  _, aux = jax.eval_shape(loss_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
  sums = {k: jnp.zeros((), jnp.float32) for k in ("loss", *aux)}
  if steps == 1:  # a one-trip scan would put the whole step inside a while loop: slower on CPU
    only = jax.tree_util.tree_map(lambda x: x[0], micro)
    (grad_sum, sums), _ = micro_step((zeros, sums), (only, jnp.zeros((), jnp.int32)))
  else:
    (grad_sum, sums), _ = jax.lax.scan(micro_step, (zeros, sums), (micro, jnp.arange(steps)))
  return grad_sum, sums


def make_train_step(loss_fn: Callable, optimizer, schedule, accumulation_steps: int = 1,
                    prepare: Callable | None = None):
  """`loss_fn(params, batch, rng) -> (loss sum, {"tokens": count, ...sums})`; `prepare(rng,
  batch) -> batch` transforms the whole global batch first (masked LM draws its masks there, so
  accumulation does not change them). Metrics: loss and every other sum per token, the gradient
  norm and the learning rate."""
  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    if prepare is not None:  # its own key: the other objectives' dropout streams stay as they are
      prepare_rng, step_rng = jax.random.split(step_rng)
      batch = prepare(prepare_rng, batch)
    trained = state.trainable_params()
    loss_of = lambda p, b, r: loss_fn(state.with_trainable_params(p), b, r)
    grad_sum, sums = accumulate_gradients(loss_of, trained, batch, step_rng, accumulation_steps)
    count = jnp.maximum(sums["tokens"], 1.0)  # a masked-LM batch may select no token at all
    grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    metrics = {"loss": sums["loss"] / count, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    metrics.update({k: v / count for k, v in sums.items() if k not in ("loss", "tokens")})
    return state.replace(step=state.step + 1, params=state.with_trainable_params(trained),
                         opt_state=opt_state, rng=rng), metrics

  return train_step

