"""Masked LM: BERT masking statistics, bidirectional attention, training that learns, exact resume,
the same step on any mesh and with accumulation, eval/generate/export behaviour, config errors."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli, run_python, tiny_config

from lmjax import masking as masking_lib
from lmjax import train as train_lib
from lmjax.config import ConfigError
from lmjax.metrics import read_metrics
from lmjax.model import ModelConfig, Transformer

MLM = ("model.causal=false", "train.objective=masked_lm")
# a task a 2-layer encoder learns in 200 steps: the synthetic stream (token t mostly followed by
# perm[t]) with its masked tokens to be recovered from their neighbours
LEARN = MLM + ("train.steps=200", "train.log_every=50", "train.eval_every=100",
               "train.checkpoint_every=200", "train.batch_size=32", "data.seq_len=32",
               "optim.learning_rate=5e-3", "optim.warmup_steps=20", "model.d_model=64",
               "model.mlp_dim=128")


def test_masking_statistics():
  vocab, mask_id = 1000, 999
  m = masking_lib.Masking(mask_id=mask_id, random_vocab=mask_id)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, mask_id, size=(256, 512)).astype(np.int32)
  tokens[:, -100:] = 0  # right padding: never selected
  inputs, selected = jax.device_get(masking_lib.corrupt(jax.random.PRNGKey(1), tokens, m))
  real = tokens != 0
  assert not selected[~real].any() and (inputs[~real] == 0).all()
  assert selected[real].mean() == pytest.approx(0.15, abs=0.005)
  assert (inputs[~selected] == tokens[~selected]).all()  # only selected tokens change
  sel_in, sel_tok = inputs[selected], tokens[selected]
  masked = sel_in == mask_id
  kept = sel_in == sel_tok
  random = ~masked & ~kept
  assert masked.mean() == pytest.approx(0.8, abs=0.015)
  assert kept.mean() == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)
  assert random.mean() == pytest.approx(0.1, abs=0.01)
  assert sel_in[random].min() >= 0 and sel_in[random].max() < mask_id
  # ~uniform random replacements: not e.g. all the same token
  assert len(np.unique(sel_in[random])) > 0.5 * min(random.sum(), vocab)
  # another key, other positions; the same key, the same corruption
  again, _ = masking_lib.corrupt(jax.random.PRNGKey(1), tokens, m)
  other, _ = masking_lib.corrupt(jax.random.PRNGKey(2), tokens, m)
  assert (np.asarray(again) == inputs).all() and not (np.asarray(other) == inputs).all()


def test_bidirectional_attention_sees_the_future_and_not_pads():
  tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12]])
  later = tokens.at[0, 6].set(40)  # change position 6
  for causal in (True, False):
    model = Transformer(ModelConfig.create(num_layers=2, d_model=64, num_heads=4, mlp_dim=256,
                                           vocab_size=64, max_len=16, causal=causal))
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    apply = jax.jit(model.apply)
    a, b = apply({"params": params}, tokens), apply({"params": params}, later)
    earlier_changed = not np.allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert earlier_changed == (not causal), causal
    assert not np.allclose(a[0, 6:], b[0, 6:], atol=1e-6)
  # the padding mask holds for the encoder: what a pad slot holds changes no real position
  mask = jnp.array([[True] * 6 + [False] * 2])
  a = apply({"params": params}, tokens, kv_mask_BS=mask)
  b = apply({"params": params}, later, kv_mask_BS=mask)
  assert np.allclose(a[0, :6], b[0, :6], atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny encoder trained with the BERT objective on synthetic tokens (~15 s)."""
  workdir = str(tmp_path_factory.mktemp("mlm"))
  result = train_lib.train(tiny_config(*LEARN), workdir, progress=False)
  return workdir, result


def test_masked_lm_learns(trained):
  workdir, result = trained
  records = read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in val] == [100, 200]
  chance = 1 / 63  # the synthetic stream uses 63 ids; the 64th is [MASK]
  first, last = train[0], train[-1]
  assert first["loss"] > 3.3 and last["loss"] < first["loss"] - 1.0
  # above chance and well above copying the input (right for the 10% kept tokens only)
  assert val[-1]["masked_accuracy"] > 0.25 > 15 * chance
  assert val[-1]["masked_accuracy"] > val[0]["masked_accuracy"]
  assert val[-1]["perplexity"] == pytest.approx(np.exp(val[-1]["loss"]))
  assert "bits_per_byte" not in val[-1]
  # about 15% of the val tokens (2 batches of 32 x 32) are scored
  assert 0.1 < val[-1]["tokens"] / (2 * 32 * 32) < 0.2
  assert result["val"]["masked_accuracy"] == val[-1]["masked_accuracy"]


