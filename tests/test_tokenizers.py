"""Hugging Face tokenizers (tokenizer.json): lmjax's trained byte-level BPE and a given one with a
chat template, against transformers' AutoTokenizer; SFT and chat prompts through the template;
the errors of a missing or damaged tokenizer. Every tokenizer is made here (nothing downloads)."""
import inspect
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from lmjax import commands
from lmjax.data import chat, tasks
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import DataError

transformers = pytest.importorskip("transformers")

TEXTS = ["def f(x):\n\tif x:\n        return  1234 \n\n\n  # ünïcode 😀 日本語\r\n", "  leading\n",
         "trailing  ", "\n\n", "a<|endoftext|>b", ""]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]


def write_corpus(directory):
  directory.mkdir(parents=True, exist_ok=True)
  for i, module in enumerate((json, os, inspect)):
    (directory / f"{i}.txt").write_text(inspect.getsource(module))
  return directory


def train_byte_bpe(tmp_path, vocab_size=400, *overrides):
  """`lmjax tokenizer train` of a byte_bpe on a corpus written here; returns its tokenizer.json."""
  corpus = write_corpus(tmp_path / "corpus")
  args = ["tokenizer", "train", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
          "--config.data.tokenizer_type="
          "byte_bpe", f"--config.data.source=text:{corpus}/*.txt",
          f"--config.data.vocab_size={vocab_size}", "--config.model.vocab_size=512", *overrides]
  assert commands.run(args) == 0
  return str(tmp_path / "run" / "data" / "tokenizer.json")


def chat_tokenizer(byte_bpe: str, out_dir, template=CHATML):
  """A Qwen-like tokenizer: lmjax's byte-level BPE plus ChatML's special tokens (eos
  <|im_end|>) and a chat template, as transformers saves it (chat_template.jinja beside)."""
  import tokenizers
  tok = tokenizers.Tokenizer.from_file(byte_bpe)
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
      pad_token="<|pad|>", chat_template=template)
  fast.save_pretrained(str(out_dir))
  return str(out_dir)


