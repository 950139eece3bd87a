"""LLaMA-style shapes: RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention, untied head.

  lmjax train --config=configs/llama.py:60m --workdir=runs/llama-60m
Variants: 60m, 125m, 1b (TinyLlama's shape), 7b (Llama 2 7B's shape).
"""
from lmjax.config import default_config

SHAPES = {  # num_layers, d_model, num_heads, num_kv_heads, mlp_dim, max_len, learning rate
    "60m": (8, 512, 8, 8, 1376, 1024, 1e-3),
    "125m": (12, 768, 12, 4, 2048, 2048, 6e-4),
    "1b": (22, 2048, 32, 4, 5632, 2048, 4e-4),
    "7b": (32, 4096, 32, 32, 11008, 4096, 3e-4),
}

# the remat policy per size: the least recomputation under which the config's own batch (256
# sequences) trains on a v5p-128 (64 chips, FSDP), from `lmjax compile` (BENCHMARKS.md, "Remat
# defaults"): 1b needs 22.1 GiB per chip without remat; 7b does not fit without it (> 117.7 GiB)
# and needs 50.4 GiB with dots_no_batch
REMAT = {"60m": "none", "125m": "none", "1b": "none", "7b": "dots_no_batch"}


def get_config(variant: str = "60m"):
  if variant not in SHAPES:
    raise ValueError(f"Unknown llama variant '{variant}'; choose one of {', '.join(SHAPES)}.")
  layers, width, heads, kv_heads, mlp, max_len, lr = SHAPES[variant]
  c = default_config()
  c.model.style = "llama"
  c.model.num_layers, c.model.d_model, c.model.num_heads = layers, width, heads
  c.model.num_kv_heads, c.model.mlp_dim, c.model.max_len = kv_heads, mlp, max_len
  c.model.vocab_size = 32000
  c.model.tie_embeddings = False
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-5
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = REMAT[variant]
  c.data.source = "pystdlib"
  c.data.seq_len = max_len
  c.train.batch_size = 256
  c.train.steps = 20000
  c.optim.learning_rate = lr
  c.optim.warmup_steps = 1000
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over all devices by default: large models need it
  return c
