"""SentencePiece tokenizers: train one on a sample of the corpus, load, resolve, check against the model.

Trained tokenizers are lossless for code and prose alike: `decode(encode(text)) == text`. Text is not
normalized (identity rule, whitespace kept), runs of spaces can be single pieces (indentation), "\\n"
is a piece of its own, digits are split, and anything unseen falls back to its UTF-8 bytes.
Special ids: pad 0, unk 1, bos 2, eos 3 (documents are separated by eos); "\\n" is 4, and tokenizers
trained for masked LM (train.objective=masked_lm) have "[MASK]" at 5.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable, Iterator

from etils import epath
import numpy as np
import sentencepiece as spm

from lmjax import workdir as workdir_lib
from lmjax.data.sources import is_validation_document, iter_documents
from lmjax.errors import ConfigError, DataError
from lmjax.masking import Masking

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_PIECE = "[MASK]"  # a user-defined piece of tokenizers trained for masked LM
# SentencePiece silently skips training "sentences" longer than max_sentence_length bytes; chunks of
# at most this many characters (<= 4 bytes each) always fit.
CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 4 * CHUNK_CHARS


def training_chunks(docs: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[str]:
  """Runs of whole lines of at most `max_chars` (longer lines are cut), newlines kept."""
  for doc in docs:
    chunk = ""
    for line in doc.splitlines(keepends=True):
      while len(line) > max_chars:
        if chunk:
          yield chunk
          chunk = ""
        yield line[:max_chars]
        line = line[max_chars:]
      if chunk and len(chunk) + len(line) > max_chars:
        yield chunk
        chunk = ""
      chunk += line
    if chunk:
      yield chunk


def tokenizer_sample(cfg) -> Iterator[str]:
  """The training documents (validation ones left out) up to ~`data.tokenizer_sample_bytes`.
  Raises a DataError if none is left for training."""
  budget, seen, trained_on = cfg.data.tokenizer_sample_bytes, 0, 0
  for doc_index, doc in enumerate(iter_documents(cfg)):
    if budget <= 0:
      return
    seen += 1
    if not is_validation_document(doc_index, cfg.data.val_fraction):
      budget -= len(doc.encode("utf-8"))
      trained_on += 1
      yield doc
  if not trained_on:
    raise DataError(f"data.source='{cfg.data.source}' has {seen} document(s), all held out for "
                    "validation (document 0 always is, and a fraction data.val_fraction="
                    f"{cfg.data.val_fraction} of the rest), so none is left to train on. Give it "
                    "more documents (a .txt file is one document; a .jsonl line is one).")


def train_tokenizer(cfg, out_prefix: str) -> str:
  """Trains a SentencePiece model on a sample of the corpus; returns `out_prefix + ".model"`."""
  vocab_size = cfg.data.vocab_size or cfg.model.vocab_size
  masked_lm = cfg.train.objective == "masked_lm"  # "[MASK]" gets id 5, after "\n" (4)
  with tempfile.TemporaryDirectory() as tmp:  # SentencePiece writes local files only
    tmp_prefix = os.path.join(tmp, "tokenizer")
    _train(cfg, tmp_prefix, vocab_size, masked_lm)
    out = epath.Path(workdir_lib.absolute(out_prefix))
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".model", ".vocab"):  # whole files only: a killed run never leaves a half model
      partial = out.with_name(out.name + ext + ".tmp")
      epath.Path(tmp_prefix + ext).copy(partial, overwrite=True)
      partial.replace(out.with_name(out.name + ext))
  return out_prefix + ".model"


def _train(cfg, tmp_prefix: str, vocab_size: int, masked_lm: bool) -> None:
  raised = []  # an error of the corpus itself, which SentencePiece would report as its own

  def sample():
    try:
      yield from training_chunks(tokenizer_sample(cfg))
    except DataError as e:
      raised.append(e)
      raise

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sample(),  # streamed: no corpus temp file
        model_prefix=tmp_prefix, model_type=cfg.data.tokenizer_type, vocab_size=vocab_size,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n"] + ([MASK_PIECE] if masked_lm else []),
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except (RuntimeError, DataError) as e:
    if raised:
      raise raised[0] from None
    raise DataError(f"Training the tokenizer failed: {str(e).rstrip('.')}. Lower data.vocab_size "
                    f"(now {vocab_size}) or give it more text (data.tokenizer_sample_bytes, "
                    "data.max_bytes, data.source).") from None


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
  """A SentencePiece model from a local path or a bucket (gs://...)."""
  if not epath.Path(path).is_file():
    raise DataError(f"Tokenizer '{path}' does not exist. Set data.tokenizer to a SentencePiece "
                    f".model file, or to '' to train one.")
  try:
    return spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
  except (OSError, RuntimeError) as e:
    raise DataError(f"Cannot load the tokenizer {path} ({e}): it is not a SentencePiece .model "
                    "file, or it is damaged.") from None


def token_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
  """UTF-8 bytes of text each token id stands for (int32 [vocab]): a byte-fallback piece is one
  byte, control and unknown pieces none, "▁" a space. Exact for lmjax's own tokenizers (no
  normalization, no dummy prefix); for others the text as the tokenizer normalized it."""
  out = np.zeros(sp.get_piece_size(), np.int32)
  for i in range(len(out)):
    if sp.is_byte(i):
      out[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      out[i] = len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
  return out


def resolve_tokenizer(cfg, workdir: str) -> str:
  """The tokenizer's path: `data.tokenizer`, else `<prepared_dir>/tokenizer.model` (trained once)."""
  if cfg.data.tokenizer:
    if not epath.Path(cfg.data.tokenizer).is_file():
      raise DataError(f"data.tokenizer='{cfg.data.tokenizer}' does not exist. Point it at a "
                      f"SentencePiece .model file, or set it to '' to train one on the corpus.")
    return cfg.data.tokenizer
  path = workdir_lib.tokenizer_path(cfg, workdir)
  if not epath.Path(path).is_file():
    return train_tokenizer(cfg, path[:-len(".model")])
  size = load_tokenizer(path).get_piece_size()
  if cfg.data.vocab_size and size != cfg.data.vocab_size:
    raise ConfigError(f"'{path}' has {size} pieces but data.vocab_size={cfg.data.vocab_size}. Use "
                      f"a new data.prepared_dir (or --workdir) to train another tokenizer, or set "
                      f"data.vocab_size={size}.")
  return path


def check_vocab(cfg, sp: spm.SentencePieceProcessor) -> None:
  """The model's embedding must cover every token id (it may be larger, e.g. padded to 128s)."""
  size = sp.get_piece_size()
  if cfg.model.vocab_size < size:
    padded = -(-size // 128) * 128
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({size} pieces). Set --config.model.vocab_size={padded} (>= "
                      f"{size}; a multiple of 128 is fastest), or use a smaller tokenizer.")


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def eos_for(cfg, workdir: str | None = None) -> int:
  """The id that ends every document of the prepared stream (data.packing="documents"): the
  run's tokenizer's eos. Before the tokenizer exists (a run's first build, which checks the
  config before the data is prepared) SentencePiece's default eos, 2, stands in."""
  if cfg.data.source == "synthetic":
    raise ConfigError("data.packing=documents needs documents, and data.source=synthetic has none "
                      "(one endless stream): use a text source, or data.packing=none.")
  if cfg.train.objective != "causal_lm":
    raise ConfigError(f"data.packing=documents is for train.objective=causal_lm, not "
                      f"{cfg.train.objective}: set data.packing=none.")
  path = workdir_lib.tokenizer_path(cfg, workdir) if (workdir or cfg.data.tokenizer) else ""
  if path and epath.Path(path).is_file():
    eos = load_tokenizer(path).eos_id()
    if eos < 0:
      raise ConfigError(f"The tokenizer {path} has no eos piece to find documents by: use one "
                        f"with eos (`lmjax tokenizer train` makes one), or data.packing=none.")
    return eos
  return 2


def masking_for(cfg, workdir: str | None = None) -> Masking:
  """A masked LM's Masking, with the mask token's id from the run's tokenizer: train.mask_token_id
  if set; synthetic data: vocab_size - 1 (which the synthetic stream then never contains); text:
  the tokenizer's "[MASK]" piece (trained in when train.objective=masked_lm), else the first id
  after the tokenizer's pieces if model.vocab_size leaves room. Without a tokenizer to read (a
  benchmark of a text config with no workdir), vocab_size - 1 stands in."""
  t, vocab = cfg.train, cfg.model.vocab_size
  explicit = t.mask_token_id if t.mask_token_id >= 0 else None
  path = workdir_lib.tokenizer_path(cfg, workdir) if (workdir or cfg.data.tokenizer) else ""
  if cfg.data.source == "synthetic":
    mask_id, random_vocab = vocab - 1, vocab - 1
  elif path and epath.Path(path).is_file():
    sp = load_tokenizer(path)
    size = sp.get_piece_size()
    piece_id = sp.piece_to_id(MASK_PIECE)
    random_vocab = size
    if sp.id_to_piece(piece_id) == MASK_PIECE:
      mask_id = piece_id
    elif size < vocab:
      mask_id = size  # an id no text encodes to
    elif explicit is None:
      raise ConfigError(
          f"The tokenizer {path} has no '{MASK_PIECE}' piece and model.vocab_size={vocab} "
          f"leaves no spare id for one. Set --config.model.vocab_size={size + 1} (or more), or "
          f"--config.train.mask_token_id=ID, or prepare the data with "
          f"train.objective=masked_lm (which trains the piece into a new tokenizer).")
    else:
      mask_id = explicit
  else:
    mask_id, random_vocab = vocab - 1, vocab
  return Masking(mask_id=explicit if explicit is not None else mask_id,
                 random_vocab=random_vocab, prob=t.mask_prob,
                 mask_fraction=t.mask_token_fraction, random_fraction=t.random_token_fraction,
                 pad_id=PAD_ID)
