"""Hugging Face import/export against real transformers models: logits, round trips, errors.

Tiny random-init models are built here (nothing is downloaded). Every weight, norm scales and
biases included, is perturbed away from its init, so a misnamed, swapped or transposed tensor
changes the logits (test_a_wrong_mapping_breaks_parity shows that it does).
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import jax  # noqa: E402

from conftest import run_python  # noqa: E402
from lmjax import builder, commands, hf  # noqa: E402
from lmjax import checkpoint as ckpt_lib  # noqa: E402
from lmjax import train as train_lib  # noqa: E402
from lmjax import workdir as workdir_lib  # noqa: E402
from lmjax.hf import mapping  # noqa: E402

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
             rope_theta=500000.0, rms_norm_eps=1e-5)


def make_hf_model(kind: str):
  torch.manual_seed({"gpt2": 0, "llama_gqa": 1, "llama_tied": 2, "mistral": 3}[kind])
  if kind == "gpt2":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, layer_norm_epsilon=1e-4))
  elif kind == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **LLAMA, sliding_window=None, tie_word_embeddings=False))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, tie_word_embeddings=kind == "llama_tied"))
  with torch.no_grad():  # off the init: norm scales != 1, biases != 0, every matrix distinct
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def lmjax_logits(workdir, tokens=TOKENS):
  """(logits, params, step) of the run's latest checkpoint."""
  _, run, params, step = builder.load_params(str(workdir))
  with run.context():
    return np.asarray(run.model.apply({"params": params}, tokens)), params, step


def save(model, path, **kwargs):
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  return path


def max_diff(a, b):
  return float(np.max(np.abs(a - b)))


class Models:
  """Tiny HF models, their save_pretrained directories and lmjax runs imported from them, each
  made on first use (pytest-xdist workers then build only what their tests need)."""

  def __init__(self, root):
    self.root, self._hf, self._runs = root, {}, {}

  def hf(self, kind):
    if kind not in self._hf:
      model = make_hf_model(kind)
      self._hf[kind] = model, save(model, self.root / kind)
    return self._hf[kind]

  def run(self, kind):
    if kind not in self._runs:
      self._runs[kind] = self.root / f"{kind}_run"
      hf.import_hf(str(self.hf(kind)[1]), str(self._runs[kind]))
    return self._runs[kind]

  def __call__(self, kind):
    """(HF model, its directory, the imported run)."""
    return (*self.hf(kind), self.run(kind))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return Models(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "llama_tied", "mistral"])
def test_imported_logits_match_hf(models, kind):
  model, _, run = models(kind)
  logits, _, step = lmjax_logits(run)
  expected = hf_logits(model)
  assert np.abs(expected).max() > 0.5  # large enough that a wrong weight would show
  assert max_diff(logits, expected) < TOL
  assert step == 0  # the import is a run at step 0


def test_imported_config(models):
  cfg = workdir_lib.load_config(str(models.run("llama_gqa")))
  m = cfg.model
  assert (m.style, m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim) == (
      "llama", 2, 64, 4, 2, 16)
  assert (m.mlp_dim, m.vocab_size, m.max_len, m.tie_embeddings) == (96, 128, 64, False)
  assert (m.rope_theta, m.norm_eps, cfg.data.seq_len) == (500000.0, 1e-5, 64)
  g = workdir_lib.load_config(str(models.run("gpt2"))).model
  assert (g.style, g.mlp_dim, g.tie_embeddings, g.norm_eps) == ("gpt2", 256, True, 1e-4)


