"""Hugging Face checkpoints <-> lmjax runs: GPT-2 and Llama / Mistral causal LMs in safetensors.

`import_hf` reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`;
never pickles, which can run code), builds the matching lmjax config, maps every tensor onto the
lmjax param tree (each shape checked against the model the config builds) and writes an lmjax run:
`config.json` and an Orbax checkpoint at step 0 with a fresh optimizer state, which `lmjax eval`,
`generate` and `train` (continued pretraining: train resumes from the latest checkpoint) read.
`export_hf` writes a run back as `config.json` + float32 `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.
Neither needs torch or transformers; the tests use them to check logits against the HF models.

Name mapping (layer i; HF tensors under `transformer.h.{i}.` for GPT-2, `model.layers.{i}.` for
Llama; lmjax params under `layer_{i}/`, or stacked on a leading axis under `layers/` when scanned):

  lmjax                   GPT-2 (Conv1D: [in, out])          Llama / Mistral (Linear: [out, in])
  embed/embedding [V,D]   transformer.wte.weight             model.embed_tokens.weight
  pos_embed [T,D]         transformer.wpe.weight             -
  attn_norm/{scale,bias}  ln_1.{weight,bias}                 input_layernorm.weight
  attn/query/kernel       attn.c_attn.weight [:, 0:NH]       self_attn.q_proj.weight.T
  attn/key/kernel         attn.c_attn.weight [:, NH:2NH]     self_attn.k_proj.weight.T
  attn/value/kernel       attn.c_attn.weight [:, 2NH:3NH]    self_attn.v_proj.weight.T
  attn/{query,key,value}/bias  attn.c_attn.bias (thirds)     -
  attn/out/{kernel,bias}  attn.c_proj.{weight,bias}          self_attn.o_proj.weight.T
  mlp_norm/{scale,bias}   ln_2.{weight,bias}                 post_attention_layernorm.weight
  mlp/gate/kernel         -                                  mlp.gate_proj.weight.T
  mlp/up/{kernel,bias}    mlp.c_fc.{weight,bias}             mlp.up_proj.weight.T
  mlp/down/{kernel,bias}  mlp.c_proj.{weight,bias}           mlp.down_proj.weight.T
  final_norm/{scale,bias} transformer.ln_f.{weight,bias}     model.norm.weight
  head/kernel [D,V]       lm_head.weight.T (untied only)     lm_head.weight.T (untied only)

lmjax splits the head axes of attention kernels ([D, N, H] in, [N, H, D] out) where HF keeps one
N*H axis, in head-major order on both sides: after the transpose a reshape is all it takes. lmjax's
RoPE is the rotate-half convention of HF Llama checkpoints, so q/k need no permutation.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import NamedTuple, Sequence

import jax
import numpy as np
from etils import epath

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import train as train_lib
from lmjax.data import tokenizer as tokenizer_lib


class ConversionError(ValueError):
  """A checkpoint lmjax cannot convert (or a run it cannot export); the message says why."""


# ---------------------------------------------------------------------------------------------
# The mapping: one rule per (lmjax param, HF tensor) pair, used in both directions.


class Rule(NamedTuple):
  lmjax: str  # path in the (unscanned) lmjax param tree, e.g. "layer_0/attn/query/kernel"
  hf: str  # tensor name in the HF checkpoint
  n_in: int  # leading lmjax axes that form HF's first axis ([N, H, D] -> [N*H, D]: 2); 0 = vector
  transpose: bool = False  # torch Linear stores [out, in]
  part: int = 0  # GPT-2's fused c_attn holds q, k, v as thirds of its last axis
  parts: int = 1


def _gpt2_rules(num_layers: int, tied: bool) -> list[Rule]:
  rules = [Rule("embed/embedding", "transformer.wte.weight", 1),
           Rule("pos_embed", "transformer.wpe.weight", 1),
           Rule("final_norm/scale", "transformer.ln_f.weight", 0),
           Rule("final_norm/bias", "transformer.ln_f.bias", 0)]
  for i in range(num_layers):
    l, h = f"layer_{i}/", f"transformer.h.{i}."
    rules += [Rule(l + "attn_norm/scale", h + "ln_1.weight", 0),
              Rule(l + "attn_norm/bias", h + "ln_1.bias", 0)]
    for j, name in enumerate(("query", "key", "value")):
      rules += [Rule(l + f"attn/{name}/kernel", h + "attn.c_attn.weight", 1, part=j, parts=3),
                Rule(l + f"attn/{name}/bias", h + "attn.c_attn.bias", 0, part=j, parts=3)]
    rules += [Rule(l + "attn/out/kernel", h + "attn.c_proj.weight", 2),
              Rule(l + "attn/out/bias", h + "attn.c_proj.bias", 0),
              Rule(l + "mlp_norm/scale", h + "ln_2.weight", 0),
              Rule(l + "mlp_norm/bias", h + "ln_2.bias", 0),
              Rule(l + "mlp/up/kernel", h + "mlp.c_fc.weight", 1),
              Rule(l + "mlp/up/bias", h + "mlp.c_fc.bias", 0),
              Rule(l + "mlp/down/kernel", h + "mlp.c_proj.weight", 1),
              Rule(l + "mlp/down/bias", h + "mlp.c_proj.bias", 0)]
  if not tied:
    rules.append(Rule("head/kernel", "lm_head.weight", 1, transpose=True))
  return rules


def _llama_rules(num_layers: int, tied: bool) -> list[Rule]:
  rules = [Rule("embed/embedding", "model.embed_tokens.weight", 1),
           Rule("final_norm/scale", "model.norm.weight", 0)]
  for i in range(num_layers):
    l, h = f"layer_{i}/", f"model.layers.{i}."
    rules += [Rule(l + "attn_norm/scale", h + "input_layernorm.weight", 0),
              Rule(l + "attn/query/kernel", h + "self_attn.q_proj.weight", 1, transpose=True),
              Rule(l + "attn/key/kernel", h + "self_attn.k_proj.weight", 1, transpose=True),
              Rule(l + "attn/value/kernel", h + "self_attn.v_proj.weight", 1, transpose=True),
              Rule(l + "attn/out/kernel", h + "self_attn.o_proj.weight", 2, transpose=True),
              Rule(l + "mlp_norm/scale", h + "post_attention_layernorm.weight", 0),
              Rule(l + "mlp/gate/kernel", h + "mlp.gate_proj.weight", 1, transpose=True),
              Rule(l + "mlp/up/kernel", h + "mlp.up_proj.weight", 1, transpose=True),
              Rule(l + "mlp/down/kernel", h + "mlp.down_proj.weight", 1, transpose=True)]
  if not tied:
    rules.append(Rule("head/kernel", "lm_head.weight", 1, transpose=True))
  return rules


def rules_for(model_cfg) -> list[Rule]:
  make = _llama_rules if model_cfg.style == "llama" else _gpt2_rules
  return make(model_cfg.num_layers, model_cfg.tie_embeddings)


def _hf_dims(rule: Rule, shape: tuple) -> tuple:
  """The 1-D or 2-D shape of this rule's part of the HF tensor, for an lmjax param of `shape`."""
  if rule.n_in == 0:
    return (math.prod(shape),)
  dims = (math.prod(shape[:rule.n_in]), math.prod(shape[rule.n_in:]))
  return dims[::-1] if rule.transpose else dims


