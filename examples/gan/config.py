"""The GAN on scikit-learn's 8x8 digits: `python -m examples.gan.train --workdir=runs/gan`."""
from ml_collections import ConfigDict


def get_config():
  return ConfigDict({
      "noise_dim": 16,        # the generator's input z ~ N(0, I)
      "hidden_dim": 256,      # width of both networks' two hidden layers
      "batch_size": 64,       # images per step
      "generator_lr": 5e-4,   # Adam(b1=0.5) for each network, as in DCGAN
      "discriminator_lr": 5e-4,  # the discriminator's Adam
      "steps": 4000,          # may be raised to train a finished run further
      "val_fraction": 0.1,    # held-out images: the score of real digits, for reference
      "num_samples": 500,     # generated images scored at each evaluation
      "seed": 0,              # the split, the init, the batches and the noise
      "log_every": 50,        # train records in WORKDIR/metrics.jsonl
      "eval_every": 500,      # val numbers, printed (and at step 0 and the end)
      "checkpoint_every": 500,  # Orbax checkpoints in WORKDIR/checkpoints (and at the end)
  })