def test_eval_reports_masked_accuracy_and_generate_refuses(trained):
  workdir, result = trained
  proc = run_cli("eval", f"--workdir={workdir}", env={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "masked accuracy" in proc.stdout
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # the same masks as training's periodic eval: the same numbers
  assert out["masked_accuracy"] == pytest.approx(result["val"]["masked_accuracy"], abs=1e-6)
  assert out["loss"] == pytest.approx(result["val"]["loss"], rel=1e-5)
  proc = run_cli("generate", f"--workdir={workdir}", "--prompt=x", env={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert "lmjax: error:" in proc.stderr and "bidirectional encoder" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_export_refuses_an_encoder(trained, tmp_path):
  from lmjax import hf
  with pytest.raises(hf.ConversionError, match="bidirectional encoder"):
    hf.export_hf(trained[0], str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_resume_matches_uninterrupted_run(tmp_path):
  cfg = tiny_config(*MLM, "train.steps=6", "train.checkpoint_every=6", "train.eval_every=100")
  train_lib.train(cfg, str(tmp_path / "a"), progress=False)
  train_lib.train(cfg, str(tmp_path / "b"), progress=False, stop_at_step=3)
  train_lib.train(cfg, str(tmp_path / "b"), progress=False)

  def curve(workdir):
    return {r["step"]: [r["loss"], r["masked_accuracy"]] for r in read_metrics(workdir)
            if r["split"] == "train"}
  a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:  # the same masks after the restart
    assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), step


ONE_STEP = """
import json, sys, jax
sys.path.insert(0, TESTS)
from conftest import tiny_config
from conftest import build
from lmjax.data import make_iterator
out = {}
for name, devices, extra in [
    ("1 device", jax.devices()[:1], ()),
    # masks drawn on batch shards, accuracy's argmax over vocabulary shards, two micro-batches
    ("(2, 2, 2) mesh, accumulation 2", None,
     ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "optim.accumulation_steps=2"))]:
  cfg = tiny_config("model.causal=false", "train.objective=masked_lm", "train.batch_size=16",
                    "optim.warmup_steps=0", "optim.eps=1.0", *extra)
  run = build(cfg, devices)
  train_step = run.jit_train_step()
  iterator = make_iterator(cfg, "", "train")
  state = run.init()
  with run.context():
    for _ in range(2):
      state, metrics = train_step(state, next(iterator))
  kernel = state.params["layer_0"]["mlp"]["up"]["kernel"]
  out[name] = {k: float(v) for k, v in metrics.items()}
  out[name]["param_sum"] = float(abs(jax.device_get(kernel)).sum())
print(json.dumps(out))
"""


def test_same_step_on_any_mesh_and_with_accumulation():
  out = run_python(ONE_STEP.replace("TESTS", repr(os.path.dirname(__file__))), devices=8)
  reference = out.pop("1 device")
  assert 0 < reference["masked_accuracy"] < 1 and reference["loss"] > 0
  for name, metrics in out.items():
    for key in ("loss", "masked_accuracy", "grad_norm", "param_sum"):
      assert metrics[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), (name, key)


def test_config_errors():
  with pytest.raises(ConfigError, match="needs model.causal=False"):
    tiny_config("train.objective=masked_lm")
  with pytest.raises(ConfigError, match="needs model.causal=True"):
    tiny_config("model.causal=false")
  with pytest.raises(ConfigError, match=re.escape("train.objective must be causal_lm|masked_lm")):
    tiny_config("train.objective=mlm")
  with pytest.raises(ConfigError, match="train.mask_prob"):
    tiny_config(*MLM, "train.mask_prob=0")
  with pytest.raises(ConfigError, match="sum <= 1"):
    tiny_config(*MLM, "train.mask_token_fraction=0.9", "train.random_token_fraction=0.2")
  with pytest.raises(ConfigError, match="sample_prompt"):
    tiny_config(*MLM, "train.sample_prompt=def")
  with pytest.raises(ConfigError, match="outside the vocabulary"):
    tiny_config(*MLM, "train.mask_token_id=64")


def test_mask_token_id_from_the_tokenizer(tmp_path):
  """Text data: [MASK] is a piece of tokenizers trained for masked LM; an older tokenizer without
  it gets the first spare id; with no spare id, a clear error."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + [MASK]\n"})
                            + "\n" for i in range(300)))
  common = (f"data.source=text:{corpus}", "model.vocab_size=384", "data.vocab_size=300",
            "data.val_fraction=0.0", "data.tokenizer_sample_bytes=100000")
  mlm = tiny_config(*MLM, *common)
  from lmjax import data as data_lib
  path = data_lib.resolve_tokenizer(mlm, str(tmp_path / "mlm"))
  sp = data_lib.load_tokenizer(path)
  assert sp.id_to_token(5) == "[MASK]" and sp.id_to_token(4) == "\n"
  assert data_lib.masking_for(mlm, str(tmp_path / "mlm")) == masking_lib.Masking(
      mask_id=5, random_vocab=300)
  # a causal run's tokenizer: no [MASK] piece; the model's vocabulary has room above its 300 ids
  causal = tiny_config(*common)
  path = data_lib.resolve_tokenizer(causal, str(tmp_path / "causal"))
  assert data_lib.load_tokenizer(path).id_to_token(5) != "[MASK]"
  reuse = tiny_config(*MLM, *common, f"data.tokenizer={path}")
  assert data_lib.masking_for(reuse, None).mask_id == 300
  full = tiny_config(*MLM, *common, f"data.tokenizer={path}", "model.vocab_size=300")
  with pytest.raises(ConfigError, match="no '\\[MASK\\]' piece"):
    data_lib.masking_for(full, None)
  assert data_lib.masking_for(tiny_config(*MLM), None).mask_id == 63  # synthetic: the last id


def test_bert_config_variants():
  from lmjax import config as config_lib
  from lmjax.flops import count_params
  sizes = {}
  for variant in ("tiny", "base", "large"):
    cfg = config_lib.get_config(f"{ROOT}/configs/bert.py:{variant}")
    assert not cfg.model.causal and cfg.train.objective == "masked_lm"
    model = Transformer(ModelConfig.from_config(cfg))
    params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 8), jnp.int32)))["params"]
    sizes[variant] = count_params(params) / 1e6
  assert sizes["tiny"] < 1 and 105 < sizes["base"] < 115 and 330 < sizes["large"] < 345
  with pytest.raises(ValueError, match="Unknown bert variant"):
    config_lib.get_config(f"{ROOT}/configs/bert.py:huge")


GROUPS = {"fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
          "color": ["red", "blue", "green", "black", "white", "pink", "gray", "gold"],
          "animal": ["cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "bear"]}


def test_classification_fine_tuning_from_an_encoder(tmp_path):
  """`lmjax finetune` (classification) from a masked-LM run: texts of 4 words labelled by the
  group of the LAST word, pooled at the FIRST token, which only bidirectional attention lets see
  the last word (a causal model's first position sees its own token only: chance, 1/3)."""
  from lmjax import finetune as ft
  rng = np.random.default_rng(0)
  words = [w for group in GROUPS.values() for w in group]
  os.makedirs(tmp_path / "corpus")
  for d in range(10):
    (tmp_path / "corpus" / f"doc{d}.txt").write_text(
        "".join(" ".join(rng.choice(words, 8)) + "\n" for _ in range(60)))
  init = str(tmp_path / "init")
  train_lib.train(tiny_config(*MLM, f"data.source=text:{tmp_path}/corpus/*.txt",
                              "model.vocab_size=512", "data.vocab_size=400", "data.num_workers=1",
                              "data.val_fraction=0.1", "train.steps=30", "train.eval_every=30",
                              "train.checkpoint_every=30"), init, progress=False)
  labels = list(GROUPS)
  examples = [{"text": " ".join([*rng.choice(words, 3), rng.choice(GROUPS[labels[i % 3]])]),
               "label": labels[i % 3]} for i in range(240)]
  data = tmp_path / "cls.jsonl"
  data.write_text("".join(json.dumps(e) + "\n" for e in examples))
  out = str(tmp_path / "cls")
  cfg = ft.resolve_config(f"{ROOT}/configs/finetune.py:classification", out, init, [
      "train.batch_size=16", "train.steps=60", "train.log_every=20", "train.eval_every=30",
      "train.checkpoint_every=60", "optim.warmup_steps=2", "optim.learning_rate=1e-2",
      "optim.weight_decay=0.0", "data.seq_len=16", f"finetune.data={data}",
      "finetune.pooling=first", "finetune.val_fraction=0.25"])
  assert not cfg.model.causal and cfg.train.objective == "masked_lm"  # the encoder, as trained
  ft.finetune(cfg, out, progress=False)
  val = [r for r in read_metrics(out) if r["split"] == "val"]
  assert val[-1]["step"] == 60 and val[-1]["accuracy"] > 0.8  # chance: 1/3