def hf_shape(rule: Rule, shape: tuple) -> tuple:
  """The whole HF tensor's shape (a fused tensor holds `parts` parts along its last axis)."""
  dims = _hf_dims(rule, shape)
  return dims[:-1] + (dims[-1] * rule.parts,)


def to_lmjax(rule: Rule, tensor: np.ndarray, shape: tuple) -> np.ndarray:
  part = np.split(tensor, rule.parts, axis=-1)[rule.part] if rule.parts > 1 else tensor
  return (part.T if rule.transpose else part).reshape(shape)


def to_hf(rule: Rule, param: np.ndarray) -> np.ndarray:
  """This rule's part of the HF tensor (`export` concatenates the parts of fused tensors)."""
  dims = _hf_dims(rule, param.shape)
  flat = param.reshape(dims[::-1] if rule.transpose else dims)
  return flat.T if rule.transpose else flat


# Buffers some checkpoints carry that are not weights: GPT-2's causal mask, Llama's RoPE table.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def hf_to_params(tensors: dict, rules: Sequence[Rule], shapes: dict) -> dict:
  """HF tensors -> flat lmjax params {path: array}, every name and shape checked.

  `shapes` maps each unscanned lmjax path to its (shape, dtype) in the model the config builds.
  """
  params = {}
  for rule in rules:
    if rule.hf not in tensors:
      raise ConversionError(f"The checkpoint has no tensor '{rule.hf}', which the model in its "
                            f"config.json needs (for lmjax '{rule.lmjax}').")
    shape, dtype = shapes[rule.lmjax]
    want, got = hf_shape(rule, shape), tuple(tensors[rule.hf].shape)
    if got != want:
      raise ConversionError(
          f"Tensor '{rule.hf}' has shape {list(got)}, but the model described by config.json "
          f"needs {list(want)} (lmjax '{rule.lmjax}' {list(shape)}): config.json and the weights "
          "disagree. Fix config.json or use the matching weights.")
    params[rule.lmjax] = to_lmjax(rule, np.asarray(tensors[rule.hf]), shape).astype(dtype)
  used = {rule.hf for rule in rules}
  unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ConversionError(
        f"The checkpoint has {len(unexpected)} tensor(s) this architecture does not use: "
        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}. lmjax converts "
        "plain causal LMs (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM) only.")
  unmapped = sorted(set(shapes) - set(params))
  if unmapped:  # a model.py param the rules do not know: this file needs updating
    raise ConversionError(f"No HF tensor maps to lmjax param(s) {', '.join(unmapped)}.")
  return params


