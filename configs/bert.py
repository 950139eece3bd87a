"""BERT shapes (Devlin et al. 2019): a bidirectional encoder trained with the masked-LM objective.

  lmjax train --config=configs/bert.py:tiny --workdir=runs/bert-tiny
Variants: tiny (2 layers, trains on a laptop CPU in about a minute), base (12 layers, d_model 768,
110M-class), large (24 layers, d_model 1024). The model is lmjax's GPT-2 style (learned positions,
LayerNorm, GELU, biases, tied output embedding) with model.causal=False; unlike the original BERT it
is pre-LN and has no token-type embeddings, no next-sentence objective and no extra transform in the
MLM head. 15% of tokens are selected; 80% of those become [MASK], 10% a random token, 10% stay.
The optimizer follows BERT's: AdamW, lr 1e-4, 10k warmup steps, linear decay, weight decay 0.01.
"""
from lmjax.config import default_config

SHAPES = {  # num_layers, d_model, num_heads, mlp_dim
    "tiny": (2, 128, 4, 512),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


def get_config(variant: str = "base"):
  if variant not in SHAPES:
    raise ValueError(f"Unknown bert variant '{variant}'; choose one of {', '.join(SHAPES)}.")
  layers, width, heads, mlp = SHAPES[variant]
  c = default_config()
  c.model.style = "gpt2"
  c.model.causal = False
  c.model.num_layers, c.model.d_model = layers, width
  c.model.num_heads, c.model.mlp_dim = heads, mlp
  c.model.tie_embeddings = True
  c.train.objective = "masked_lm"
  c.train.mask_prob = 0.15
  c.train.mask_token_fraction = 0.8
  c.train.random_token_fraction = 0.1
  c.data.source = "pystdlib"  # or text:GLOB / tfds:NAME for your corpus
  c.optim.name = "adamw"
  c.optim.schedule = "linear"
  c.optim.min_lr_ratio = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-6
  c.optim.weight_decay = 0.01
  if variant == "tiny":
    c.model.vocab_size = 1024
    c.model.max_len = 128
    c.data.seq_len = 128
    c.data.max_bytes = 4_000_000  # ~1.3M tokens, more than the 0.8M the run reads
    c.data.val_fraction = 0.02
    c.train.batch_size = 32
    c.train.steps = 200
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    return c
  # accelerator defaults: bfloat16 compute over float32 params and optimizer state, one compiled
  # layer looped over the stacked weights; remat measured as gpt2.py's (BENCHMARKS.md)
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "none"
  c.model.vocab_size = 32768  # a SentencePiece vocabulary of BERT's size (30522), rounded to 128s
  c.model.max_len = 512
  c.model.dropout = 0.1
  c.data.seq_len = 512
  c.train.batch_size = 256  # 128k tokens per step, as BERT
  c.train.steps = 1_000_000
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 10_000
  if variant == "large":
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over all devices: 340M params plus Adam state
  return c
