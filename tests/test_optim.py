import jax
import numpy as np
import pytest

from conftest import build, tiny_config
from lmjax import train as train_lib
from lmjax.data import make_iterator
from lmjax.metrics import read_metrics
from lmjax.optim import learning_rate_schedule, weight_decay_mask


def test_warmup_then_cosine_to_min_ratio():
  cfg = tiny_config("train.steps=100", "optim.warmup_steps=10", "optim.learning_rate=1.0",
                    "optim.min_lr_ratio=0.1")
  lr = learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(55)) == pytest.approx(0.55, abs=1e-3)  # cosine midpoint between 1 and 0.1
  assert float(lr(100)) == pytest.approx(0.1)
  linear = learning_rate_schedule(tiny_config("train.steps=100", "optim.warmup_steps=10",
                                              "optim.learning_rate=1.0", "optim.schedule=linear"))
  assert float(linear(55)) == pytest.approx(0.55, abs=1e-3)
  assert float(linear(100)) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
  run = build(tiny_config())
  mask = weight_decay_mask(run.abstract_state.params)
  assert mask["layer_0"]["attn"]["query"]["kernel"] and mask["embed"]["embedding"]
  assert not mask["layer_0"]["attn"]["query"]["bias"]
  assert not mask["layer_0"]["attn_norm"]["scale"] and not mask["final_norm"]["bias"]
  scanned = build(tiny_config("model.scan_layers=true"))  # norms become 2-D there
  assert not weight_decay_mask(scanned.abstract_state.params)["layers"]["attn_norm"]["scale"]


def one_step(*overrides):
  cfg = tiny_config(*overrides)
  run = build(cfg)
  batch = next(make_iterator(cfg, "", "train"))
  with run.context():
    state, metrics = run.jit_train_step()(run.init(), batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_accumulation_equals_the_large_batch():
  # eps=1 keeps Adam's first step proportional to the gradient instead of ~sign(gradient), which
  # would blow float rounding of near-zero gradients up to full-size differences
  common = ("optim.warmup_steps=0", "optim.eps=1.0")
  params_1, metrics_1 = one_step("optim.accumulation_steps=1", *common)
  params_4, metrics_4 = one_step("optim.accumulation_steps=4", *common)
  assert metrics_4["loss"] == pytest.approx(metrics_1["loss"], rel=1e-6)
  assert metrics_4["grad_norm"] == pytest.approx(metrics_1["grad_norm"], rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_4)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_scales_gradients_to_the_global_norm():
  import jax.numpy as jnp
  from lmjax.optim import make_optimizer
  # a large eps makes Adam's step proportional to the gradient, so clipping shows in the update
  cfg = tiny_config("optim.grad_clip=0.5", "optim.eps=10.0", "optim.weight_decay=0.0",
                    "optim.warmup_steps=0")
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
  grads = {"w": jnp.full((3, 4), 2.0), "b": jnp.full((4,), 2.0)}  # global norm 8
  clipped = make_optimizer(cfg)
  updates, _ = clipped.update(grads, clipped.init(params), params)
  free = make_optimizer(tiny_config("optim.grad_clip=0.0", "optim.eps=10.0",
                                    "optim.weight_decay=0.0", "optim.warmup_steps=0"))
  scaled = jax.tree_util.tree_map(lambda g: g * 0.5 / 8.0, grads)
  expected, _ = free.update(scaled, free.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  unclipped, _ = free.update(grads, free.init(params), params)
  assert abs(float(unclipped["w"][0, 0])) > 5 * abs(float(updates["w"][0, 0]))


@pytest.mark.parametrize("name,lr", [("lion", 1e-3), ("adafactor", 1e-2)])
def test_other_optimizers_learn(tmp_path, name, lr):
  cfg = tiny_config(f"optim.name={name}", f"optim.learning_rate={lr}", "train.steps=20",
                    "train.log_every=5", "train.eval_every=20", "train.checkpoint_every=20")
  train_lib.train(cfg, str(tmp_path), progress=False)
  losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert losses[-1] < losses[0] - 0.3, losses
