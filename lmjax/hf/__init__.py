"""Hugging Face checkpoints <-> lmjax runs (GPT-2, Llama, Mistral; safetensors): `convert` reads and
writes them, `mapping` names every tensor, `configs` translates config.json, `files` reads
model directories."""
from lmjax.errors import ConversionError
from lmjax.hf.convert import export_hf, import_hf

__all__ = ["ConversionError", "export_hf", "import_hf"]
