"""A GAN (Goodfellow et al. 2014, the non-saturating generator loss) on scikit-learn's 8x8 digits.

The generator maps noise z to 64 pixels in [0, 1]; the discriminator maps an image to the logit
of "real". Each step, in one jitted function, updates the discriminator (its own Adam) on a real
batch and a generated one, then the generator (its own Adam) on fresh noise through the updated
discriminator.

  python -m examples.gan.train --workdir=runs/gan [--config.steps=...]

Train records: both losses and the discriminator's mean D(real), D(fake). Evaluation scores
num_samples generated images on what a generator that learned nothing cannot fake:
  nn_distance   mean L2 distance from each sample to its nearest training image (lower: closer
                to the data); the held-out real images' own distance is printed for reference
  digit_score   exp(E KL(p(digit | x) || p(digit))) under a logistic-regression digit classifier
                fit on the training images (an Inception Score with a digits classifier: 10 for
                confidently recognized digits of every class, 1 for one class or for mush)
At the end, WORKDIR/samples.png holds 100 samples. Shapes: B batch, P pixels (64), H hidden, Z noise.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import common
from lmjax import metrics

CONFIG = os.path.join(os.path.dirname(__file__), "config.py")


class Generator(nn.Module):
  hidden_dim: int

  @nn.compact
  def __call__(self, z_BZ):
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(z_BZ))
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(h_BH))
    return nn.sigmoid(nn.Dense(64)(h_BH))


class Discriminator(nn.Module):
  hidden_dim: int

  @nn.compact
  def __call__(self, x_BP):
    h_BH = nn.leaky_relu(nn.Dense(self.hidden_dim)(x_BP), 0.2)
    h_BH = nn.leaky_relu(nn.Dense(self.hidden_dim)(h_BH), 0.2)
    return nn.Dense(1)(h_BH)[:, 0]  # the logit of "real"


def optimizers(cfg):
  return (optax.adam(cfg.generator_lr, b1=0.5), optax.adam(cfg.discriminator_lr, b1=0.5))


def init(cfg):
  g_opt, d_opt = optimizers(cfg)
  rng_g, rng_d = jax.random.split(jax.random.key(cfg.seed))
  g = Generator(cfg.hidden_dim).init(rng_g, jnp.zeros((1, cfg.noise_dim)))
  d = Discriminator(cfg.hidden_dim).init(rng_d, jnp.zeros((1, 64)))
  return {"generator": g, "discriminator": d, "g_opt": g_opt.init(g), "d_opt": d_opt.init(d)}


def make_step(cfg):
  generator, discriminator = Generator(cfg.hidden_dim), Discriminator(cfg.hidden_dim)
  g_opt, d_opt = optimizers(cfg)

  def d_loss(d, fake_BP, real_BP):
    real_B, fake_B = discriminator.apply(d, real_BP), discriminator.apply(d, fake_BP)
    loss = optax.sigmoid_binary_cross_entropy(real_B, jnp.ones_like(real_B)).mean() + \
        optax.sigmoid_binary_cross_entropy(fake_B, jnp.zeros_like(fake_B)).mean()
    return loss, {"d_real": jax.nn.sigmoid(real_B).mean(), "d_fake": jax.nn.sigmoid(fake_B).mean()}

  def g_loss(g, d, z_BZ):  # non-saturating: maximize log D(G(z))
    fake_B = discriminator.apply(d, generator.apply(g, z_BZ))
    return optax.sigmoid_binary_cross_entropy(fake_B, jnp.ones_like(fake_B)).mean()

  @jax.jit
  def step(state, real_BP, rng):
    rng_d, rng_g = jax.random.split(rng)
    shape = (real_BP.shape[0], cfg.noise_dim)
    fake_BP = generator.apply(state["generator"], jax.random.normal(rng_d, shape))
    (loss_d, parts), grads = jax.value_and_grad(d_loss, has_aux=True)(
        state["discriminator"], fake_BP, real_BP)
    updates, d_state = d_opt.update(grads, state["d_opt"])
    d = optax.apply_updates(state["discriminator"], updates)
    loss_g, grads = jax.value_and_grad(g_loss)(state["generator"], d,
                                               jax.random.normal(rng_g, shape))
    updates, g_state = g_opt.update(grads, state["g_opt"])
    g = optax.apply_updates(state["generator"], updates)
    return ({"generator": g, "discriminator": d, "g_opt": g_state, "d_opt": d_state},
            dict(parts, discriminator_loss=loss_d, generator_loss=loss_g))
  return step


def nn_distance(images_NP, reference_MP) -> float:
  """Mean over the images of the L2 distance to the nearest reference image."""
  squared_NM = ((images_NP ** 2).sum(1)[:, None] - 2 * images_NP @ reference_MP.T +
                (reference_MP ** 2).sum(1)[None])
  return float(np.sqrt(np.maximum(squared_NM.min(1), 0)).mean())


def digit_classifier(data):
  from sklearn.linear_model import LogisticRegression
  return LogisticRegression(max_iter=2000).fit(data["train"], data["train_labels"])


def digit_score(classifier, images_NP) -> float:
  p_NC = np.clip(classifier.predict_proba(images_NP), 1e-12, 1)
  marginal_C = p_NC.mean(0)
  return float(np.exp((p_NC * (np.log(p_NC) - np.log(marginal_C))).sum(1).mean()))


def scores(classifier, images_NP, train_NP) -> dict:
  return {"nn_distance": nn_distance(images_NP, train_NP),
          "digit_score": digit_score(classifier, images_NP)}


def run(cfg, workdir: str, stop_at_step: int | None = None) -> dict:
  common.check_workdir(cfg, workdir)  # before any work
  data = common.digits(cfg.val_fraction, cfg.seed)
  classifier = digit_classifier(data)
  real = scores(classifier, data["val"], data["train"])
  metrics.log(f"held-out real digits: nn_distance {real['nn_distance']:.4f}, digit_score "
              f"{real['digit_score']:.4f}")
  generate = jax.jit(lambda g, z: Generator(cfg.hidden_dim).apply(g, z))
  z_NZ = jax.random.normal(jax.random.key(cfg.seed + 2), (cfg.num_samples, cfg.noise_dim))
  evaluate = lambda s: scores(classifier, np.asarray(generate(s["generator"], z_NZ)),
                              data["train"])
  state, val = common.train(
      cfg, workdir, init(cfg), make_step(cfg),
      lambda i: data["train"][common.batch_indices(len(data["train"]), cfg.batch_size,
                                                   cfg.seed, i)],
      evaluate, stop_at_step)
  metrics.log("wrote " + common.image_grid(generate(state["generator"], z_NZ[:100]),
                                           os.path.join(workdir, "samples.png")))
  return dict(val, real_nn_distance=real["nn_distance"], real_digit_score=real["digit_score"])


if __name__ == "__main__":
  common.main(run, None, CONFIG)