def test_scanned_layers_import(models, tmp_path):
  model, hf_dir = models.hf("llama_gqa")
  hf.import_hf(str(hf_dir), str(tmp_path / "run"), config_overrides=["model.scan_layers=true"])
  logits, params, _ = lmjax_logits(tmp_path / "run")
  assert params["layers"]["attn"]["key"]["kernel"].shape == (2, 64, 2, 16)
  assert max_diff(logits, hf_logits(model)) < TOL
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))  # unstacks the layers again
  exported, original = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "out", hf_dir))
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "llama_tied"])
def test_export_loads_in_transformers_and_round_trips(models, kind, tmp_path, capsys):
  _, hf_dir, run = models(kind)
  assert commands.run(["convert", f"--to_hf={tmp_path / 'out'}", f"--workdir={run}"]) == 0
  assert "model.safetensors" in capsys.readouterr().out
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  logits = lmjax_logits(run)[0]
  assert max_diff(hf_logits(loaded.eval()), logits) < TOL

  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  original = load_file(str(hf_dir / "model.safetensors"))
  assert exported.keys() == original.keys()  # tied models store no lm_head, as HF does
  assert all(np.array_equal(exported[k], original[k]) for k in original)

  # export -> import -> export: the same bytes
  hf.import_hf(str(tmp_path / "out"), str(tmp_path / "run2"))
  hf.export_hf(str(tmp_path / "run2"), str(tmp_path / "out2"))
  again = load_file(str(tmp_path / "out2" / "model.safetensors"))
  assert again.keys() == exported.keys()
  assert all(again[k].tobytes() == exported[k].tobytes() for k in exported)
  assert ((tmp_path / "out" / "config.json").read_text() ==
          (tmp_path / "out2" / "config.json").read_text())


SHARDED_IMPORT = """
import sys, json
import numpy as np
sys.path.insert(0, TESTS)
from test_hf import lmjax_logits, TOKENS
from lmjax import hf
from lmjax.hf import files
reads, real = [], files.Tensors.read
def read(self, name, index=()):
  out = real(self, name, index)
  reads.append((name, out.size, int(np.prod(self.shape(name)))))
  return out
files.Tensors.read = read
out = {}
for kind, (path, scan) in DIRS.items():
  reads.clear()
  hf.import_hf(path, path + f"_sharded_{scan}", config_overrides=[
      "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", f"model.scan_layers={scan}"])
  logits = lmjax_logits(path + f"_sharded_{scan}", np.tile(TOKENS, (4, 1)))[0][:len(TOKENS)]
  out[kind] = {"logits": logits.tolist(),
               "whole": sorted({n for n, got, size in reads if got == size}),
               "read": sum(got for _, got, _ in reads), "size": sum(
                   {n: size for n, _, size in reads}.values())}
print(json.dumps(out))
"""


def test_sharded_import_reads_each_device_block_alone(models, tmp_path):
  """On fsdp=4 x tensor=2 (8 devices), each device's block of a param is read from the file by
  itself (not the whole tensor), and the logits are HF's: GPT-2 into unscanned layers, Llama
  (GQA) into scanned ones (stacked along the layer axis)."""
  dirs = {kind: (str(models.hf(kind)[1]), scan) for kind, scan in (("gpt2", "false"),
                                                                    ("llama_gqa", "true"))}
  code = (SHARDED_IMPORT.replace("TESTS", repr(os.path.dirname(__file__)))
          .replace("DIRS", repr(dirs)))
  out = run_python(code, devices=8)
  for kind in dirs:
    model = models.hf(kind)[0]
    assert max_diff(np.asarray(out[kind]["logits"]), hf_logits(model)) < TOL, kind
    # the matrices split over fsdp/tensor are never read whole; only replicated vectors (norms,
    # biases) and GPT-2's position table (no sharded axis) are
    whole = out[kind]["whole"]
    assert not any(n.endswith(("q_proj.weight", "up_proj.weight", "down_proj.weight",
                               "c_fc.weight", "c_attn.weight", "embed_tokens.weight",
                               "wte.weight")) for n in whole), whole
    # 8 devices read 8 blocks; a block of an (fsdp 4 x tensor 2)-split matrix is 1/8 of it
    assert out[kind]["read"] < 8 * out[kind]["size"]


def test_export_writes_shards_of_a_max_size_with_an_index(models, tmp_path):
  """One tensor gathered at a time, into files of at most max_shard_bytes: what transformers'
  sharded save_pretrained writes, loaded with the same tensors."""
  import json
  model, hf_dir, run = models("gpt2")
  written = hf.export_hf(str(run), str(tmp_path / "out"), max_shard_bytes=100_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert written["weights"].endswith("model.safetensors.index.json")
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
  exported = {}
  for name in files:
    path = tmp_path / "out" / name
    part = load_file(str(path))
    assert path.stat().st_size <= 100_000 + 4 * max(x.size for x in part.values()) + 10_000
    exported.update(part)
  original = load_file(str(hf_dir / "model.safetensors"))
  assert exported.keys() == original.keys() == index["weight_map"].keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in exported.values())
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  assert max_diff(hf_logits(loaded.eval()), lmjax_logits(run)[0]) < TOL


