"""The first run: a small GPT on the built-in corpus (the Python standard library's source),
trained on a laptop CPU in minutes.

  lmjax train --config=configs/quickstart.py --workdir=runs/quickstart
"""
from lmjax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.model.style = "gpt2"
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.model.vocab_size = 4096
  c.model.max_len = 256
  c.data.source = "pystdlib"
  c.data.seq_len = 128
  c.data.vocab_size = 4096
  c.data.max_bytes = 10_000_000  # ~3.3M tokens: more than the 2M the run reads
  c.train.batch_size = 32
  c.train.steps = 500
  c.train.log_every = 25
  c.train.eval_every = 250
  c.data.val_fraction = 0.02
  c.train.eval_batches = 16
  c.train.checkpoint_every = 100
  c.train.sample_prompt = "def "
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  return c
