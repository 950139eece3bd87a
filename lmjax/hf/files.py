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


def read_tensors(files: Sequence[str]) -> dict:
  """{name: numpy array} of every tensor, bfloat16 included (read through JAX on the CPU:
  safetensors' numpy reader has no bfloat16)."""
  from safetensors import safe_open
  tensors = {}
  with jax.default_device(jax.devices("cpu")[0]):
    for path in files:
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name))
  return tensors


def normalize_names(tensors: dict, model_type: str) -> dict:
  """Old GPT-2 checkpoints (the original `gpt2` on the Hub) lack the `transformer.` prefix."""
  if model_type == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
    return {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in tensors.items()}
  return tensors


def drop_tied_head(tensors: dict, rules: Sequence[Rule]) -> dict:
  """Some tied checkpoints also store lm_head.weight: accept it only if it is the embedding."""
  if "lm_head.weight" not in tensors or any(r.hf == "lm_head.weight" for r in rules):
    return tensors
  embed = tensors[next(r.hf for r in rules if r.lmjax == "embed/embedding")]
  if not np.array_equal(tensors["lm_head.weight"], embed):
    raise ConversionError("config.json says tie_word_embeddings=true, but lm_head.weight differs "
                          "from the input embedding. Set tie_word_embeddings to false.")
  return {k: v for k, v in tensors.items() if k != "lm_head.weight"}