def _swap_key_value(rules):  # both [K*H, D]: passes every shape check
  k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
  return [r._replace(hf={k: v, v: k}.get(r.hf, r.hf)) for r in rules]


def _untranspose_out(rules):  # o_proj is square [D, N*H]: passes every shape check
  return [r._replace(transpose=False) if r.hf == "model.layers.0.self_attn.o_proj.weight" else r
          for r in rules]


def _swap_query_key_thirds(rules):  # GPT-2's fused c_attn
  parts = {0: 1, 1: 0, 2: 2}
  return [r._replace(part=parts[r.part]) if r.hf == "transformer.h.0.attn.c_attn.weight" else r
          for r in rules]


@pytest.mark.parametrize("kind,corrupt", [("llama_gqa", _swap_key_value),
                                          ("llama_gqa", _untranspose_out),
                                          ("gpt2", _swap_query_key_thirds)])
def test_a_wrong_mapping_breaks_parity(models, kind, corrupt, tmp_path, monkeypatch):
  model, hf_dir = models.hf(kind)
  real = mapping.rules_for
  monkeypatch.setattr(mapping, "rules_for", lambda c: corrupt(real(c)))
  hf.import_hf(str(hf_dir), str(tmp_path / "run"))
  logits = lmjax_logits(tmp_path / "run")[0]
  assert max_diff(logits, hf_logits(model)) > 100 * TOL


def test_sharded_checkpoint(models, tmp_path):
  model, _ = models.hf("llama_gqa")
  hf_dir = save(model, tmp_path / "sharded", max_shard_size="40KB")
  assert (hf_dir / "model.safetensors.index.json").exists()
  assert not (hf_dir / "model.safetensors").exists()
  hf.import_hf(str(hf_dir), str(tmp_path / "run"))
  assert max_diff(lmjax_logits(tmp_path / "run")[0], hf_logits(model)) < TOL


def test_bfloat16_checkpoint(models, tmp_path):
  model, hf_dir = models.hf("llama_tied")
  bf16_dir = shutil.copytree(hf_dir, tmp_path / "bf16")
  import safetensors.torch
  weights = safetensors.torch.load_file(str(hf_dir / "model.safetensors"))
  safetensors.torch.save_file({k: v.bfloat16() for k, v in weights.items()},
                              str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
  hf.import_hf(str(bf16_dir), str(tmp_path / "run"))
  _, params, _ = lmjax_logits(tmp_path / "run")
  expected = weights["model.embed_tokens.weight"].bfloat16().float().numpy()
  assert np.array_equal(np.asarray(params["embed"]["embedding"]), expected)


def _write_tokenizer(path, vocab_size=128):
  """A SentencePiece model with exactly the test models' vocabulary (lmjax's special ids)."""
  import inspect
  import sentencepiece as spm
  text = inspect.getsource(json).splitlines(keepends=True)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path)[:-6],
                                 vocab_size=vocab_size, minloglevel=2, pad_id=0, unk_id=1,
                                 bos_id=2, eos_id=3)
  return path


def test_tokenizer_travels_and_greedy_decoding_matches_hf(models, tmp_path, capsys):
  from lmjax import decode
  model, hf_dir = models.hf("llama_gqa")
  with_tok = shutil.copytree(hf_dir, tmp_path / "with_tok")
  _write_tokenizer(with_tok / "tokenizer.model")
  assert commands.run(["convert", f"--from_hf={with_tok}", f"--workdir={tmp_path / 'run'}"]) == 0
  assert "data/tokenizer.model" in capsys.readouterr().out
  cfg = workdir_lib.load_config(str(tmp_path / "run"))
  assert cfg.data.tokenizer == str(tmp_path / "run" / "data" / "tokenizer.model")
  assert os.path.isfile(cfg.data.tokenizer) and cfg.data.source == "pystdlib"

  # `lmjax generate`'s decoding (greedy, KV cache) follows HF's greedy generate
  _, run, params, _ = builder.load_params(str(tmp_path / "run"))
  prompt = TOKENS[0, :6].tolist()
  (ours,) = decode.generate(run.model, params, [prompt], max_new_tokens=8)
  with torch.no_grad():
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
  assert ours == theirs

  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
  assert ((tmp_path / "out" / "tokenizer.model").read_bytes() ==
          (with_tok / "tokenizer.model").read_bytes())