def test_byte_bpe_ids_equal_autotokenizer(tmp_path, capsys):
  path = train_byte_bpe(tmp_path)
  assert capsys.readouterr().out.strip() == path
  assert sorted(os.listdir(os.path.dirname(path))) == ["tokenizer.json", "tokenizer_config.json"]
  ours = tokenizer_lib.load_tokenizer(path)
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path))
  assert ours.vocab_size == len(theirs) == 400
  assert (ours.pad_id, ours.bos_id, ours.eos_id) == (
      theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (0, 1, 1)
  with open(inspect.getsourcefile(tokenizer_lib), encoding="utf-8") as f:
    texts = TEXTS + [f.read()]
  ids = ours.encode(texts)
  for text, row in zip(texts, ids):
    assert row == theirs.encode(text, add_special_tokens=False)
    assert ours.encode_prompt(text) == (theirs.encode(text) or [1])
    assert ours.decode(row) == theirs.decode(row, skip_special_tokens=True)
    if "<|" not in text:  # lossless, and bits/byte divides by exactly the text's bytes
      assert ours.decode(row) == text
      assert ours.token_bytes()[row].sum() == len(text.encode("utf-8"))
  assert ours.encode(["a<|endoftext|>b"])[0][1] == ours.eos_id  # added tokens are recognized
  assert all(ours.token_id(str(d)) >= 0 for d in range(10))  # digits are pieces of their own
  assert len(ours.encode(["12345"])[0]) == 5


def test_byte_bpe_prepares_trains_and_reports_bits_per_byte(tmp_path):
  from lmjax import train as train_lib
  corpus = write_corpus(tmp_path / "corpus")
  cfg = tiny_config("data.tokenizer_type=byte_bpe", f"data.source=text:{corpus}/*.txt",
                    "data.vocab_size=300", "model.vocab_size=384", "data.val_fraction=0.3",
                    "train.steps=4", "data.packing=documents")
  result = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
  index = json.loads((tmp_path / "run" / "data" / "index.json").read_text())
  assert index["eos_id"] == 1 and index["vocab_size"] == 300
  assert index["tokenizer"].endswith("tokenizer.json")
  assert np.isfinite(result["val"]["bits_per_byte"]) and result["val"]["bits_per_byte"] > 0
  # the tokens are the tokenizer's ids of each document, then eos
  tok = tokenizer_lib.load_tokenizer(index["tokenizer"])
  first = np.fromfile(tmp_path / "run" / "data" / index["splits"]["val"]["shards"][0]["file"],
                      np.uint16)
  doc0 = (corpus / "0.txt").read_text()
  np.testing.assert_array_equal(first[:len(tok.encode([doc0])[0]) + 1], tok.encode([doc0])[0] + [1])


def test_chat_template_renders_as_transformers_does(tmp_path):
  directory = chat_tokenizer(train_byte_bpe(tmp_path), tmp_path / "chat")
  assert "chat_template.jinja" in os.listdir(directory)  # where transformers writes it
  ours = tokenizer_lib.load_tokenizer(directory)  # a directory: its tokenizer.json
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  assert ours.chat_template == CHATML and ours.eos_id == theirs.eos_token_id
  for messages, generation in ((CONVERSATION, False), (CONVERSATION[:2], True)):
    text = chat.render(ours, messages, add_generation_prompt=generation)
    assert text == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation)
    assert ours.encode([text])[0] == list(theirs.apply_chat_template(
        messages, add_generation_prompt=generation, return_dict=True)["input_ids"])
  assert chat.prompt(ours, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sft_learns_the_assistant_turns_of_the_template(tmp_path):
  directory = chat_tokenizer(train_byte_bpe(tmp_path), tmp_path / "chat")
  tok = tokenizer_lib.load_tokenizer(directory)
  data = tmp_path / "sft.jsonl"
  data.write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(4)))
  cfg = tiny_config(f"data.tokenizer={directory}", f"finetune.data={data}", "data.seq_len=64", "model.max_len=64",
                    "model.vocab_size=512", "finetune.val_fraction=0.25")
  rows = tasks.load_task_data(cfg).train
  r = rows["segments"][0] == 1
  targets, weights = rows["targets"][0][r], rows["weights"][0][r]
  learned = [tok.id_to_token(int(t)) for t in targets[weights > 0]]
  # only the assistant turns, with the template's end of turn (no extra eos after it)
  assert "".join(learned).replace("Ċ", "\n") == "Hello<|im_end|>\nBye!<|im_end|>\n"
  full = tok.encode([chat.render(tok, CONVERSATION, False)])[0]
  np.testing.assert_array_equal(targets, full[1:])
  # a template that rewrites past turns cannot be split into what to learn
  rewriting = chat_tokenizer(str(tmp_path / "run" / "data" / "tokenizer.json"), tmp_path / "bad",
                             "{{ messages | length }}{% for m in messages %}{{ m.content }}"
                             "{% endfor %}")
  with pytest.raises(DataError, match="rewrites earlier turns"):
    chat.pieces(tokenizer_lib.load_tokenizer(rewriting), CONVERSATION, "x:1")


