"""Tokenizer files -> `Tokenizer`: a SentencePiece .model or a Hugging Face tokenizer.json (read with
the `tokenizers` library; bos/eos/pad and the chat template from the tokenizer_config.json, or
chat_template.jinja, beside it) behind one interface; their checksums.

Text is encoded without special tokens (`encode`: documents, SFT pieces); prompts as the tokenizer's
own post-processor frames them (`encode_prompt`: e.g. Llama's bos first), which is what
transformers' tokenizer(text) gives.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from etils import epath
import numpy as np
import sentencepiece as spm

from lmjax import workdir as workdir_lib
from lmjax.errors import DataError

HF_TOKENIZER = workdir_lib.HF_TOKENIZER
HF_TOKENIZER_CONFIG, HF_CHAT_TEMPLATE = "tokenizer_config.json", "chat_template.jinja"
# eos of a tokenizer.json without a tokenizer_config.json that names one
COMMON_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def is_hf_tokenizer(path: str) -> bool:
  return os.path.basename(path) == HF_TOKENIZER or path.endswith(".json")


def _special_content(value) -> str | None:
  """A special token of tokenizer_config.json: a string, or {"content": ...} (AddedToken)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class Tokenizer:
  """A SentencePiece model or an HF tokenizer.json; picklable (worker processes get a copy).

  vocab_size counts every id (added tokens included); bos_id / eos_id / pad_id are -1 where the
  tokenizer has none; chat_template is the Jinja template of tokenizer_config.json (or
  chat_template.jinja beside it), "" if none.
  """

  def __init__(self, kind: str, payload: bytes, hf_config: dict | None = None, path: str = ""):
    self.kind, self.path, self._payload = kind, path, payload
    self._hf_config = hf_config or {}
    if kind == "sentencepiece":
      sp = self._sp = spm.SentencePieceProcessor(model_proto=payload)
      self.vocab_size = sp.get_piece_size()
      self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
      self.chat_template = ""
      return
    import tokenizers  # Hugging Face's Rust tokenizers
    self._hf = tokenizers.Tokenizer.from_str(payload.decode("utf-8"))
    self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    config = self._hf_config
    names = {k: _special_content(config.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    if names["eos"] is None:
      names["eos"] = next((t for t in COMMON_EOS if self._hf.token_to_id(t) is not None), None)
    ids = {k: self._hf.token_to_id(v) if v is not None else None for k, v in names.items()}
    self.bos_id, self.eos_id, self.pad_id = (-1 if ids[k] is None else ids[k]
                                             for k in ("bos", "eos", "pad"))
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default") or next(iter(named.values()), "")
    self.chat_template = template

  def __reduce__(self):
    return Tokenizer, (self.kind, self._payload, self._hf_config, self.path)

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without special tokens."""
    if self.kind == "sentencepiece":
      return self._sp.encode(list(texts), num_threads=1)
    return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt's ids as the tokenizer itself frames text (HF: its post-processor, e.g. bos
    first), never empty (bos, else eos, for an empty prompt)."""
    if self.kind == "sentencepiece":
      ids = self._sp.encode(text)
    else:
      ids = self._hf.encode(text, add_special_tokens=True).ids
    return ids or [self.bos_id if self.bos_id >= 0 else max(self.eos_id, 0)]

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.kind == "sentencepiece":
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=True)

  def token_id(self, piece: str) -> int:
    """The id of a piece / token, -1 if the tokenizer has none."""
    if self.kind == "sentencepiece":
      i = self._sp.piece_to_id(piece)
      return i if self._sp.id_to_piece(i) == piece else -1
    i = self._hf.token_to_id(piece)
    return -1 if i is None else i

  def id_to_token(self, i: int) -> str:
    """The piece / token an id stands for, special ones as written ("" for -1)."""
    if i < 0:
      return ""
    return self._sp.id_to_piece(i) if self.kind == "sentencepiece" else self._hf.id_to_token(i)

  def serialized(self) -> bytes:
    """The model file's bytes (SentencePiece proto or tokenizer.json)."""
    return self._payload

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (int32 [vocab_size]): special and control
    tokens none, a byte (fallback) token one; SentencePiece's "▁" is a space, a byte-level BPE's
    characters are bytes. Exact for lmjax's trained tokenizers; for others, the text as the
    tokenizer normalized it."""
    out = np.zeros(self.vocab_size, np.int32)
    if self.kind == "sentencepiece":
      sp = self._sp
      for i in range(len(out)):
        if sp.is_byte(i):
          out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
          out[i] = len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
      return out
    byte_level = '"ByteLevel"' in json.dumps(json.loads(self._payload).get("decoder"))
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = self._hf.get_added_tokens_decoder()
    for token, i in self._hf.get_vocab(with_added_tokens=True).items():
      if i in added:
        out[i] = 0 if added[i].special else len(token.encode("utf-8"))
      elif byte_level and all(c in unicode_to_byte for c in token):
        out[i] = len(token)  # one character per byte
      elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        out[i] = 1  # byte fallback
      else:
        out[i] = len(token.replace("▁", " ").encode("utf-8"))
    return out


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table of byte-level BPE."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def tokenizer_file(path: str) -> str:
  """The model file a data.tokenizer names: the path itself, or a directory's tokenizer.json
  (preferred) or tokenizer.model. Raises a DataError if there is none."""
  path = workdir_lib.tokenizer_model_file(path)
  p = epath.Path(path)
  if p.is_dir():
    raise DataError(f"The directory '{path}' holds no {HF_TOKENIZER} or {workdir_lib.TOKENIZER}. "
                    "Point data.tokenizer at a SentencePiece .model file, a tokenizer.json, or "
                    "a directory with one.")
  if not p.is_file():
    raise DataError(f"Tokenizer '{path}' does not exist. Set data.tokenizer to a SentencePiece "
                    ".model file, a Hugging Face tokenizer.json (or its directory), or to '' to "
                    "train one.")
  return path


def hf_tokenizer_files(path: str) -> list[str]:
  """The files an HF tokenizer is read from: tokenizer.json and, beside it, those present of
  tokenizer_config.json and chat_template.jinja."""
  directory = epath.Path(path).parent
  extra = [directory / n for n in (HF_TOKENIZER_CONFIG, HF_CHAT_TEMPLATE)]
  return [path] + [os.fspath(p) for p in extra if p.is_file()]


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Tokenizer:
  del mtime  # part of the cache key only: a rewritten file is read again
  if not is_hf_tokenizer(path):
    try:
      return Tokenizer("sentencepiece", epath.Path(path).read_bytes(), path=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"Cannot load the tokenizer {path} ({e}): it is not a SentencePiece .model "
                      "file, or it is damaged.") from None
  config, directory = {}, epath.Path(path).parent
  if (directory / HF_TOKENIZER_CONFIG).is_file():
    try:
      config = json.loads((directory / HF_TOKENIZER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{directory / HF_TOKENIZER_CONFIG} is not valid JSON ({e}). Fix or remove "
                      "it (it names bos/eos/pad and the chat template).") from None
  if not config.get("chat_template") and (directory / HF_CHAT_TEMPLATE).is_file():
    config["chat_template"] = (directory / HF_CHAT_TEMPLATE).read_text()
  try:
    return Tokenizer("hf", epath.Path(path).read_bytes(), config, path=path)
  except ImportError:
    raise DataError(f"{path} is a Hugging Face tokenizer, which needs the `tokenizers` package: "
                    "pip install tokenizers") from None
  except Exception as e:  # tokenizers raises its own Exception type for a bad file
    raise DataError(f"Cannot load the tokenizer {path} ({e}): it is not a Hugging Face "
                    "tokenizer.json, or it is damaged.") from None


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer data.tokenizer (or a run's prepared one) names, local or in a bucket."""
  path = tokenizer_file(path)
  try:
    mtime = epath.Path(path).stat().mtime
  except (OSError, AttributeError):
    mtime = 0.0
  return _load(path, mtime)


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
  return tokenizer.token_bytes()


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def tokenizer_sha256(path: str) -> str:
  """A checksum of what a tokenizer encodes by: its model file; for an HF tokenizer also the
  tokenizer_config.json beside it (which names eos, appended to every document)."""
  if not is_hf_tokenizer(path):
    return file_sha256(path)
  digest = hashlib.sha256()
  for p in hf_tokenizer_files(path)[:2]:
    if epath.Path(p).name != HF_CHAT_TEMPLATE:
      digest.update(file_sha256(p).encode())
  return digest.hexdigest()
