"""Hugging Face checkpoints <-> lmjax runs.

`import_hf` reads `config.json` and the safetensors weights, builds the matching lmjax config, maps
every tensor onto the lmjax param tree (each shape checked against the model the config builds)
and writes an lmjax run: `config.json` and an Orbax checkpoint at step 0 with a fresh optimizer
state, which `lmjax eval`, `generate`, `finetune` and `train` (continued pretraining) read.
`export_hf` writes a run back as `config.json` + float32 `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.
Neither needs torch or transformers; the tests use them to check logits against the HF models.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import workdir as workdir_lib
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import ConversionError
from lmjax.hf import configs, files, mapping
from lmjax.losses import objective
from lmjax.trees import (flatten, stack_layers, to_host, unflatten, unscanned_shapes,
                         unstack_layers)


def import_hf(hf_dir: str, workdir: str, *, config_overrides: Sequence[str] = ()):
  """HF model directory -> lmjax run in `workdir` (config.json, checkpoint at step 0); returns
  the resolved config. Nothing is written before every tensor has been checked."""
  hf = files.read_hf_config(hf_dir)
  tensor_files = files.tensor_files(hf_dir)
  sp_model = os.path.join(hf_dir, workdir_lib.TOKENIZER)  # SentencePiece (Llama, Mistral)
  has_tokenizer = os.path.isfile(sp_model)
  # the prepared-data dir of the run: its tokenizer, as a run trained on text keeps it
  tokenizer_path = workdir_lib.absolute(os.path.join(workdir, workdir_lib.DATA,
                                                     workdir_lib.TOKENIZER))
  cfg = configs.lmjax_config(hf, config_overrides, tokenizer_path if has_tokenizer else "")
  workdir_lib.require_new(workdir)
  if has_tokenizer:
    tokenizer_lib.check_vocab(cfg, tokenizer_lib.load_tokenizer(sp_model))

  run = builder.build(cfg, objective("causal_lm"))
  c = cfg.model
  rules = mapping.rules_for(c)
  shapes = unscanned_shapes(run.abstract_state.params, c.num_layers)
  tensors = files.read_tensors(tensor_files)
  tensors = files.drop_tied_head(files.normalize_names(tensors, hf["model_type"]), rules)
  flat = mapping.hf_to_params(tensors, rules, shapes)
  del tensors
  if c.scan_layers:
    flat = stack_layers(flat, c.num_layers)
  run = builder.build(cfg, run.objective, builder.FromParams(unflatten(flat)))
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 cfg.train.keep_checkpoints) as checkpoints:
    checkpoints.save(0, run.init(), None, force=True)
  if jax.process_index() == 0:  # config.json last: its presence means the import completed
    if has_tokenizer:
      os.makedirs(os.path.dirname(tokenizer_path), exist_ok=True)
      shutil.copyfile(sp_model, tokenizer_path)
    workdir_lib.write_config(cfg, workdir)
  return cfg


def _special_ids(tokenizer: str | None) -> dict:
  """bos/eos/pad ids for config.json, from the SentencePiece model (-1 = it has none)."""
  if tokenizer is None:
    return {}
  sp = tokenizer_lib.load_tokenizer(tokenizer)
  ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
  return {k: v for k, v in ids.items() if v >= 0}


def _check_exportable(cfg, workdir: str) -> None:
  if not cfg.model.causal:
    raise ConversionError(f"The run in '{workdir}' is a bidirectional encoder (model.causal="
                          "False); export writes causal GPT-2 / Llama checkpoints only.")
  if cfg.model.parametrization == "mup":  # transformers has no muP multipliers
    raise ConversionError(f"The run in '{workdir}' uses muP (model.parametrization=mup): its logit "
                          "multiplier and 1/head_dim attention scale have no place in a GPT-2 / "
                          "Llama checkpoint, which would compute other logits.")


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> dict:
  """lmjax run (latest checkpoint, or `step`) -> HF directory with config.json, float32
  model.safetensors and the run's tokenizer.model. Returns {what: path} of the files written,
  and "step"."""
  from safetensors.numpy import save_file
  _check_exportable(workdir_lib.load_config(workdir), workdir)  # before restoring anything
  cfg, _, params, step = builder.load_params(workdir, step)
  tokenizer = workdir_lib.tokenizer_path(cfg, workdir)
  tokenizer = tokenizer if os.path.isfile(tokenizer) else None
  config = configs.hf_config(cfg, _special_ids(tokenizer))
  flat = unstack_layers(flatten(jax.tree_util.tree_map(to_host, params)), cfg.model.num_layers)
  tensors = mapping.params_to_hf(flat, mapping.rules_for(cfg.model))
  written = {}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    written["config"] = os.path.join(out_dir, "config.json")
    with open(written["config"], "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    written["weights"] = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, written["weights"], metadata={"format": "pt"})
    if tokenizer:
      written["tokenizer"] = os.path.join(out_dir, workdir_lib.TOKENIZER)
      shutil.copyfile(tokenizer, written["tokenizer"])
  written["step"] = step
  return written
