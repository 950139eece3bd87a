"""Text from a run: `lmjax generate`'s continuations of prompts, and the sample `lmjax train` prints.

Decoding itself (KV cache, one jitted loop) is decode.py's; this module finds the run's params
and tokenizer.
"""
from __future__ import annotations

from lmjax import builder
from lmjax import data as data_lib
from lmjax import decode
from lmjax import workdir as workdir_lib
from lmjax.data import chat as chat_lib
from lmjax.errors import ConfigError


def generate_text(workdir: str, prompts: list[str], *, step: int | None = None, overrides=(),
                  chat: bool = False, **kwargs) -> list[str]:
  """Continuations of `prompts` from the run in `workdir` (latest checkpoint, or `step`);
  `kwargs` are decode.generate's (max_new_tokens, temperature, top_k, top_p, seed). With `chat`,
  each prompt is a user message and the reply is the assistant's, written by the tokenizer's
  chat template (data/chat.py; lmjax's plain format without one)."""
  cfg = workdir_lib.load_config(workdir, overrides)
  if not cfg.model.causal:
    raise ConfigError(f"The run in '{workdir}' is a bidirectional encoder (model.causal=False, "
                      f"train.objective={cfg.train.objective}): it fills in masked tokens and "
                      "cannot continue text. Generation (KV-cache decoding) needs a causal LM; "
                      "fine-tune the encoder (`lmjax finetune`) or evaluate it (`lmjax eval`).")
  if cfg.data.source == "synthetic":
    raise ConfigError(f"The run in '{workdir}' trained on synthetic tokens and has no tokenizer to "
                      "turn text into tokens. Train on text (e.g. data.source=pystdlib) to sample.")
  tokenizer = data_lib.load_tokenizer(workdir_lib.tokenizer_path(cfg, workdir))
  _, run, params, _ = builder.load_params(workdir, step, overrides)
  if chat:
    texts = [chat_lib.prompt(tokenizer, p) for p in prompts]
    return decode.generate_from_ids(run.model, params, tokenizer,
                                    [tokenizer.encode([t])[0] for t in texts], **kwargs)
  return decode.generate_from_text(run.model, params, tokenizer, prompts, **kwargs)


def sample_continuation(run, workdir: str, params, max_new_tokens: int = 96) -> dict:
  """A sampled continuation of train.sample_prompt: what the model learned, at a glance."""
  cfg = run.cfg
  tokenizer = data_lib.load_tokenizer(data_lib.resolve_tokenizer(cfg, workdir))
  prompt = cfg.train.sample_prompt
  room = cfg.model.max_len - len(tokenizer.encode(prompt)) if cfg.model.style == "gpt2" else 10**9
  (text,) = decode.generate_from_text(run.model, params, tokenizer, [prompt],
                                      max_new_tokens=max(min(max_new_tokens, room), 0),
                                      temperature=0.8, top_p=0.95, seed=cfg.train.seed)
  return {"prompt": prompt, "text": prompt + text}
