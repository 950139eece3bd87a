"""Tokenizers for a run: train one on a sample of the corpus, resolve the run's, check it against
the model; the mask and eos ids the objectives take from it. Loading (SentencePiece .model or
Hugging Face tokenizer.json, one `Tokenizer` interface) is tokenizer_files.py's.

  data.tokenizer   a SentencePiece .model, a tokenizer.json (read with the `tokenizers` library;
                   bos/eos/pad and the chat template from the tokenizer_config.json beside it), or
                   a directory holding either; "" = train one into the prepared dir
  trained          data.tokenizer_type=bpe|unigram: SentencePiece, tokenizer.model;
                   byte_bpe: a byte-level BPE (GPT-2's kind) with `tokenizers`, tokenizer.json +
                   tokenizer_config.json, which transformers' AutoTokenizer loads as it is

Trained tokenizers are lossless for code and prose alike: `decode(encode(text)) == text`. Text is not
normalized, whitespace is kept, digits are split, and anything unseen falls back to its UTF-8 bytes
(SentencePiece: identity rule, runs of spaces as pieces, "\\n" a piece, byte fallback; byte_bpe:
bytes are its alphabet). Special ids of trained SentencePiece models: pad 0, unk 1, bos 2, eos 3
(documents are separated by eos), "\\n" 4; byte_bpe: "<|pad|>" 0, "<|endoftext|>" 1 (bos and eos).
Tokenizers trained for masked LM (train.objective=masked_lm) have "[MASK]" right after those.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Iterator

from etils import epath
import sentencepiece as spm

from lmjax import config as config_lib
from lmjax import workdir as workdir_lib
from lmjax.data.sources import is_validation_document, iter_documents
from lmjax.data.tokenizer_files import (HF_TOKENIZER, HF_TOKENIZER_CONFIG, Tokenizer,  # noqa: F401
                                        file_sha256, hf_tokenizer_files, is_hf_tokenizer,
                                        load_tokenizer, token_bytes, tokenizer_file,
                                        tokenizer_sha256)
from lmjax.errors import ConfigError, DataError
from lmjax.masking import Masking

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_PIECE = "[MASK]"  # a user-defined piece of tokenizers trained for masked LM
BYTE_BPE_SPECIALS = ("<|pad|>", "<|endoftext|>")  # ids 0, 1 of a trained byte_bpe
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
  Raises a DataError if none is left for training. A mixture's: each source's, by weight."""
  if cfg.data.mixture:  # data.tokenizer_sample_bytes split by weight
    for _, weight, source in config_lib.parse_mixture(cfg.data.mixture):
      one = config_lib.ConfigDict(cfg.to_dict())
      one.data.update(source=source, mixture="", tokenizer_sample_bytes=max(
          1, int(cfg.data.tokenizer_sample_bytes * weight)))
      yield from tokenizer_sample(one)
    return
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
  """Trains a tokenizer of kind data.tokenizer_type on a sample of the corpus; returns its path:
  `out_prefix + ".model"` (SentencePiece), or out_prefix's directory's tokenizer.json (byte_bpe,
  with a tokenizer_config.json beside it)."""
  vocab_size = cfg.data.vocab_size or cfg.model.vocab_size
  masked_lm = cfg.train.objective == "masked_lm"  # "[MASK]" after the special pieces
  out = epath.Path(workdir_lib.absolute(out_prefix))
  if cfg.data.tokenizer_type == "byte_bpe":
    return _train_byte_bpe(cfg, out.parent, vocab_size, masked_lm)
  with tempfile.TemporaryDirectory() as tmp:  # SentencePiece writes local files only
    tmp_prefix = os.path.join(tmp, "tokenizer")
    _train(cfg, tmp_prefix, vocab_size, masked_lm)
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".model", ".vocab"):  # whole files only: a killed run never leaves a half model
      _write_whole(out.with_name(out.name + ext), epath.Path(tmp_prefix + ext).read_bytes())
  return out_prefix + ".model"


def _write_whole(path: epath.Path, data: bytes) -> None:
  partial = path.with_name(path.name + ".tmp")
  partial.write_bytes(data)
  partial.replace(path)