def test_tokenizer_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no tokenizer.json or tokenizer.model"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "empty"))
  with pytest.raises(DataError, match="does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
  with pytest.raises(DataError, match="not a Hugging Face tokenizer.json, or it is damaged"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "bad"))
  good = train_byte_bpe(tmp_path, 300)
  (tmp_path / "run" / "data" / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(DataError, match="tokenizer_config.json is not valid JSON"):
    tokenizer_lib.load_tokenizer(good)
  # a tokenizer without eos cannot separate the documents it prepares
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  plain = Tokenizer(models.BPE())
  plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  plain.train_from_iterator(["some text"], trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  (tmp_path / "noeos").mkdir()
  plain.save(str(tmp_path / "noeos" / "tokenizer.json"))
  noeos = tokenizer_lib.load_tokenizer(str(tmp_path / "noeos"))
  assert noeos.eos_id == -1
  cfg = tiny_config(f"data.tokenizer={tmp_path / 'noeos'}", "model.vocab_size=512",
                    f"data.source=text:{tmp_path / 'corpus'}/*.txt")
  from lmjax import data as data_lib
  with pytest.raises(DataError, match="has no eos token"):
    data_lib.prepare(cfg, str(tmp_path / "noeos_run"))
  assert not (tmp_path / "noeos_run" / "data").exists()  # nothing left behind
  cfg = tiny_config(f"data.tokenizer={tmp_path / 'empty'}")
  with pytest.raises(DataError, match="data.tokenizer=.* holds no tokenizer"):
    tokenizer_lib.resolve_tokenizer(cfg, str(tmp_path / "x"))


def _cut(text, stop):
  at = [text.index(s) for s in stop if s in text]
  return text[:min(at)] if at else text


@pytest.mark.parametrize("kind", ["byte_bpe", "bpe", "llama_sentencepiece"])
def test_streamed_text_decodes_incrementally_as_the_whole_ids_do(tmp_path, kind):
  """lmjax's byte-level BPE and SentencePiece, and a SentencePiece model as Llama's is made (a
  space prepended to the text, dropped again from the first piece when decoding). Text, random ids
  (tokens ending mid-character: byte-level BPE, SentencePiece byte fallback) and stop strings: after each token, the deltas `Choice.add` sent add up to the whole ids
  decoded and cut at the first stop string, all of it less the tail that could still begin a
  stop string whenever that text ends in a whole character; with `rest()`, exactly that text."""
  from lmjax.openai_api import Choice
  if kind == "byte_bpe":
    path = train_byte_bpe(tmp_path)
  elif kind == "llama_sentencepiece":
    import sentencepiece as spm
    corpus = write_corpus(tmp_path / "corpus")
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in sorted(corpus.iterdir())), model_prefix=str(tmp_path / "sp"),
        vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        minloglevel=2)
    path = str(tmp_path / "sp.model")
  else:
    corpus = write_corpus(tmp_path / "corpus")
    assert commands.run(["tokenizer", "train", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path / 'run'}", f"--config.data.source=text:{corpus}/*.txt",
                         "--config.data.vocab_size=400", "--config.model.vocab_size=512"]) == 0
    path = str(tmp_path / "run" / "data" / "tokenizer.model")
  tok = tokenizer_lib.load_tokenizer(path)
  rng = np.random.default_rng(0)
  sequences = tok.encode(TEXTS[:3]) + [[int(i) for i in rng.integers(0, tok.vocab_size, 60)]
                                       for _ in range(20)]
  checked = partial = 0
  for ids in sequences:
    whole = tok.decode(ids)
    for stop in ([], ["\n"], ["return", "😀"], [whole[len(whole) // 2:][:3]]):
      if any(not s.strip() or "\ufffd" in s for s in stop):
        continue
      hold = max((len(s) - 1 for s in stop), default=0)
      c, streamed = Choice(tok, stop), ""
      for n in range(len(ids)):
        streamed += c.add(ids[n], 0.0, {})
        now = _cut(tok.decode(ids[:n + 1]), stop)
        assert streamed == c.sent and now.startswith(streamed)
        if c.finish:
          assert streamed == now
          break
        if now.endswith("\ufffd"):
          partial += 1
        else:
          assert len(streamed) >= len(now) - hold, (streamed, now)
      streamed += c.rest()
      assert streamed == c.sent == _cut(whole, stop)
      assert c.finish == ("stop" if any(s in whole for s in stop) else None)
      checked += 1
  assert checked > 50 and partial > 0
