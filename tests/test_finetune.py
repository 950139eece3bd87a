"""`lmjax finetune`: SFT and classification, full and LoRA, from a small run trained in the test.

The init run is a tiny GPT pretrained (60 steps) on lines of "ANIMAL KEY VALUE" where KEY i is
followed by VALUE (i + 3) % 8. SFT teaches KEY i -> VALUE i instead, so the base gets the response
wrong and the test sees whether fine-tuning (full or LoRA) learned the new mapping. Classification
labels texts by the word group they are drawn from (fruit / color / animal: chance is 1/3).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (ANIMALS, COMMON, GROUPS, KEYS, LORA, STEPS, VALUES, run_cli,  # noqa: F401
                      run_python, tiny_config, write_jsonl)

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import finetune as ft
from lmjax import generate
from lmjax import losses as losses_lib
from lmjax import workdir as workdir_lib
from lmjax.classifier import load_classifier
from lmjax.data import tasks
from lmjax.errors import ConfigError, DataError
from lmjax.metrics import read_metrics
from lmjax.trees import flatten

def finetune_run(init_run, name, *overrides, stop_at_step=None):
  out = str(init_run["root"] / name)
  cfg = ft.resolve_config("configs/finetune.py:sft", out, init_run["init"],
                          COMMON + [f"finetune.data={init_run['sft']}", *overrides])
  return cfg, out, ft.finetune(cfg, out, progress=False, stop_at_step=stop_at_step)


@pytest.fixture(scope="module")
def sft_full(init_run):
  return finetune_run(init_run, "sft_full")


@pytest.fixture(scope="module")
def sft_lora(init_run):
  return finetune_run(init_run, "sft_lora", *LORA, "train.log_every=1")


def losses(workdir, split):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == split}


def greedy_responses(workdir):
  outs = generate.generate_text(workdir, [f"cat {k}" for k in KEYS], max_new_tokens=1,
                              temperature=0.0)
  return [o.strip() for o in outs]


def test_sft_learns_the_mapping_and_exports_a_plain_run(init_run, sft_full, tmp_path):
  _, out, result = sft_full
  assert result["exported"] == STEPS and result["data"]["train"]["rows"] < 86 / 4  # packed
  train, val = losses(out, "train"), losses(out, "val")
  assert sorted(val) == [30, STEPS] and val[STEPS] < 0.1 and train[STEPS] < train[10] / 10
  # the base answers KEY i with VALUE i + 3; the fine-tuned run (`lmjax generate` on the merged
  # export) with VALUE i
  assert greedy_responses(init_run["init"]) == VALUES[3:] + VALUES[:3]
  assert greedy_responses(out) == VALUES
  # the export is a plain run: eval on the init's corpus, and HF export, work on it
  index = os.path.join(init_run["init"], "data", "index.json")
  before = os.path.getmtime(index)
  _, run, params, _ = builder.load_params(out)
  from lmjax import evaluate as evaluate_lib
  lm = evaluate_lib.evaluate_split(run, out, run.jit_eval_step(), params)
  assert np.isfinite(lm["loss"]) and "bits_per_byte" in lm
  assert os.path.getmtime(index) == before  # the init's data was read, not rewritten
  from lmjax import hf
  written = hf.export_hf(out, str(tmp_path / "hf"))
  assert written["step"] == STEPS and os.path.isfile(written["weights"])
  assert {"checkpoints", "config.json", "finetune", "metrics.jsonl"} <= set(os.listdir(out))


def restore_finetune_state(cfg, out, num_classes=0):
  objective = losses_lib.objective(cfg.finetune.task, num_classes=num_classes,
                               pooling=cfg.finetune.pooling)
  run = builder.build(cfg, objective, builder.FromRun(cfg.finetune.init))
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(out, finetune_state=True),
                                 read_only=True) as checkpoints:
    state, _ = checkpoints.restore(None, run.abstract_state)
  return run, state


def restore_params(workdir, abstract):
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as c:
    return c.restore_params(None, abstract)


def init_params(cfg, run):
  return restore_params(cfg.finetune.init, run.abstract_state.params["model"])


def forward_rows(run, params, batch):
  return run.forward(params, batch["inputs"], batch["positions"], batch["segments"])


def test_lora_sft_starts_at_base_trains_only_adapters_and_merges_exactly(sft_lora):
  cfg, out, _ = sft_lora
  run, state = restore_finetune_state(cfg, out)
  base = init_params(cfg, run)
  batch = {k: jnp.asarray(v[:4]) for k, v in tasks.load_task_data(cfg).val.items()}
  model = run.model
  # step 0 (B = 0) computes exactly the base model
  start = run.init()
  base_logits = model.apply({"params": base}, batch["inputs"], batch["positions"],
                            segment_ids_BT=batch["segments"])
  np.testing.assert_array_equal(forward_rows(run, start.params, batch), base_logits)
  # only the adapters trained: the base is bit-identical, every B moved
  for a, b in zip(jax.tree_util.tree_leaves(state.params["model"]), jax.tree_util.tree_leaves(base)):
    np.testing.assert_array_equal(a, b)
  assert all(np.abs(np.asarray(b)).max() > 0 for path, b in flatten(state.params["lora"]).items()
             if path.endswith("/b"))
  size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  assert size(state.opt_state) <= 2 * size(state.params["lora"]) + 8  # none for the base
  # the merged export computes what the adapters compute
  merged = restore_params(out, run.abstract_state.params["model"])
  merged_logits = model.apply({"params": merged}, batch["inputs"], batch["positions"],
                              segment_ids_BT=batch["segments"])
  adapter_logits = forward_rows(run, state.params, batch)
  np.testing.assert_allclose(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(merged_logits - base_logits)).max() > 1.0
  # and it learned: the base answers VALUE i + 3, the fine-tuned model VALUE i
  train, val = losses(out, "train"), losses(out, "val")  # step 1's loss is the base model's
  assert train[1] > 5.0 and val[STEPS] < train[1] - 3.0 and val[STEPS] < val[30]
  assert greedy_responses(out) == VALUES


def test_resume_matches_the_uninterrupted_run(init_run, sft_lora):
  _, straight, _ = sft_lora
  lora = (*LORA, "train.log_every=1")
  _, out, first = finetune_run(init_run, "sft_lora_resumed", *lora, stop_at_step=20)
  assert first["step"] == 20 and first["exported"] is None
  assert not os.path.exists(os.path.join(out, "checkpoints"))  # no export before the end
  _, out, second = finetune_run(init_run, "sft_lora_resumed", *lora, stop_at_step=29)
  assert second["step"] == 29 and second["stopped_by"] == "stop_at_step=29"
  a, b = losses(straight, "train"), losses(out, "train")
  assert sorted(b) == list(range(1, 30))
  for step in b:  # the same batches, adapters, optimizer state and RNG after the restart
    assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_sharded_over_a_2x2x2_mesh_gives_the_same_losses(init_run, sft_lora):
  """Adapters, batches of row dicts and the frozen base on (data, fsdp, tensor) = (2, 2, 2)."""
  _, straight, _ = sft_lora
  out = str(init_run["root"] / "sft_lora_mesh")
  overrides = COMMON + LORA + ["train.log_every=1", f"finetune.data={init_run['sft']}",
                               "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  result = run_python(f"""
      import json
      from lmjax import finetune as ft
      cfg = ft.resolve_config("configs/finetune.py:sft", {out!r}, {init_run['init']!r},
                              {overrides!r})
      result = ft.finetune(cfg, {out!r}, progress=False, stop_at_step=12)
      print(json.dumps({{"devices": result["run"].mesh.devices.size}}))
      """, devices=8)
  assert result["devices"] == 8
  a, b = losses(straight, "train"), losses(out, "train")
  assert sorted(b) == list(range(1, 13))
  for step in b:
    assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step


@pytest.fixture(scope="module")
def cls_lora(init_run):
  out = str(init_run["root"] / "cls_lora")
  cfg = ft.resolve_config("configs/finetune.py:classification_lora", out, init_run["init"],
                          COMMON + LORA + [f"finetune.data={init_run['cls']}",
                                           "finetune.pooling=mean", "finetune.val_fraction=0.25"])
  return cfg, out, ft.finetune(cfg, out, progress=False)


def test_lora_classification_learns_and_the_exported_classifier_matches(init_run, cls_lora):
  cfg, out, _ = cls_lora
  val = [r for r in read_metrics(out) if r["split"] == "val"]
  assert val[-1]["examples"] == 60 and val[-1]["accuracy"] > 0.8 and val[-1]["macro_f1"] > 0.8
  run, state = restore_finetune_state(cfg, out, num_classes=3)
  for a, b in zip(jax.tree_util.tree_leaves(state.params["model"]),
                  jax.tree_util.tree_leaves(init_params(cfg, run))):
    np.testing.assert_array_equal(a, b)
  classifier = load_classifier(out)
  assert classifier.labels == ["animal", "color", "fruit"] and classifier.pooling == "mean"
  with open(init_run["cls"]) as f:
    records = [json.loads(line) for line in f]
  texts = [r["text"] for r in records[:16]]
  rows = tasks.encode_classification(texts, classifier.tokenizer, cfg.data.seq_len)
  adapter_logits = losses_lib.class_logits(run.forward, state.params, rows, "mean")
  np.testing.assert_allclose(classifier.logits(texts), adapter_logits, rtol=1e-4, atol=1e-4)
  predicted = classifier.predict([r["text"] for r in records])
  assert np.mean([p == r["label"] for p, r in zip(predicted, records)]) > 0.8


def test_classification_from_the_command_line(init_run):
  out = init_run["root"] / "cls_cli"
  args = ["finetune", "--config=configs/finetune.py:classification", f"--workdir={out}",
          *[f"--config.{o}" for o in COMMON], f"--config.finetune.data={init_run['cls']}",
          "--config.finetune.val_fraction=0.25", "--config.train.steps=40", "--no_progress"]
  proc = run_cli(*args, f"--init={init_run['init']}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 40: val loss" in proc.stdout and "macro-F1" in proc.stdout
  val = [r for r in read_metrics(out) if r["split"] == "val"]
  assert [r["step"] for r in val] == [30, 40] and val[-1]["accuracy"] > 0.8
  assert (out / "classifier.npz").exists() and (out / "checkpoints" / "40").exists()
  # rerunning with the workdir alone (its config.json) finds it finished
  cfg = ft.resolve_config(None, str(out))
  assert cfg.finetune.init == init_run["init"] and cfg.train.steps == 40
  result = ft.finetune(cfg, str(out), progress=False)
  assert result["step"] == 40 and result["exported"] == 40 and not result["train"]


def test_starts_from_a_converted_hugging_face_checkpoint(tmp_path):
  """`lmjax convert --from_hf` -> LoRA SFT of a Llama (GQA, SwiGLU gate, scanned layers)."""
  pytest.importorskip("transformers")
  from test_hf import _write_tokenizer, make_hf_model, save

  from lmjax import hf
  hf_dir = save(make_hf_model("llama_gqa"), tmp_path / "hf")
  _write_tokenizer(hf_dir / "tokenizer.model")
  hf.import_hf(str(hf_dir), str(tmp_path / "run"), config_overrides=["model.scan_layers=True"])
  data = write_jsonl(tmp_path / "sft.jsonl", [
      {"prompt": f"x = {i}", "response": f" y = {i + 1}"} for i in range(24)])
  out = str(tmp_path / "out")
  cfg = ft.resolve_config("configs/finetune.py:sft_lora", out, str(tmp_path / "run"), [
      "data.seq_len=32", "train.batch_size=4", "train.steps=4", "train.eval_every=4",
      "train.log_every=1", "finetune.lora_targets=query,value,gate,down", f"finetune.data={data}"])
  result = ft.finetune(cfg, out, progress=False)
  assert result["exported"] == 4 and np.isfinite(result["val"]["loss"])
  run, state = restore_finetune_state(cfg, out)
  assert set(flatten(state.params["lora"])) == {
      f"layers/{m}/{n}/{x}" for m, n in (("attn", "query"), ("attn", "value"), ("mlp", "gate"),
                                         ("mlp", "down")) for x in "ab"}
  _, plain, exported, _ = builder.load_params(out)
  batch = {k: jnp.asarray(v) for k, v in tasks.load_task_data(cfg).val.items()}
  np.testing.assert_allclose(
      plain.model.apply({"params": exported}, batch["inputs"], batch["positions"],
                        segment_ids_BT=batch["segments"]),
      forward_rows(run, state.params, batch), rtol=1e-4, atol=1e-4)


def test_packed_examples_do_not_see_each_other():
  """The loss of each example is the same packed with others as alone."""
  from lmjax.model import ModelConfig, Transformer
  model = Transformer(ModelConfig.from_config(tiny_config("data.seq_len=32")))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  examples = [(list(rng.integers(4, 64, n)), [False] * p + [True] * (n - p))
              for n, p in ((20, 4), (15, 2), (12, 9), (9, 1))]
  packed, stats = tasks.pack_sft(examples, 32)
  alone = [tasks.pack_sft([e], 32)[0] for e in examples]
  assert stats["rows"] == 2 and packed["segments"].max() == 2

  @jax.jit
  def nll(rows):
    logits = model.apply({"params": params}, rows["inputs"], rows["positions"],
                         segment_ids_BT=rows["segments"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), rows["targets"][..., None], -1)[..., 0]

  def per_example(rows):
    nll_BT = np.asarray(nll({k: rows[k] for k in ("inputs", "positions", "segments", "targets")}))
    nll_BT = nll_BT * rows["weights"]
    return [nll_BT[r][rows["segments"][r] == s].sum() for r in range(len(nll_BT))
            for s in range(1, rows["segments"][r].max() + 1)]

  packed_losses = sorted(per_example(packed))
  alone_losses = sorted(v for rows in alone for v in per_example(rows))
  assert len(packed_losses) == len(alone_losses) == 4
  np.testing.assert_allclose(packed_losses, alone_losses, rtol=1e-5)
  # a bidirectional encoder's pooled features ignore padding too
  enc = Transformer(ModelConfig.from_config(tiny_config("model.causal=False",
                                                        "train.objective=masked_lm")))

  class Tokenizer:  # a stand-in: ids are given
    eos_id = 3

    def encode(self, texts):
      return [[int(t) for t in text.split()] for text in texts]

  texts = ["5 9 17 33", "40 41 42 43 44 45 46"]
  @jax.jit
  def pooled(rows):
    hidden = enc.apply({"params": params}, rows["inputs"], rows["positions"],
                       segment_ids_BT=rows["segments"], return_hidden=True)
    return [losses_lib.pool(hidden, rows["segments"], p) for p in ("mean", "last", "first")]

  short, long = (tasks.encode_classification(texts, Tokenizer(), t) for t in (12, 32))
  # a text that does not fit with its eos is counted as cut
  assert tasks.encode_classification(texts, Tokenizer(), 7)["truncated"].tolist() == [False, True]
  assert not long.pop("truncated").any() and short.pop("truncated").tolist() == [False, False]
  np.testing.assert_allclose(pooled(short), pooled(long), rtol=1e-5, atol=1e-6)


def test_data_formats():
  class Tokenizer:  # no chat template: lmjax's plain format
    chat_template = ""

  segments, eos_after_response = tasks.sft_segments({"messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
      {"role": "assistant", "content": "Bye!"}]}, "x:1", Tokenizer())
  assert eos_after_response and segments == [("system: Be brief.\n", False), ("user: Hi\n", False),
                      ("assistant: ", False), ("Hello", True), ("user: Bye\n", False),
                      ("assistant: ", False), ("Bye!", True)]
  assert tasks.best_fit([5, 3, 8, 2, 9, 1], 10) == [[4, 5], [2, 3], [0, 1]]
  ids, names = tasks.classification_labels([("x", {"text": "a", "label": s}) for s in "bab"], 0)
  assert (ids, names) == ([1, 0, 1], ["a", "b"])
  assert tasks.classification_labels([("x", {"text": "a", "label": i}) for i in (2, 0)], 4) == (
      [2, 0], ["0", "1", "2", "3"])
  # classes 0, 1, 2: F1 = 2TP / (2TP + FP + FN) = 2/5, 2/4, 0
  assert losses_lib.macro_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0, 0])) == pytest.approx(
      (2 / 5 + 2 / 4 + 0) / 3)


def fake_init(init, where, **model_changes):
  """A copy of the init run's config with other model keys (checks run before any restore)."""
  with open(os.path.join(init, "config.json")) as f:
    saved = json.load(f)
  saved["model"].update(model_changes)
  saved["data"]["tokenizer"] = os.path.join(init, "data", "tokenizer.model")
  saved["train"]["objective"] = "causal_lm" if saved["model"].get("causal", True) else "masked_lm"
  os.makedirs(os.path.join(where, "checkpoints", "0"))
  with open(os.path.join(where, "config.json"), "w") as f:
    json.dump(saved, f)
  return str(where)