def _corpus_error(e: Exception, vocab_size: int) -> DataError:
  return DataError(f"Training the tokenizer failed: {str(e).rstrip('.')}. Lower data.vocab_size "
                   f"(now {vocab_size}) or give it more text (data.tokenizer_sample_bytes, "
                   "data.max_bytes, data.source).")


def _train_byte_bpe(cfg, out_dir: epath.Path, vocab_size: int, masked_lm: bool) -> str:
  """A GPT-2-style byte-level BPE (`tokenizers`): bytes are the alphabet (lossless, no unknown
  token), GPT-2's pre-tokenizer regex with every digit its own piece, no normalization."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  specials = list(BYTE_BPE_SPECIALS) + ([MASK_PIECE] if masked_lm else [])
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  if vocab_size < 256 + len(specials):
    raise ConfigError(f"A byte-level BPE needs data.vocab_size >= {256 + len(specials)} (256 "
                      f"bytes and {len(specials)} special tokens); it is {vocab_size}.")
  tok.train_from_iterator(training_chunks(tokenizer_sample(cfg)), trainer)
  pad, eos = BYTE_BPE_SPECIALS
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
            "pad_token": pad, "unk_token": None, "model_max_length": cfg.model.max_len,
            "clean_up_tokenization_spaces": False}
  if masked_lm:
    config["mask_token"] = MASK_PIECE
  out_dir.mkdir(parents=True, exist_ok=True)
  # the config first: tokenizer.json's presence means the tokenizer is complete
  _write_whole(out_dir / HF_TOKENIZER_CONFIG, json.dumps(config, indent=2).encode())
  _write_whole(out_dir / HF_TOKENIZER, tok.to_str(pretty=True).encode())
  return os.fspath(out_dir / HF_TOKENIZER)


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
    raise _corpus_error(e, vocab_size) from None


def resolve_tokenizer(cfg, workdir: str) -> str:
  """The tokenizer's path: `data.tokenizer` (its model file), else `<prepared_dir>/
  tokenizer.model` (or tokenizer.json for byte_bpe), trained once."""
  if cfg.data.tokenizer:
    try:
      return tokenizer_file(cfg.data.tokenizer)
    except DataError:
      raise DataError(f"data.tokenizer='{cfg.data.tokenizer}' does not exist or holds no "
                      "tokenizer. Point it at a SentencePiece .model file, a Hugging Face "
                      "tokenizer.json (or its directory), or set it to '' to train one on the "
                      "corpus.") from None
  path = workdir_lib.tokenizer_path(cfg, workdir)
  if not epath.Path(path).is_file():
    return train_tokenizer(cfg, path[:-len(".model")] if path.endswith(".model") else path)
  size = load_tokenizer(path).vocab_size
  if cfg.data.vocab_size and size != cfg.data.vocab_size and cfg.data.tokenizer_type != "byte_bpe":
    raise ConfigError(f"'{path}' has {size} pieces but data.vocab_size={cfg.data.vocab_size}. Use "
                      f"a new data.prepared_dir (or --workdir) to train another tokenizer, or set "
                      f"data.vocab_size={size}.")
  return path


def check_vocab(cfg, tokenizer: Tokenizer) -> None:
  """The model's embedding must cover every token id (it may be larger, e.g. padded to 128s)."""
  size = tokenizer.vocab_size
  if cfg.model.vocab_size < size:
    padded = -(-size // 128) * 128
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({size} pieces). Set --config.model.vocab_size={padded} (>= "
                      f"{size}; a multiple of 128 is fastest), or use a smaller tokenizer.")


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
  if path and epath.Path(path).exists():
    eos = load_tokenizer(path).eos_id
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
  pad_id = PAD_ID
  if cfg.data.source == "synthetic":
    mask_id, random_vocab = vocab - 1, vocab - 1
  elif path and epath.Path(path).exists():
    tokenizer = load_tokenizer(path)
    size, pad_id = tokenizer.vocab_size, tokenizer.pad_id  # -1 (none): no token is a pad
    piece_id = tokenizer.token_id(MASK_PIECE)
    random_vocab = size
    if piece_id >= 0:
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
                 pad_id=pad_id)
