"""Hugging Face checkpoints <-> lmjax runs.

`import_hf` reads `config.json` and the safetensors headers, builds the matching lmjax config,
checks every tensor's name and shape against the model the config builds, then places each
device's block of each param straight from the file (`LazyParam`: only that block is read) and
writes an lmjax run: `config.json` and an Orbax checkpoint at step 0 with a fresh optimizer state,
which `lmjax eval`, `generate`, `finetune` and `train` (continued pretraining) read.
`export_hf` writes a run back as `config.json` + float32 safetensors (sharded with an index past
`max_shard_bytes`), gathering one tensor at a time, that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.
Neither needs torch or transformers; the tests use them to check logits against the HF models.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from etils import epath
import jax
import numpy as np

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import lock
from lmjax import workdir as workdir_lib
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import ConversionError
from lmjax.hf import configs, files, mapping
from lmjax.losses import objective
from lmjax.trees import (flatten, to_host, unflatten, unscanned_shapes)


def import_hf(hf_dir: str, workdir: str, *, config_overrides: Sequence[str] = ()):
  """HF model directory -> lmjax run in `workdir` (config.json, checkpoint at step 0); returns
  the resolved config. Nothing is written before every tensor has been checked."""
  with lock.hold(workdir, "pretraining", "lmjax convert --from_hf"):
    return _import_hf(hf_dir, workdir, config_overrides)


def _import_hf(hf_dir: str, workdir: str, config_overrides: Sequence[str]):
  hf = files.read_hf_config(hf_dir)
  tensor_files = files.tensor_files(hf_dir)
  # tokenizer.json (Hugging Face tokenizers: GPT-2, Llama 3, Qwen), else tokenizer.model
  # (SentencePiece: Llama 2, Mistral)
  source = workdir_lib.tokenizer_model_file(hf_dir)
  has_tokenizer = os.path.isfile(source)
  # the prepared-data dir of the run: its tokenizer, as a run trained on text keeps it
  tokenizer_path = workdir_lib.absolute(os.path.join(workdir, workdir_lib.DATA,
                                                     os.path.basename(source)))
  cfg = configs.lmjax_config(hf, config_overrides, tokenizer_path if has_tokenizer else "")
  workdir_lib.require_new(workdir)
  if has_tokenizer:
    tokenizer_lib.check_vocab(cfg, tokenizer_lib.load_tokenizer(source))

  run = builder.build(cfg, objective("causal_lm"))
  c = cfg.model
  rules = mapping.rules_for(c)
  shapes = unscanned_shapes(run.abstract_state.params, c.num_layers)
  tensors = files.Tensors(tensor_files, files.gpt2_names(hf["model_type"]))
  mapping.check_tensors(tensors, rules, shapes)  # from the headers, before reading any tensor
  files.check_tied_head(tensors, rules)
  by_path = {rule.lmjax: rule for rule in rules}
  flat = {path: LazyParam(x.shape, x.dtype, by_path, tensors, path)
          for path, x in flatten(run.abstract_state.params).items()}
  params = builder.place(unflatten(flat), run.abstract_state.params)
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 cfg.train.keep_checkpoints) as checkpoints:
    checkpoints.save_params(0, params)  # params only: training makes its optimizer state
  if jax.process_index() == 0:  # config.json last: its presence means the import completed
    if has_tokenizer:
      _copy_tokenizer(source, os.path.dirname(tokenizer_path))
    workdir_lib.write_config(cfg, workdir)
  return cfg


class LazyParam:
  """An lmjax param read from the HF tensors block by block: `make_array_from_callback` asks for
  the block each of this process's devices holds, and only that block is read and converted (a
  scanned param's layers one at a time)."""

  def __init__(self, shape, dtype, by_path: dict, tensors, path: str):
    self.shape, self.dtype, self.path = tuple(shape), dtype, path
    self._by_path, self._tensors = by_path, tensors

  def __getitem__(self, index: tuple) -> np.ndarray:
    if not self.path.startswith("layers/"):
      rule = self._by_path[self.path]
      return mapping.read_param(rule, self._tensors, self.shape, index).astype(self.dtype)
    index = index + (slice(None),) * (len(self.shape) - len(index))
    rest = self.path[len("layers/"):]
    return np.stack([mapping.read_param(self._by_path[f"layer_{i}/{rest}"], self._tensors,
                                        self.shape[1:], index[1:]).astype(self.dtype)
                     for i in range(*index[0].indices(self.shape[0]))])


def _copy_tokenizer(path: str, out_dir: str) -> list[str]:
  """Copies a tokenizer's files (SentencePiece: the .model; HF: tokenizer.json and, present
  beside it, tokenizer_config.json and chat_template.jinja) into `out_dir`; returns the copies."""
  files = (tokenizer_lib.hf_tokenizer_files(path) if tokenizer_lib.is_hf_tokenizer(path)
           else [path])
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  copies = []
  for f in files:
    copies.append(os.path.join(out_dir, os.path.basename(f)))
    epath.Path(f).copy(copies[-1], overwrite=True)
  return copies