def test_bad_inputs_are_refused_before_any_work(init_run, tmp_path):
  base = ["finetune.data=" + init_run["sft"], "data.seq_len=32"]
  out = str(tmp_path / "out")

  def resolve(*overrides, init=init_run["init"], spec="configs/finetune.py:sft"):
    return ft.resolve_config(spec, out, init, base + list(overrides))

  with pytest.raises(ConfigError, match="needs --init"):
    resolve(init="")
  with pytest.raises(ConfigError, match="no run there"):
    resolve(init=str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match="same directory"):
    ft.resolve_config("configs/finetune.py:sft", init_run["init"], init_run["init"], base)
  with pytest.raises(ConfigError, match=r"drop model.d_model=64 \(--init has 32\)"):
    resolve("model.d_model=64")
  with pytest.raises(ConfigError, match="finetune.lora_targets must name"):
    resolve("finetune.lora_rank=4", "finetune.lora_targets=query,gate")
  with pytest.raises(DataError, match="finetune.data=.*does not exist"):
    resolve("finetune.data=" + str(tmp_path / "missing.jsonl"))
  with pytest.raises(ConfigError, match="Vocabulary mismatch: .* 400 pieces .*vocab_size=256"):
    resolve(init=fake_init(init_run["init"], tmp_path / "small", vocab_size=256))
  with pytest.raises(ConfigError, match="needs a causal LM"):
    resolve(init=fake_init(init_run["init"], tmp_path / "encoder", causal=False))
  # jsonl problems name the line, before anything is written
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
  with pytest.raises(DataError, match=r"bad.jsonl:2: an SFT example needs \"prompt\" and "):
    ft.finetune(resolve("finetune.data=" + bad), out)
  bad = write_jsonl(tmp_path / "bad_cls.jsonl", [{"text": "a", "label": 1}, {"txt": "b"}])
  with pytest.raises(DataError, match=r"bad_cls.jsonl:2: a classification example needs"):
    ft.finetune(resolve("finetune.data=" + bad, spec="configs/finetune.py:classification"), out)
  with open(tmp_path / "broken.jsonl", "w") as f:
    f.write('{"prompt": "a", "response": "b"}\n{"prompt": \n')
  with pytest.raises(DataError, match="broken.jsonl:2: not valid JSON"):
    ft.finetune(resolve("finetune.data=" + str(tmp_path / "broken.jsonl")), out)
  assert not os.path.exists(out)
  # a workdir holding another fine-tuning is refused
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text(config_lib.to_json(resolve()))
  cfg = config_lib.ConfigDict(resolve().to_dict())
  cfg.finetune.task = "classification"
  with pytest.raises(ConfigError, match="holds another run"):
    ft.finetune(cfg, str(other))
  assert os.listdir(other) == ["config.json"]