def test_hf_tokenizer_travels_and_generate_takes_text(tmp_path, capsys):
  """A GPT-2 with a byte-level BPE tokenizer.json and a chat template: `lmjax convert` carries
  them; `generate` (plain and --chat) matches transformers' greedy text; SFT fine-tunes on the
  template's conversations; export writes the tokenizer back."""
  from test_tokenizers import CONVERSATION, chat_tokenizer, train_byte_bpe

  from lmjax import finetune as ft
  from lmjax import generate as generate_lib
  from lmjax.data import tasks
  hf_dir = chat_tokenizer(train_byte_bpe(tmp_path / "tok"), tmp_path / "hf")
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  torch.manual_seed(4)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=64,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  save(model, hf_dir)
  run = tmp_path / "run"
  assert commands.run(["convert", f"--from_hf={hf_dir}", f"--workdir={run}"]) == 0
  assert "data/tokenizer.json" in capsys.readouterr().out
  cfg = workdir_lib.load_config(str(run))
  assert cfg.data.tokenizer == str(run / "data" / "tokenizer.json")
  assert sorted(os.listdir(run / "data")) == ["chat_template.jinja", "tokenizer.json",
                                              "tokenizer_config.json"]

  def hf_greedy(ids):
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)

  prompt = "def f(x):\n"
  (ours,) = generate_lib.generate_text(str(run), [prompt], max_new_tokens=10)
  assert ours == hf_greedy(tok(prompt)["input_ids"])
  (ours,) = generate_lib.generate_text(str(run), ["Hi"], max_new_tokens=10, chat=True)
  chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], return_dict=True,
                                     add_generation_prompt=True)["input_ids"]
  assert ours == hf_greedy(list(chat_ids))
  assert commands.run(["generate", f"--workdir={run}", "--prompt=Hi", "--chat",
                       "--max_new_tokens=10"]) == 0
  assert ours in capsys.readouterr().out

  # SFT on the converted run reads the template's conversations
  data = tmp_path / "sft.jsonl"
  data.write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(8)))
  out = str(tmp_path / "ft")
  ft_cfg = ft.resolve_config("configs/finetune.py:sft", out, str(run), [
      "data.seq_len=64", "train.batch_size=2", "train.steps=2", "train.eval_every=2",
      f"finetune.data={data}"])
  task_data = tasks.load_task_data(ft_cfg)
  rows, examples = task_data.train, task_data.stats["train"]["examples"]
  assert task_data.stats["train"]["truncated"] == 0 and examples == 7
  assert tok.decode(rows["targets"][rows["weights"] > 0]) == (
      "Hello<|im_end|>\nBye!<|im_end|>\n" * examples)
  assert np.isfinite(ft.finetune(ft_cfg, out, progress=False)["val"]["loss"])

  written = hf.export_hf(str(run), str(tmp_path / "out"))
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(written)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert again(prompt)["input_ids"] == tok(prompt)["input_ids"]
  assert again.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(
      CONVERSATION, tokenize=False)


def test_train_continues_from_the_import(models, tmp_path, capsys):
  _, hf_dir = models.hf("gpt2")
  workdir = str(tmp_path / "run")
  hf.import_hf(str(hf_dir), workdir, config_overrides=[
      "train.steps=2", "train.batch_size=2", "data.seq_len=16", "train.eval_every=100",
      "train.eval_batches=1", "optim.learning_rate=1e-4", "optim.warmup_steps=0"])
  _, _, imported, _ = builder.load_params(workdir)
  # the import holds params alone: no optimizer state (2x the params for Adam), no RNG
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as c:
    assert c.params_only(0)
    assert set(c.manager.item_metadata(0)["state"]) == {"params"}
  cfg = workdir_lib.load_config(workdir)
  result = train_lib.train(cfg, workdir, progress=False)
  assert "Starting from the params at step 0" in capsys.readouterr().out
  assert result["step"] == 2
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as c:
    assert not c.params_only(2)  # training saved its whole state
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                 result["state"].params, imported)
  assert 0 < max(jax.tree_util.tree_leaves(moved)) < 0.01  # small steps from the HF weights


# ---------------------------------------------------------------------------------------------
# Errors: clear, and nothing written.


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(changes)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


def _import_error(hf_dir, workdir, **kwargs) -> str:
  with pytest.raises(ValueError) as e:
    hf.import_hf(str(hf_dir), str(workdir), **kwargs)
  assert not os.path.exists(workdir) or not os.path.exists(os.path.join(workdir, "config.json"))
  return str(e.value)