def params_to_hf(params: dict, rules: Sequence[Rule]) -> dict:
  """Flat unscanned lmjax params -> {HF name: float32 array}."""
  parts: dict[str, dict[int, np.ndarray]] = {}
  for rule in rules:
    parts.setdefault(rule.hf, {})[rule.part] = to_hf(rule, np.asarray(params[rule.lmjax]))
  unmapped = sorted(set(params) - {rule.lmjax for rule in rules})
  if unmapped:
    raise ConversionError(f"lmjax param(s) {', '.join(unmapped)} have no HF equivalent.")
  return {name: np.ascontiguousarray(np.concatenate([p[j] for j in sorted(p)], -1)
                                     .astype(np.float32))
          for name, p in parts.items()}


# ---------------------------------------------------------------------------------------------
# Param trees: lmjax nests params and (scan_layers) stacks the layers; the rules use flat paths.


def flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = value
  return out


def unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def unstack_layers(flat: dict, num_layers: int) -> dict:
  """`layers/x` with a leading layer axis -> `layer_{i}/x` (no-op for unscanned params)."""
  out = {}
  for path, value in flat.items():
    if path.startswith("layers/"):
      for i in range(num_layers):
        out[f"layer_{i}/" + path[len("layers/"):]] = value[i]
    else:
      out[path] = value
  return out


def stack_layers(flat: dict, num_layers: int) -> dict:
  out = {p: v for p, v in flat.items() if not p.startswith("layer_")}
  for path in (p for p in flat if p.startswith("layer_0/")):
    rest = path[len("layer_0/"):]
    out["layers/" + rest] = np.stack([flat[f"layer_{i}/{rest}"] for i in range(num_layers)])
  return out


def _unscanned_shapes(abstract_params, num_layers: int) -> dict:
  flat = flatten(abstract_params)
  shapes = {}
  for path, x in flat.items():
    if path.startswith("layers/"):  # scanned: the leading axis is the layer
      for i in range(num_layers):
        shapes[f"layer_{i}/" + path[len("layers/"):]] = (tuple(x.shape[1:]), x.dtype)
    else:
      shapes[path] = (tuple(x.shape), x.dtype)
  return shapes


# ---------------------------------------------------------------------------------------------
# Configs: HF config.json <-> lmjax config.


