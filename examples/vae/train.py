"""A variational autoencoder (Kingma & Welling 2014) on scikit-learn's 8x8 digits.

The encoder maps an image x (64 pixels in [0, 1]) to the mean and log-variance of q(z | x); z =
mean + exp(log_var / 2) * noise (the reparameterization, so the sample is differentiable); the
decoder maps z to the logits of 64 Bernoulli pixels. The loss is the negative ELBO per image:
reconstruction (the pixels' binary cross-entropy, summed) + KL(q(z | x) || N(0, I)), in nats.

  python -m examples.vae.train --workdir=runs/vae [--config.steps=...]

writes checkpoints and metrics.jsonl (train: loss, reconstruction, kl; val: the same on the
held-out images), and at the end WORKDIR/reconstructions.png (held-out images, each row above
its reconstruction) and WORKDIR/samples.png (decoded z drawn from the prior).
Shapes: B batch, P pixels (64), H hidden, L latent.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from examples import common
from lmjax import metrics

CONFIG = os.path.join(os.path.dirname(__file__), "config.py")


class Encoder(nn.Module):
  hidden_dim: int
  latent_dim: int

  @nn.compact
  def __call__(self, x_BP):
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(x_BP))
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(h_BH))
    return nn.Dense(self.latent_dim, name="mean")(h_BH), nn.Dense(self.latent_dim,
                                                                  name="log_var")(h_BH)


class Decoder(nn.Module):
  hidden_dim: int
  pixels: int = 64

  @nn.compact
  def __call__(self, z_BL):
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(z_BL))
    h_BH = nn.relu(nn.Dense(self.hidden_dim)(h_BH))
    return nn.Dense(self.pixels)(h_BH)  # logits of the pixels


def modules(cfg):
  return Encoder(cfg.hidden_dim, cfg.latent_dim), Decoder(cfg.hidden_dim)


def negative_elbo(cfg, params, x_BP, rng):
  """The loss (mean over the batch of reconstruction + kl_weight * KL) and its parts."""
  encoder, decoder = modules(cfg)
  mean_BL, log_var_BL = encoder.apply(params["encoder"], x_BP)
  z_BL = mean_BL + jnp.exp(0.5 * log_var_BL) * jax.random.normal(rng, mean_BL.shape)
  logits_BP = decoder.apply(params["decoder"], z_BL)
  reconstruction_B = optax.sigmoid_binary_cross_entropy(logits_BP, x_BP).sum(-1)
  kl_B = 0.5 * (jnp.exp(log_var_BL) + mean_BL ** 2 - 1.0 - log_var_BL).sum(-1)
  parts = {"reconstruction": reconstruction_B.mean(), "kl": kl_B.mean(),
           "negative_elbo": (reconstruction_B + kl_B).mean()}
  return (reconstruction_B + cfg.kl_weight * kl_B).mean(), parts


def init(cfg, optimizer):
  encoder, decoder = modules(cfg)
  rng_encoder, rng_decoder = jax.random.split(jax.random.key(cfg.seed))
  params = {"encoder": encoder.init(rng_encoder, jnp.zeros((1, 64))),
            "decoder": decoder.init(rng_decoder, jnp.zeros((1, cfg.latent_dim)))}
  return {"params": params, "opt_state": optimizer.init(params)}


def make_step(cfg, optimizer):
  @jax.jit
  def step(state, x_BP, rng):
    grad_fn = jax.value_and_grad(lambda p: negative_elbo(cfg, p, x_BP, rng), has_aux=True)
    (loss, parts), grads = grad_fn(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, dict(parts, loss=loss)
  return step


def run(cfg, workdir: str, stop_at_step: int | None = None) -> dict:
  common.check_workdir(cfg, workdir)  # before any work
  data = common.digits(cfg.val_fraction, cfg.seed)
  optimizer = optax.adam(cfg.learning_rate)
  # one fixed noise draw for the val ELBO: the same number for the same params
  evaluate = jax.jit(lambda params: negative_elbo(cfg, params, data["val"],
                                                  jax.random.key(cfg.seed + 2))[1])
  state, val = common.train(
      cfg, workdir, init(cfg, optimizer), make_step(cfg, optimizer),
      lambda i: data["train"][common.batch_indices(len(data["train"]), cfg.batch_size,
                                                   cfg.seed, i)],
      lambda s: {k: float(v) for k, v in evaluate(s["params"]).items()}, stop_at_step)
  pictures(cfg, state["params"], data["val"][:50], workdir)
  return val


def pictures(cfg, params, images_NP, workdir: str) -> None:
  """reconstructions.png (the decoder's mean at the encoder's mean z, under each image) and
  samples.png (100 draws from the prior, decoded the same way)."""
  encoder, decoder = modules(cfg)
  decode = lambda z: jax.nn.sigmoid(decoder.apply(params["decoder"], z))
  recon_NP = decode(encoder.apply(params["encoder"], images_NP)[0])
  pairs = jnp.stack([images_NP.reshape(5, 10, 64), recon_NP.reshape(5, 10, 64)], 1)
  samples = decode(jax.random.normal(jax.random.key(cfg.seed + 3), (100, cfg.latent_dim)))
  metrics.log("wrote " + common.image_grid(pairs.reshape(-1, 64), os.path.join(
      workdir, "reconstructions.png")) + " and " + common.image_grid(
          samples, os.path.join(workdir, "samples.png")))


if __name__ == "__main__":
  common.main(run, None, CONFIG)
