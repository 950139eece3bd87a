"""lmjax: pretrain and adapt Transformer language models with JAX/Flax."""

__version__ = "0.1.0"