def _special_ids(tokenizer: str | None) -> dict:
  """bos/eos/pad ids for config.json, from the tokenizer (-1 = it has none)."""
  if tokenizer is None:
    return {}
  t = tokenizer_lib.load_tokenizer(tokenizer)
  ids = {"bos_token_id": t.bos_id, "eos_token_id": t.eos_id, "pad_token_id": t.pad_id}
  return {k: v for k, v in ids.items() if v >= 0}


def _check_exportable(cfg, workdir: str) -> None:
  if not cfg.model.causal:
    raise ConversionError(f"The run in '{workdir}' is a bidirectional encoder (model.causal="
                          "False); export writes causal GPT-2 / Llama checkpoints only.")
  if cfg.model.quantize != "none":
    raise ConversionError(f"The run in '{workdir}' is quantized (model.quantize="
                          f"{cfg.model.quantize}); export writes float checkpoints: export the run "
                          "it was quantized from.")
  if cfg.model.parametrization == "mup":  # transformers has no muP multipliers
    raise ConversionError(f"The run in '{workdir}' uses muP (model.parametrization=mup): its logit "
                          "multiplier and 1/head_dim attention scale have no place in a GPT-2 / "
                          "Llama checkpoint, which would compute other logits.")


MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size of save_pretrained


def _hf_tensor(rules, flat) -> np.ndarray:
  """One HF tensor from the lmjax params of its parts, each gathered alone (a scanned param's
  one layer at a time)."""
  pieces = []
  for rule in rules:
    path = rule.lmjax
    if path.startswith("layer_") and path not in flat:  # scanned: layers/x[i]
      layer, rest = path[len("layer_"):].split("/", 1)
      x = to_host(flat["layers/" + rest][int(layer)])
    else:
      x = to_host(flat[path])
    pieces.append(mapping.to_hf(rule, x))
  return np.ascontiguousarray(np.concatenate(pieces, -1).astype(np.float32))


def _shard_plan(sizes: dict, max_bytes: int) -> list[list[str]]:
  """HF tensor names grouped into files of at most `max_bytes` (a bigger tensor gets its own)."""
  shards, used = [[]], 0
  for name in sizes:
    if shards[-1] and used + sizes[name] > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += sizes[name]
  return shards


def _write_weights(out_dir: str, flat: dict, rules, shapes: dict, max_bytes: int) -> str:
  """float32 safetensors, one HF tensor gathered at a time and one file of at most `max_bytes`
  held at a time: model.safetensors, or model-0000k-of-0000n.safetensors and their index.json.
  Every process gathers (a collective); process 0 writes. Returns the weights' path."""
  from safetensors.numpy import save_file
  by_name: dict[str, list] = {}
  for rule in sorted(rules, key=lambda r: r.part):  # a fused tensor's parts in order
    by_name.setdefault(rule.hf, []).append(rule)
  unmapped = sorted(set(shapes) - {rule.lmjax for rule in rules})
  if unmapped:
    raise ConversionError(f"lmjax param(s) {', '.join(unmapped)} have no HF equivalent.")
  sizes = {name: 4 * int(np.prod(mapping.hf_shape(rs[0], shapes[rs[0].lmjax][0])))
           for name, rs in by_name.items()}
  shards = _shard_plan(sizes, max_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  for file_name, members in zip(names, shards):
    tensors = {n: _hf_tensor(by_name[n], flat) for n in members}
    if jax.process_index() == 0:
      save_file(tensors, os.path.join(out_dir, file_name), metadata={"format": "pt"})
    del tensors
  if len(shards) == 1:
    return os.path.join(out_dir, names[0])
  index = os.path.join(out_dir, "model.safetensors.index.json")
  if jax.process_index() == 0:
    with open(index, "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: file_name for file_name, members in zip(names, shards)
                                for n in members}}, f, indent=2, sort_keys=True)
  return index


def export_hf(workdir: str, out_dir: str, step: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
  """lmjax run (latest checkpoint, or `step`) -> HF directory with config.json, float32
  safetensors (one file, or shards of at most `max_shard_bytes` with their index) and the run's
  tokenizer (tokenizer.model, or tokenizer.json and its config). The tensors are gathered and converted one at a time, so a host holds one
  shard file's worth of them, not the model. Returns {what: path} of the files written, and
  "step"."""
  _check_exportable(workdir_lib.load_config(workdir), workdir)  # before restoring anything
  cfg, run, params, step = builder.load_params(workdir, step)
  tokenizer = workdir_lib.tokenizer_path(cfg, workdir)
  tokenizer = tokenizer if os.path.isfile(tokenizer) else None
  config = configs.hf_config(cfg, _special_ids(tokenizer))
  written = {}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
  shapes = unscanned_shapes(run.abstract_state.params, cfg.model.num_layers)
  written["weights"] = _write_weights(out_dir, flatten(params), mapping.rules_for(cfg.model),
                                      shapes, max_shard_bytes)
  if jax.process_index() == 0:
    written["config"] = os.path.join(out_dir, "config.json")
    with open(written["config"], "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer:
      for copy in _copy_tokenizer(tokenizer, out_dir):
        written[os.path.basename(copy)] = copy
  written["step"] = step
  return written
