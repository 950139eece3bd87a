"""The mapping between Hugging Face tensors and lmjax params: GPT-2 and Llama / Mistral causal LMs.

One rule per (lmjax param, HF tensor) pair, used in both directions, every name and shape checked.
convert.py reads and writes the files around it.

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

import math
from typing import NamedTuple, Sequence

import numpy as np

from lmjax.errors import ConversionError


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


def to_hf(rule: Rule, param: np.ndarray) -> np.ndarray:
  """This rule's part of the HF tensor (`export` concatenates the parts of fused tensors)."""
  dims = _hf_dims(rule, param.shape)
  flat = param.reshape(dims[::-1] if rule.transpose else dims)
  return flat.T if rule.transpose else flat


# Buffers some checkpoints carry that are not weights: GPT-2's causal mask, Llama's RoPE table.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def check_tensors(tensors, rules: Sequence[Rule], shapes: dict) -> None:
  """Every tensor the rules need is there with the shape the model needs, and nothing else is:
  from the files' headers alone, before any tensor is read. `shapes` maps each unscanned lmjax
  path to its (shape, dtype) in the model the config builds."""
  for rule in rules:
    if rule.hf not in tensors:
      raise ConversionError(f"The checkpoint has no tensor '{rule.hf}', which the model in its "
                            f"config.json needs (for lmjax '{rule.lmjax}').")
    shape = shapes[rule.lmjax][0]
    want, got = hf_shape(rule, shape), tensors.shape(rule.hf)
    if got != want:
      raise ConversionError(
          f"Tensor '{rule.hf}' has shape {list(got)}, but the model described by config.json "
          f"needs {list(want)} (lmjax '{rule.lmjax}' {list(shape)}): config.json and the weights "
          "disagree. Fix config.json or use the matching weights.")
  used = {rule.hf for rule in rules}
  unexpected = sorted(k for k in tensors.keys()
                      if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ConversionError(
        f"The checkpoint has {len(unexpected)} tensor(s) this architecture does not use: "
        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}. lmjax converts "
        "plain causal LMs (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM) only.")
  unmapped = sorted(set(shapes) - {rule.lmjax for rule in rules})
  if unmapped:  # a model.py param the rules do not know: this file needs updating
    raise ConversionError(f"No HF tensor maps to lmjax param(s) {', '.join(unmapped)}.")


def _group_range(axes: Sequence[slice], dims: Sequence[int]) -> tuple[int, int, bool]:
  """The flat (row-major) range of a block of a group of axes: (start, stop, exact). Exact when
  only the first axis is cut; otherwise the whole group's range (to be cut after reading)."""
  rest = math.prod(dims[1:])
  if all(a == slice(0, d) for a, d in zip(axes[1:], dims[1:])):
    return axes[0].start * rest, axes[0].stop * rest, True
  return 0, math.prod(dims), False


def read_param(rule: Rule, tensors, shape: tuple, index: tuple) -> np.ndarray:
  """The block `index` of lmjax param `rule.lmjax` (of `shape`), reading only the rows and columns
  of the HF tensor that hold it (all of a group of axes that is cut other than on its first)."""
  index = tuple(slice(*i.indices(d)[:2])
                for i, d in zip(index + (slice(None),) * (len(shape) - len(index)), shape))
  split = rule.n_in if rule.n_in else len(shape)
  groups = [(index[:split], shape[:split])] + ([(index[split:], shape[split:])] if rule.n_in else [])
  ranges = [_group_range(a, d) for a, d in groups]
  width = math.prod(shape[split:]) if rule.n_in else math.prod(shape)  # one part's last axis
  last = ranges[-1]
  hf_index = [slice(r[0], r[1]) for r in ranges[:-1]] + [
      slice(last[0] + rule.part * width, last[1] + rule.part * width)]
  block = tensors.read(rule.hf, tuple(hf_index[::-1]) if rule.transpose else tuple(hf_index))
  if rule.transpose:
    block = block.T
  read_shape, cut = [], []
  for (axes, dims), (_, _, exact) in zip(groups, ranges):
    if exact:
      read_shape += [axes[0].stop - axes[0].start, *dims[1:]]
      cut += [slice(None)] * len(dims)
    else:
      read_shape += list(dims)
      cut += list(axes)
  return block.reshape(read_shape)[tuple(cut)]