def _gpt2_model(hf: dict) -> dict:
  d, heads = hf["n_embd"], hf["n_head"]
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh GELU lmjax computes
    raise ConversionError(f"GPT-2 activation_function '{act}' is not supported: lmjax's GPT-2 "
                          "uses the tanh GELU ('gelu_new').")
  for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                  ("add_cross_attention", False)):
    if hf.get(key, ok) != ok:
      raise ConversionError(f"GPT-2 with {key}={hf[key]} is not supported (lmjax needs {ok}).")
  return {"style": "gpt2", "num_layers": hf["n_layer"], "d_model": d, "num_heads": heads,
          "num_kv_heads": heads, "head_dim": d // heads, "mlp_dim": hf.get("n_inner") or 4 * d,
          "vocab_size": hf["vocab_size"], "max_len": hf["n_positions"],
          "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
          "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5))}


def _rope_theta(hf: dict) -> float:
  """rope_theta from config.json, which transformers 5 nests in rope_parameters."""
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", "default") if "rope_type" in rope else (
      scaling.get("rope_type") or scaling.get("type") or "default")
  if kind != "default":  # llama3 / linear / yarn ... scale frequencies: other logits
    raise ConversionError(f"RoPE scaling '{kind}' is not supported: lmjax implements plain RoPE.")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError("partial_rotary_factor != 1 is not supported: lmjax rotates whole heads.")
  return float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _llama_model(hf: dict) -> dict:
  kind = hf["model_type"]
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{kind} hidden_act '{hf['hidden_act']}' is not supported (lmjax: silu).")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConversionError(f"{kind} with attention_bias or mlp_bias is not supported: lmjax's "
                          "llama style has no biases.")
  max_len = hf["max_position_embeddings"]
  window = hf.get("sliding_window")
  if window is not None and window < max_len:
    # lmjax attends over the whole context: past the window its logits would differ from HF's.
    raise ConversionError(
        f"{kind} sliding_window={window} is smaller than max_position_embeddings={max_len}, and "
        "lmjax has no sliding-window attention: for longer sequences its logits would not match. "
        "Only models with sliding_window null (e.g. Mistral v0.2 and later) can be imported.")
  heads = hf["num_attention_heads"]
  return {"style": "llama", "num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"],
          "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
          "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
          "mlp_dim": hf["intermediate_size"], "vocab_size": hf["vocab_size"], "max_len": max_len,
          "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
          "rope_theta": _rope_theta(hf), "norm_eps": float(hf.get("rms_norm_eps", 1e-6))}


MODEL_TYPES = {"gpt2": _gpt2_model, "llama": _llama_model, "mistral": _llama_model}


def model_from_hf(hf: dict) -> dict:
  """lmjax `model.*` values for an HF config.json."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ConversionError(f"model_type '{kind}' is not supported; lmjax converts "
                          f"{', '.join(MODEL_TYPES)}.")
  try:
    return MODEL_TYPES[kind](hf)
  except KeyError as e:
    raise ConversionError(f"The {kind} config.json has no '{e.args[0]}'.") from None


def lmjax_config(hf: dict, overrides: Sequence[str] = (), tokenizer: str = ""):
  """The lmjax config for an HF config.json, then `a.b=v` overrides (not of the model's shape)."""
  model = model_from_hf(hf)
  cfg = config_lib.default_config()
  cfg.model.update(model)
  cfg.data.seq_len = min(model["max_len"], 1024)
  if tokenizer:  # text to evaluate and prompt with; synthetic tokens otherwise
    cfg.data.tokenizer, cfg.data.source = tokenizer, "pystdlib"
  cfg = config_lib.apply_overrides(cfg, overrides)
  changed = [f"model.{k}={cfg.model[k]!r} (the checkpoint has {v!r})" for k, v in model.items()
             if cfg.model[k] != v]
  if changed:
    raise ConversionError(f"These overrides contradict the checkpoint: {', '.join(changed)}. "
                          "Drop them: the imported weights fix these values.")
  return config_lib.finalize(cfg)


def hf_config(cfg, special_ids: dict | None = None) -> dict:
  """A transformers config.json for an lmjax config, written by hand (no transformers import)."""
  m = cfg.model
  if m.style == "gpt2":
    if m.num_kv_heads != m.num_heads or m.head_dim * m.num_heads != m.d_model:
      raise ConversionError(
          f"HF GPT-2 needs num_kv_heads == num_heads and head_dim * num_heads == d_model; this run "
          f"has num_heads={m.num_heads}, num_kv_heads={m.num_kv_heads}, head_dim={m.head_dim}, "
          f"d_model={m.d_model}.")
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": m.num_layers,
           "n_embd": m.d_model, "n_head": m.num_heads, "n_inner": m.mlp_dim,
           "n_positions": m.max_len, "vocab_size": m.vocab_size,
           "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
           "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": 0.0,
           "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
           "reorder_and_upcast_attn": False}
  else:
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "num_hidden_layers": m.num_layers, "hidden_size": m.d_model,
           "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
           "head_dim": m.head_dim, "intermediate_size": m.mlp_dim, "vocab_size": m.vocab_size,
           "max_position_embeddings": m.max_len, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
           "rope_theta": m.rope_theta, "rope_scaling": None, "attention_bias": False,
           "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}
  out.update(tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
             torch_dtype="float32", use_cache=True, **(special_ids or {}))
  return out