def test_unsupported_model_type(models, tmp_path):
  bad = _edit_config(models.hf("gpt2")[1], tmp_path / "bert", model_type="bert")
  assert "model_type 'bert' is not supported" in _import_error(bad, tmp_path / "run")


def test_shape_mismatch_names_the_tensor(models, tmp_path):
  bad = _edit_config(models.hf("gpt2")[1], tmp_path / "wide", n_embd=96, n_head=4)
  message = _import_error(bad, tmp_path / "run")
  assert "transformer.wte.weight" in message and "[128, 64]" in message and "[128, 96]" in message


def test_pickle_only_is_refused(models, tmp_path):
  only_bin = tmp_path / "bin"
  only_bin.mkdir()
  shutil.copy(models.hf("gpt2")[1] / "config.json", only_bin / "config.json")
  (only_bin / "pytorch_model.bin").write_bytes(b"not loaded")
  message = _import_error(only_bin, tmp_path / "run")
  assert "pickle" in message and "safetensors" in message


def test_unexpected_and_missing_tensors(models, tmp_path):
  _, hf_dir = models.hf("llama_gqa")
  weights = load_file(str(hf_dir / "model.safetensors"))
  extra = shutil.copytree(hf_dir, tmp_path / "extra")
  save_file({**weights, "score.weight": np.zeros((3, 64), np.float32)},
            str(extra / "model.safetensors"))
  assert "score.weight" in _import_error(extra, tmp_path / "run")
  missing = shutil.copytree(hf_dir, tmp_path / "missing")
  save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
            str(missing / "model.safetensors"))
  assert "model.layers.1.mlp.up_proj.weight" in _import_error(missing, tmp_path / "run")


def test_sliding_window_is_refused(models, tmp_path):
  bad = _edit_config(models.hf("mistral")[1], tmp_path / "window", sliding_window=16)
  assert "sliding_window=16" in _import_error(bad, tmp_path / "run")


def test_rope_scaling_is_refused(models, tmp_path):
  bad = _edit_config(models.hf("llama_gqa")[1], tmp_path / "scaled",
                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
  assert "RoPE scaling 'linear'" in _import_error(bad, tmp_path / "run")
  # a default rope_parameters beside a linear rope_scaling: transformers scales, so lmjax refuses
  both = _edit_config(models.hf("llama_gqa")[1], tmp_path / "both",
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                      rope_scaling={"type": "linear", "factor": 2.0})
  assert "RoPE scaling 'linear'" in _import_error(both, tmp_path / "run2")


def test_a_truncated_safetensors_file_is_named(models, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(models.hf("gpt2")[1], damaged)
  weights = damaged / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  message = _import_error(damaged, tmp_path / "run")
  assert str(weights) in message and "truncated or damaged" in message


def test_overrides_cannot_contradict_the_checkpoint(models, tmp_path):
  message = _import_error(models.hf("gpt2")[1], tmp_path / "run",
                          config_overrides=["model.d_model=128"])
  assert "model.d_model=128" in message


def test_existing_run_is_not_overwritten(models, tmp_path):
  _, hf_dir, run = models("gpt2")
  before = (run / "config.json").read_text()
  with pytest.raises(ValueError, match="already holds an lmjax run"):
    hf.import_hf(str(hf_dir), str(run))
  assert (run / "config.json").read_text() == before


def test_convert_needs_one_direction(tmp_path):
  with pytest.raises(ValueError, match="exactly one"):
    commands.run(["convert", f"--workdir={tmp_path}"])


def test_convert_command_round_trip(models, tmp_path):
  from conftest import run_cli
  _, hf_dir = models.hf("llama_gqa")
  run = tmp_path / "run"
  proc = run_cli("convert", f"--from_hf={hf_dir}", f"--workdir={run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_cli("eval", f"--workdir={run}", "--batches=1", "--config.train.batch_size=2")
  assert proc.returncode == 0 and "val loss" in proc.stdout, proc.stderr[-3000:]
  proc = run_cli("convert", f"--to_hf={tmp_path / 'out'}", f"--workdir={run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "out" / "model.safetensors").exists()
  proc = run_cli("convert", f"--from_hf={tmp_path / 'missing'}", f"--workdir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
