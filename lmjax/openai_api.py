"""The OpenAI API's requests and responses, without the HTTP: parameters checked (BadRequest
says what is wrong), prompts to token ids, a choice's text cut at stop strings, log-probability
blocks and usage counts. server.py puts them behind FastAPI."""
from __future__ import annotations

import json

COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
                   "logprobs", "echo", "stream", "user", "stream_options"}
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "stop", "seed", "n", "stream", "user", "stream_options", "logprobs", "top_logprobs"}


class BadRequest(Exception):
  pass


def _number(body, key, default, low, high, kind=float):
  value = body.get(key, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and value != int(value)):
    raise BadRequest(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got "
                     f"{json.dumps(value)}.")
  if not low <= value <= high:
    raise BadRequest(f"'{key}' must be in [{low}, {high}], got {value}.")
  return kind(value)


def token_prompts(prompt, tokenizer) -> list[list[int]]:
  """The OpenAI `prompt` forms: a string, a list of strings, token ids, a list of token ids."""
  if isinstance(prompt, str):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a "
                     "list of such lists.")
  out = []
  for p in prompt:
    if isinstance(p, str):
      out.append(tokenizer.encode_prompt(p))
    elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size
                                           for t in p):
      out.append(list(p))
    else:
      raise BadRequest(f"every prompt must be a string or a non-empty list of token ids in "
                       f"[0, {tokenizer.vocab_size}).")
  return out


def _stops(body) -> list[str]:
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(
      stop) > 4:
    raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings.")
  return stop


def sampling(body, keys: set, max_len: int) -> dict:
  """The request's decoding settings, checked (BadRequest says what is wrong)."""
  unknown = sorted(set(body) - keys)
  if unknown:
    raise BadRequest(f"unknown parameter(s) {unknown}; this server takes {sorted(keys)}.")
  return {"max_tokens": _number(body, "max_tokens", body.get("max_completion_tokens", 16), 0,
                                max_len, int),
          "temperature": _number(body, "temperature", 1.0, 0, 2),
          "top_p": _number(body, "top_p", 1.0, 1e-6, 1), "n": _number(body, "n", 1, 1, 16, int),
          "seed": _number(body, "seed", 0, 0, 2**31 - 1, int), "stop": _stops(body)}


class Choice:
  """One row's text so far: tokens in, text out, cut at the first stop string.

  Decodes incrementally, as vLLM does: each token decodes only the ids since the text was last
  whole, after the ids shown just before them as context, and the new text is what the newest ids
  add to that context's text. The cost per token stays constant instead of growing with the
  completion; a token that ends in the middle of a character (byte-level BPE, SentencePiece byte
  fallback) waits for the rest."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.ids, self.sent, self.logprobs, self.finish = [], "", [], None
    self.text, self._prefix, self._read = "", 0, 0  # decoded text; window: ids[_prefix:]

  def add(self, token: int, logprob: float, top: dict) -> str:
    """Adds a token; returns the new text that is safe to send (held back while it could
    still grow into a stop string)."""
    self.ids.append(token)
    self.logprobs.append((token, logprob, top))
    if self.finish:
      return ""
    before = self.tokenizer.decode(self.ids[self._prefix:self._read])
    window = self.tokenizer.decode(self.ids[self._prefix:])
    if len(window) > len(before) and not window.endswith("\ufffd"):
      searched = len(self.text)
      self.text += window[len(before):]
      self._prefix, self._read = self._read, len(self.ids)
      for s in self.stop:  # only where a stop string could end in the new text
        at = self.text.find(s, max(0, searched - len(s) + 1))
        if at >= 0:
          self.finish, self.text = "stop", self.text[:at]
    hold = 0 if self.finish else max((len(s) - 1 for s in self.stop), default=0)
    return self._send(self.text[:max(len(self.text) - hold, len(self.sent))])

  def rest(self) -> str:
    """The text not sent yet, at the end. `sent` becomes all the ids decoded at once, cut at the
    stop: the whole text, also for a decoder whose output for a token depends on more than the
    window (e.g. WordPiece's clean-up of spaces before punctuation)."""
    text = self.tokenizer.decode(self.ids)
    for s in self.stop:
      text = text[:text.index(s)] if s in text else text
    return self._send(text)

  def _send(self, ready: str) -> str:
    delta = ready[len(self.sent):] if ready.startswith(self.sent) else ""
    self.sent = ready
    return delta


def piece(tokenizer, token: int) -> str:
  """A token's text; ids past the tokenizer's (a model's padded vocabulary) get a placeholder."""
  return tokenizer.decode([token]) if token < tokenizer.vocab_size else f"<id {token}>"


def logprobs_block(tokenizer, entries, k: int, offset: int = 0) -> dict:
  """OpenAI completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
  tokens, offsets = [], []
  for token, _, _ in entries:
    offsets.append(offset)
    tokens.append(piece(tokenizer, token))
    offset += len(tokens[-1])
  top = [None if lp is None else {piece(tokenizer, t): v for t, v in
                                  sorted(alt.items(), key=lambda kv: -kv[1])[:k]}
         for _, lp, alt in entries]
  return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
          "top_logprobs": top, "text_offset": offsets}


def usage(prompts, n, choices) -> dict:
  prompt_tokens = sum(len(p) for p in prompts) * n
  completion = sum(len(c.ids) for c in choices)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
          "total_tokens": prompt_tokens + completion}