# ---------------------------------------------------------------------------------------------
# Files.


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"'{hf_dir}' has no config.json: pass a Hugging Face model directory "
                          "(as written by save_pretrained).")
  with open(path) as f:
    return json.load(f)


def tensor_files(hf_dir: str) -> list[str]:
  """The safetensors files of a checkpoint: one file, or the shards its index names."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
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


def _normalize_names(tensors: dict, model_type: str) -> dict:
  """Old GPT-2 checkpoints (the original `gpt2` on the Hub) lack the `transformer.` prefix."""
  if model_type == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
    return {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in tensors.items()}
  return tensors


def _drop_tied_head(tensors: dict, rules: Sequence[Rule]) -> dict:
  """Some tied checkpoints also store lm_head.weight: accept it only if it is the embedding."""
  if "lm_head.weight" not in tensors or any(r.hf == "lm_head.weight" for r in rules):
    return tensors
  embed = tensors[next(r.hf for r in rules if r.lmjax == "embed/embedding")]
  if not np.array_equal(tensors["lm_head.weight"], embed):
    raise ConversionError("config.json says tie_word_embeddings=true, but lm_head.weight differs "
                          "from the input embedding. Set tie_word_embeddings to false.")
  return {k: v for k, v in tensors.items() if k != "lm_head.weight"}


def _check_new_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  ckpts = epath.Path(ckpt_lib.checkpoint_dir(workdir))
  if (path / "config.json").exists() or (ckpts.exists() and any(ckpts.iterdir())):
    raise ConversionError(f"'{workdir}' already holds an lmjax run; import into a new --workdir.")


def _place(params: dict, shardings) -> dict:
  """numpy params -> global arrays on the mesh (each process reads the slices it holds)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings)


def _state_with_params(setup, params):
  """A TrainState at step 0: `setup.init_fn`'s optimizer state and RNG around these params.

  Inside one jit the random params init_fn would draw are unused, so XLA drops them: no second
  copy of the model is ever materialized.
  """
  with setup.context():
    return jax.jit(lambda p: setup.init_fn().replace(params=p),
                   out_shardings=setup.state_shardings)(params)


def _to_numpy(x) -> np.ndarray:
  if not x.is_fully_addressable:  # multi-host: gather the shards every process holds
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------------------------
# The two directions.


def import_hf(hf_dir: str, workdir: str, *, config_overrides: Sequence[str] = ()):
  """HF model directory -> lmjax run in `workdir` (config.json, checkpoint at step 0); returns
  the resolved config. Nothing is written before every tensor has been checked."""
  hf = read_hf_config(hf_dir)
  files = tensor_files(hf_dir)
  sp_model = os.path.join(hf_dir, "tokenizer.model")  # SentencePiece (Llama, Mistral)
  has_tokenizer = os.path.isfile(sp_model)
  tokenizer_path = os.path.abspath(os.path.join(workdir, "data", "tokenizer.model"))
  cfg = lmjax_config(hf, config_overrides, tokenizer_path if has_tokenizer else "")
  _check_new_workdir(workdir)
  if has_tokenizer:
    tokenizer_lib.check_vocab(cfg, tokenizer_lib.load_tokenizer(sp_model))

  setup = train_lib.build(cfg)
  c = cfg.model
  rules = rules_for(c)
  shapes = _unscanned_shapes(setup.abstract_state.params, c.num_layers)
  tensors = _drop_tied_head(_normalize_names(read_tensors(files), hf["model_type"]), rules)
  flat = hf_to_params(tensors, rules, shapes)
  del tensors
  if c.scan_layers:
    flat = stack_layers(flat, c.num_layers)
  state = _state_with_params(setup, _place(unflatten(flat), setup.state_shardings.params))

  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.train.keep_checkpoints)
  try:
    checkpointer.save(0, state, None, force=True)
  finally:
    checkpointer.close()
  if jax.process_index() == 0:  # config.json last: its presence means the import completed
    if has_tokenizer:
      os.makedirs(os.path.dirname(tokenizer_path), exist_ok=True)
      shutil.copyfile(sp_model, tokenizer_path)
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(cfg))
  return cfg


