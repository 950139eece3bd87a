"""Hugging Face model directories: config.json, safetensors files (one, or the shards of an index;
never pickles, which can run code) and their tensors."""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from lmjax.errors import ConversionError
from lmjax.hf.mapping import Rule


def _json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(value, dict):
    raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object.")
  return value


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"'{hf_dir}' has no config.json: pass a Hugging Face model directory "
                          "(as written by save_pretrained).")
  return _json(path)


def tensor_files(hf_dir: str) -> list[str]:
  """The safetensors files of a checkpoint: one file, or the shards its index names."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConversionError(f"{index} has no \"weight_map\" of tensor names to shard files.")
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
    if missing:
      raise ConversionError(f"{index} names shard(s) that are missing: {', '.join(missing)}.")
    return [os.path.join(hf_dir, n) for n in names]
  if any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json"))
         for n in os.listdir(hf_dir)):
    raise ConversionError(
        f"'{hf_dir}' has only PyTorch pickle weights (pytorch_model*.bin); lmjax never loads "
        "pickles, which can run arbitrary code. Convert them to safetensors first, e.g. "
        "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`.")
  raise ConversionError(f"'{hf_dir}' has no model.safetensors or model.safetensors.index.json.")


class Tensors:
  """The tensors of safetensors files, read lazily: `shape(name)`, and `read(name, index)` for a
  slice of one (only those bytes are read; bfloat16 through JAX on the CPU, as safetensors' numpy
  reader has none). Names are as in the checkpoint, or normalized by `rename`."""

  def __init__(self, files: Sequence[str], rename=lambda names: {n: n for n in names}):
    from safetensors import safe_open
    self._files = list(files)
    self._handles = []
    for path in self._files:
      try:
        self._handles.append(safe_open(path, framework="flax"))
      except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds
        raise _damaged(path, e) from None
    stored = {name: k for k, h in enumerate(self._handles) for name in h.keys()}
    self._names = {new: (old, stored[old]) for old, new in rename(list(stored)).items()}

  def keys(self):
    return self._names.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def shape(self, name: str) -> tuple:
    old, k = self._names[name]
    return tuple(self._handles[k].get_slice(old).get_shape())

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    old, k = self._names[name]
    try:
      with jax.default_device(jax.devices("cpu")[0]):
        piece = self._handles[k].get_slice(old)
        return np.asarray(piece[index] if index else piece[:])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds
      raise _damaged(self._files[k], e) from None


def _damaged(path: str, e: Exception) -> ConversionError:
  return ConversionError(f"'{path}' is not a readable safetensors file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}): it is truncated or damaged. Copy "
                         "it again from its source.")


def gpt2_names(model_type: str):
  """Old GPT-2 checkpoints (the original `gpt2` on the Hub) lack the `transformer.` prefix."""
  def rename(names):
    if model_type == "gpt2" and not any(k.startswith("transformer.") for k in names):
      return {k: (k if k.startswith("lm_head.") else "transformer." + k) for k in names}
    return {k: k for k in names}
  return rename


def check_tied_head(tensors: Tensors, rules: Sequence[Rule]) -> None:
  """Some tied checkpoints also store lm_head.weight: accept it only if it is the embedding."""
  if "lm_head.weight" not in tensors or any(r.hf == "lm_head.weight" for r in rules):
    return
  embed = tensors.read(next(r.hf for r in rules if r.lmjax == "embed/embedding"))
  if not np.array_equal(tensors.read("lm_head.weight"), embed):
    raise ConversionError("config.json says tie_word_embeddings=true, but lm_head.weight differs "
                          "from the input embedding. Set tie_word_embeddings to false.")
