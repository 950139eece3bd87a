"""Conversations as text: a tokenizer's chat template (Jinja, as transformers renders it), or
lmjax's plain format where the tokenizer has none.

  template   tokenizer_config.json's "chat_template" (or chat_template.jinja beside
             tokenizer.json), rendered with `messages`, `add_generation_prompt`, `bos_token`,
             `eos_token` in a sandbox, as `transformers`' apply_chat_template does
  plain      "ROLE: CONTENT\\n" a message, assistant turns "assistant: " CONTENT eos

`pieces` splits a conversation into (text, is_response) for SFT: with a template, each assistant
turn is what rendering it adds after the conversation so far with the generation prompt (its
end-of-turn marker included); `prompt` is what generation continues.
"""
from __future__ import annotations

import functools
import json

from lmjax.errors import DataError


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
  try:
    import jinja2
    from jinja2 import sandbox
  except ImportError:
    raise DataError("The tokenizer's chat template needs jinja2: pip install jinja2") from None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    import datetime
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise DataError(f"The tokenizer's chat template is not valid Jinja ({e}). Fix "
                    "chat_template in tokenizer_config.json.") from None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
  """The conversation as the tokenizer's chat template writes it."""
  import jinja2
  specials = {f"{k}_token": tokenizer.id_to_token(getattr(tokenizer, f"{k}_id"))
              for k in ("bos", "eos", "pad")}
  try:
    return _compiled(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **specials)
  except jinja2.exceptions.TemplateError as e:
    raise DataError(f"The tokenizer's chat template refused the conversation: {e}") from None


def check_messages(messages, where: str) -> None:
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", "
                    "\"content\"}} objects.")
  for m in messages:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and
            isinstance(m.get("content"), str)):
      raise DataError(f"{where}: every message needs \"role\" and \"content\" strings; got "
                      f"{json.dumps(m)[:80]}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: the conversation has no assistant message to learn.")


def pieces(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
  """A conversation as (text, is_response) pieces; plain-format responses are followed by eos
  (added by the caller), template responses end with the template's own end of turn."""
  check_messages(messages, where)
  if not tokenizer.chat_template:
    out = []
    for m in messages:
      if m["role"] == "assistant":
        out += [("assistant: ", False), (m["content"], True)]
      else:
        out.append((f"{m['role']}: {m['content']}\n", False))
    return out
  out, done = [], ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = render(tokenizer, messages[:i], add_generation_prompt=True)
    after = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
    if not (before.startswith(done) and after.startswith(before)):
      raise DataError(f"{where}: the chat template rewrites earlier turns as the conversation "
                      "grows (e.g. it drops reasoning from past assistant turns), so the "
                      "assistant tokens to learn cannot be told apart. Train on one assistant "
                      "turn per example, or use a template without that rule.")
    out += [(before[len(done):], False), (after[len(before):], True)]
    done = after
  rest = render(tokenizer, messages, add_generation_prompt=False)[len(done):]
  return [(text, response) for text, response in out + [(rest, False)] if text]


def prompt(tokenizer, user_text: str) -> str:
  """A one-message chat ready for the assistant's reply."""
  if not tokenizer.chat_template:
    return f"user: {user_text}\nassistant: "
  return render(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)
