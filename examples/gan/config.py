"""The GAN on scikit-learn's 8x8 digits: `python -m examples.gan.train --workdir=runs/gan`."""
from ml_collections import ConfigDict


def get_config():
  return ConfigDict({
      "noise_dim": 16,        # the generator's input z ~ N(0, I)
      "hidden_dim": 256,      # width of both networks' two hidden layers
      "batch_size": 64,
      "generator_lr": 5e-4,   # Adam(b1=0.5) for each network, as in DCGAN
      "discriminator_lr": 5e-4,
      "steps": 4000,
      "val_fraction": 0.1,    # held-out images: the score of real digits, for reference
      "num_samples": 500,     # generated images scored at each evaluation
      "seed": 0,
      "log_every": 50,
      "eval_every": 500,
      "checkpoint_every": 500,
  })
