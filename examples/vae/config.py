"""The VAE on scikit-learn's 8x8 digits: `python -m examples.vae.train --workdir=runs/vae`."""
from ml_collections import ConfigDict


def get_config():
  return ConfigDict({
      "latent_dim": 8,        # z ~ N(0, I) in this many dimensions
      "hidden_dim": 256,      # width of the encoder's and the decoder's two hidden layers
      "kl_weight": 1.0,       # 1 is the ELBO; other values are a beta-VAE
      "batch_size": 64,       # images per step
      "learning_rate": 1e-3,  # Adam
      "steps": 2000,          # may be raised to train a finished run further
      "val_fraction": 0.1,    # of the 1,797 images, held out for the val ELBO
      "seed": 0,              # the split, the init, the batches and the noise
      "log_every": 50,        # train records in WORKDIR/metrics.jsonl
      "eval_every": 500,      # val numbers, printed (and at step 0 and the end)
      "checkpoint_every": 500,  # Orbax checkpoints in WORKDIR/checkpoints (and at the end)
  })
