"""A scaling study that runs on a laptop CPU: 5 model sizes x 3 compute budgets on the built-in corpus
(the Python standard library's source), then a fit of L(N, D).

  lmjax sweep --config=configs/sweeps/cpu.py --workdir=runs/sweep_cpu
  lmjax fit --workdir=runs/sweep_cpu
"""
from lmjax.sweep import default_sweep_config


def get_config():
  s = default_sweep_config()
  b = s.base  # the training config of every point: everything but the shape and the steps
  b.model.style = "gpt2"
  b.model.vocab_size = 1024
  b.model.max_len = 128
  b.data.source = "pystdlib"
  b.data.vocab_size = 1024
  b.data.seq_len = 128
  b.data.max_bytes = 20_000_000
  b.data.val_fraction = 0.02
  b.train.batch_size = 16
  b.train.log_every = 50
  b.train.eval_every = 100_000  # evaluate once, at the end of each run
  b.train.eval_batches = 16
  b.train.checkpoint_every = 200
  b.train.keep_checkpoints = 1
  # muP: the learning rate was picked at d_model 64 and holds for the narrower and wider models (on
  # this corpus at 1e12 FLOPs, sp's best rate moved from 1e-2 at d_model 48 to 3e-3 at 80).
  b.model.parametrization = "mup"
  b.model.mup_base_width = 64
  b.optim.learning_rate = 1e-2
  b.optim.schedule = "cosine"
  b.optim.min_lr_ratio = 0.1
  b.optim.weight_decay = 0.1
  s.warmup_fraction = 0.05

  # Shapes from target non-embedding parameter counts: depth ~ (N / (12 x 32^2))^(1/3), width
  # in multiples of 16 (heads of 16 dimensions).
  s.target_params = (12e3, 25e3, 50e3, 100e3, 200e3)
  s.aspect_ratio = 32.0
  s.head_dim = 16
  s.width_multiple = 16
  s.mlp_ratio = 4.0
  s.flops = (3e11, 1e12, 3e12)
  s.min_tokens_per_param = 4.0  # leave out pairs far from the compute-optimal ratio
  s.max_tokens_per_param = 300.0
  return s
