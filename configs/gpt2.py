"""GPT-2 shapes (Radford et al. 2019): learned positions, LayerNorm, GELU, biases, tied embeddings.

  lmjax train --config=configs/gpt2.py:124m --workdir=runs/gpt2-124m
Variants: 124m, 350m, 774m, 1.5b. The vocabulary is GPT-2's 50257 padded to 50304 (a multiple of
128) for faster matmuls; a tokenizer of any size up to that fits.
"""
from lmjax.config import default_config

SHAPES = {  # num_layers, d_model, num_heads, learning rate (GPT-3 paper's for similar sizes)
    "124m": (12, 768, 12, 6e-4),
    "350m": (24, 1024, 16, 3e-4),
    "774m": (36, 1280, 20, 2.5e-4),
    "1.5b": (48, 1600, 25, 2e-4),
}

# the remat policy per size: the least recomputation under which the config's own batch trains
# on a v5p-128 (64 chips, FSDP), from `lmjax compile` (BENCHMARKS.md, "Remat defaults"): without
# remat, 1.5b needs 38.7 GiB per chip of 95
REMAT = {"124m": "none", "350m": "none", "774m": "none", "1.5b": "none"}


def get_config(variant: str = "124m"):
  if variant not in SHAPES:
    raise ValueError(f"Unknown gpt2 variant '{variant}'; choose one of {', '.join(SHAPES)}.")
  layers, width, heads, lr = SHAPES[variant]
  c = default_config()
  c.model.style = "gpt2"
  c.model.num_layers, c.model.d_model, c.model.num_heads = layers, width, heads
  c.model.mlp_dim = 4 * width
  c.model.vocab_size = 50304
  c.model.max_len = 1024
  c.model.tie_embeddings = True
  # accelerator defaults: bfloat16 compute over float32 params and optimizer state, one compiled
  # layer looped over the stacked weights (compile time flat in depth), remat by size (below)
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = REMAT[variant]
  c.data.source = "pystdlib"
  c.data.seq_len = 1024
  c.train.batch_size = 512  # 0.5M tokens per step, as in GPT-3's small models
  c.train.steps = 20000
  c.optim.learning_rate = lr
  c.optim.warmup_steps = 700
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  return c