def _run_tokenizer(cfg, workdir: str) -> str | None:
  path = cfg.data.tokenizer or os.path.join(tokenizer_lib.prepared_dir(cfg, workdir),
                                            "tokenizer.model")
  return path if os.path.isfile(path) else None


def _special_ids(tokenizer: str | None) -> dict:
  """bos/eos/pad ids for config.json, from the SentencePiece model (-1 = it has none)."""
  if tokenizer is None:
    return {}
  sp = tokenizer_lib.load_tokenizer(tokenizer)
  ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
  return {k: v for k, v in ids.items() if v >= 0}


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> dict:
  """lmjax run (latest checkpoint, or `step`) -> HF directory with config.json, float32
  model.safetensors and the run's tokenizer.model. Returns {what: path} of the files written."""
  from safetensors.numpy import save_file
  cfg = train_lib.load_config(workdir)
  if not cfg.model.causal:  # before restoring anything
    raise ConversionError(f"The run in '{workdir}' is a bidirectional encoder (model.causal="
                          "False); export writes causal GPT-2 / Llama checkpoints only.")
  if cfg.model.parametrization == "mup":  # transformers has no muP multipliers
    raise ConversionError(f"The run in '{workdir}' uses muP (model.parametrization=mup): its logit "
                          "multiplier and 1/head_dim attention scale have no place in a GPT-2 / "
                          "Llama checkpoint, which would compute other logits.")
  cfg, _, state = train_lib.load_run(workdir, step)
  tokenizer = _run_tokenizer(cfg, workdir)
  config = hf_config(cfg, _special_ids(tokenizer))
  flat = unstack_layers(flatten(jax.tree_util.tree_map(_to_numpy, state.params)),
                        cfg.model.num_layers)
  tensors = params_to_hf(flat, rules_for(cfg.model))
  written = {}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    written["config"] = os.path.join(out_dir, "config.json")
    with open(written["config"], "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    written["weights"] = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, written["weights"], metadata={"format": "pt"})
    if tokenizer:
      written["tokenizer"] = os.path.join(out_dir, "tokenizer.model")
      shutil.copyfile(tokenizer, written["tokenizer"])
  written["step"] = int(jax.device_get(state.step))
  return written


def main_convert(from_hf: str | None, to_hf: str | None, workdir: str, step: int | None,
                 overrides: Sequence[str] = ()) -> int:
  """`lmjax convert --from_hf=DIR --workdir=OUT` or `lmjax convert --to_hf=DIR --workdir=RUN
  [--step=N]`; `overrides` (`a.b=v`) apply to the imported run's config. Errors raise
  ConversionError / ConfigError (ValueErrors) for the CLI to print."""
  if (from_hf is None) == (to_hf is None):
    raise ConversionError("Pass exactly one of --from_hf=HF_DIR (import into --workdir) or "
                          "--to_hf=OUT_DIR (export --workdir).")
  if from_hf is not None:
    if step is not None:
      raise ConversionError("--step applies to --to_hf (which checkpoint to export) only.")
    cfg = import_hf(from_hf, workdir, config_overrides=overrides)
    m = cfg.model
    print(f"Imported {from_hf} ({m.style} style, {m.num_layers} layers, d_model {m.d_model}, "
          f"vocab {m.vocab_size}) into {workdir}:\n"
          f"  {os.path.join(workdir, 'config.json')}\n"
          f"  {ckpt_lib.checkpoint_dir(workdir)}/0 (step 0, fresh {cfg.optim.name} state)")
    if cfg.data.tokenizer:
      print(f"  {cfg.data.tokenizer} (data.tokenizer; data.source={cfg.data.source})")
    else:
      print("  No SentencePiece tokenizer.model in the HF directory: the run uses synthetic data. "
            "Set --config.data.tokenizer=PATH.model and --config.data.source=... to use text.")
    return 0
  if overrides:
    raise ConversionError("--config.* overrides apply to --from_hf only; export writes the run "
                          "as trained.")
  written = export_hf(workdir, to_hf, step)
  print(f"Exported step {written.pop('step')} of {workdir} to {to_hf}:")
  for path in written.values():
    print(f"  {path}")
  return 0
