"""A compute-optimal study for a TPU pod slice (or a GPU cluster): LLaMA-style models of about 20M
to 1B non-embedding parameters x 4 compute budgets from 1e18 to 3e19 FLOPs (about 2e20 in all:
a day on a v5p-32 at 40% MFU), with muP so that one learning rate serves every width.

It trains on your corpus (tens of billions of tokens; 3e19 FLOPs at 20 tokens per parameter is
~25B tokens at the optimum): pass it as an override, e.g.
  lmjax sweep --config=configs/sweeps/pod.py --workdir=gs://BUCKET/sweeps/pod \
    --config.data.source="text:gs://BUCKET/corpus/*.jsonl.gz" --plan
and see the README's "Scaling sweeps on a TPU slice" for the launch.
"""
from lmjax.sweep import default_sweep_config


def get_config():
  s = default_sweep_config()
  b = s.base
  b.model.style = "llama"
  b.model.vocab_size = 32000
  b.model.tie_embeddings = False
  b.model.max_len = 2048
  b.model.dtype = "bfloat16"
  b.model.scan_layers = True
  b.model.remat = "dots_no_batch"
  # muP: the learning rate and init are set for d_model = 256 and transfer to the wider models.
  # 6e-3 at base width 256 follows Cerebras-GPT's muP runs; tune it at the base width first
  # (a few short runs of the smallest shape at 2e-3 .. 2e-2) if your data differs much.
  b.model.parametrization = "mup"
  b.model.mup_base_width = 256
  b.data.source = ""  # your corpus: --config.data.source=text:GLOB or tfds:NAME
  b.data.seq_len = 2048
  b.train.batch_size = 256  # 524,288 tokens a step, at every size and budget
  b.train.log_every = 50
  b.train.eval_every = 2000
  b.train.eval_batches = 64
  b.train.checkpoint_every = 1000
  b.train.keep_checkpoints = 1
  b.optim.learning_rate = 6e-3
  b.optim.schedule = "cosine"
  b.optim.min_lr_ratio = 0.1
  b.optim.weight_decay = 0.1
  b.optim.b2 = 0.95
  b.mesh.data, b.mesh.fsdp = 1, -1  # FSDP over every chip: the 1B points need it
  s.warmup_fraction = 0.02

  s.target_params = (20e6, 31e6, 48e6, 75e6, 115e6, 180e6, 280e6, 430e6, 670e6, 1e9)
  s.aspect_ratio = 96.0  # d_model / num_layers: 1B -> 21 layers of 2048
  s.head_dim = 64
  s.width_multiple = 128
  s.mlp_ratio = 8 / 3  # SwiGLU
  s.flops = (3e17, 1e18, 3e18, 1e19, 3e19, 1e20)
  s.min_tokens_per_param = 3.0  # each IsoFLOP profile spans about 3 to 150 tokens per parameter
  s.max_tokens_per_param = 150.0
  return s
