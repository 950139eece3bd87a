"""Hugging Face config.json <-> lmjax config: GPT-2, Llama and Mistral (written by hand: no
transformers import)."""
from __future__ import annotations

from typing import Sequence

from lmjax import config as config_lib
from lmjax.errors import ConversionError


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
  kinds = {rope.get("rope_type") or "default",
           scaling.get("rope_type") or scaling.get("type") or "default"}
  if kinds != {"default"}:  # llama3 / linear / yarn ... scale frequencies: other logits (either
    # key counts: transformers reads rope_scaling even beside a default rope_parameters)
    kind = sorted(kinds - {"default"})[0]
    raise ConversionError(f"RoPE scaling '{kind}' is not supported (config.json's rope_parameters"
                          f"/rope_scaling): lmjax implements plain RoPE.")
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
