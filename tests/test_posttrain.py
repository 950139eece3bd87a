"""Post-training with a second, frozen model: distillation (a teacher) and DPO (a reference),
from the small "ANIMAL KEY VALUE" run of test_finetune (its base answers KEY i with VALUE i + 3)."""
import math
import os
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ANIMALS, COMMON, KEYS, LORA, VALUES, run_cli, run_python, tiny_config,
                      write_jsonl)
from lmjax import finetune as ft
from lmjax import frozen as frozen_lib
from lmjax import train as train_lib
from lmjax.data import tasks
from lmjax.errors import ConfigError, DataError
from lmjax.losses import Forward
from lmjax.metrics import read_metrics
from lmjax.model import ModelConfig, Transformer

STUDENT = ["model.d_model=16", "model.num_heads=2", "model.mlp_dim=32", "model.num_layers=1",
           "model.vocab_size=512", "data.seq_len=32", "data.val_fraction=0.1",
           "data.num_workers=1", "train.steps=30", "train.eval_every=30",
           "train.checkpoint_every=10", "train.log_every=5", "optim.learning_rate=1e-2"]


def losses(workdir, split="train", key="loss"):
  return {r["step"]: r[key] for r in read_metrics(workdir) if r["split"] == split and key in r}


# --- distillation -------------------------------------------------------------------------------

def test_distill_chunk_matches_a_direct_computation():
  """CE and softened forward / reverse KL of one chunk against numpy, and chunked == one pass."""
  c = ModelConfig.create(d_model=8, num_heads=2, vocab_size=11, tie_embeddings=False)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  hs, ht = jax.random.normal(keys[0], (2, 7, 8)), jax.random.normal(keys[1], (2, 7, 8))
  ws, wt = jax.random.normal(keys[2], (8, 11)), jax.random.normal(keys[3], (8, 11)) * 2
  y = jax.random.randint(keys[4], (2, 7), 0, 11)
  log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  zs, zt = np.asarray(hs @ ws, np.float64), np.asarray(ht @ wt, np.float64)
  ce = -np.take_along_axis(log_softmax(zs), np.asarray(y)[..., None], -1)[..., 0]
  for kl, temperature in (("forward", 2.0), ("reverse", 0.5)):
    ps, pt = log_softmax(zs / temperature), log_softmax(zt / temperature)
    want = (np.exp(pt) * (pt - ps)).sum(-1) if kl == "forward" else (np.exp(ps) * (ps - pt)).sum(-1)
    one = lambda a, b, t: frozen_lib._distill_chunk(c, c, ws, wt, a, b, t, temperature, kl)
    got_ce, got_kl = one(hs, ht, y)
    np.testing.assert_allclose(got_ce, ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_kl, want, rtol=1e-4, atol=1e-6)
    from lmjax.losses import chunked
    for chunk in (3, 7):
      for a, b in zip(chunked(one, chunk, hs, ht, y), (got_ce, got_kl)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def distill(init_run, name, *overrides, stop_at_step=None):
  cfg = tiny_config(f"data.source=text:{init_run['root']}/corpus/*.txt", *STUDENT,
                    f"distill.teacher={init_run['init']}", *overrides)
  cfg = train_lib.with_teacher(cfg)
  out = str(init_run["root"] / name)
  return out, train_lib.train(cfg, out, progress=False, stop_at_step=stop_at_step)


@pytest.fixture(scope="module")
def distilled(init_run):
  return distill(init_run, "distilled", "distill.alpha=0.0", "distill.temperature=2.0")[0]


def test_distillation_learns_from_the_teacher_and_resumes_exactly(init_run, distilled):
  kl = losses(distilled, key="kl")
  assert kl[30] < kl[5] / 2  # the student moves toward the teacher's distributions
  val = losses(distilled, "val")
  assert np.isfinite(val[30]) and "bits_per_byte" in read_metrics(distilled)[-1]
  # stopped at 12 (not a checkpoint step: the stop saves) and resumed: the same losses
  interrupted, result = distill(init_run, "distilled_resumed", "distill.alpha=0.0",
                                "distill.temperature=2.0", stop_at_step=12)
  assert result["step"] == 12
  distill(init_run, "distilled_resumed", "distill.alpha=0.0", "distill.temperature=2.0")
  a, b = losses(distilled), losses(interrupted)
  assert sorted(a) == sorted(b) and all(a[s] == pytest.approx(b[s], rel=1e-6) for s in a)
  # the student is an ordinary run: generate reads it
  out = run_cli("generate", f"--workdir={distilled}", "--prompt=cat apple", "--max_new_tokens=2",
                "--temperature=0")
  assert out.returncode == 0, out.stderr[-2000:]


def test_distilling_on_a_mesh_across_devices_equals_one_device(init_run, distilled):
  """Teacher and student sharded on the same (fsdp=2, tensor=2) mesh of 4 devices: the losses
  of the run on 1 device."""
  sharded = run_python(f"""
  import json, sys
  sys.path.insert(0, "tests")
  from conftest import tiny_config
  from test_posttrain import STUDENT
  from lmjax import train as train_lib
  from lmjax.metrics import read_metrics
  cfg = tiny_config("data.source=text:{init_run['root']}/corpus/*.txt", *STUDENT,
                    "distill.teacher={init_run['init']}", "distill.alpha=0.0",
                    "distill.temperature=2.0", "mesh.fsdp=2", "mesh.tensor=2", "mesh.data=1")
  out = "{init_run['root']}/distilled_mesh"
  train_lib.train(train_lib.with_teacher(cfg), out, progress=False, stop_at_step=10)
  print(json.dumps([r["loss"] for r in read_metrics(out) if r["split"] == "train"]))
  """, devices=4)
  one = losses(distilled)
  assert sharded == pytest.approx([one[5], one[10]], rel=2e-4, abs=2e-4)


def test_a_teacher_of_another_vocabulary_or_no_run_is_refused(init_run, tmp_path):
  with pytest.raises(ConfigError, match="holds no trained run"):
    train_lib.with_teacher(tiny_config(f"distill.teacher={tmp_path / 'nothing'}"))
  cfg = tiny_config(f"data.source=text:{init_run['root']}/corpus/*.txt", *STUDENT,
                    "model.vocab_size=256", f"distill.teacher={init_run['init']}")
  with pytest.raises(ConfigError, match="vocabulary has 512 entries .* the student's 256"):
    train_lib.train(train_lib.with_teacher(cfg), str(tmp_path / "student"), progress=False)
  assert not (tmp_path / "student").exists()  # refused before anything was written
  other = tmp_path / "other.model"  # another tokenizer (here: the teacher's, one byte changed)
  data = bytearray(open(os.path.join(init_run["init"], "data", "tokenizer.model"), "rb").read())
  data[-1] ^= 1
  other.write_bytes(bytes(data))
  cfg = tiny_config(f"data.source=text:{init_run['root']}/corpus/*.txt", *STUDENT,
                    f"data.tokenizer={other}", f"distill.teacher={init_run['init']}")
  with pytest.raises(ConfigError, match="is not the teacher's"):
    train_lib.train(cfg, str(tmp_path / "student"), progress=False)


# --- DPO ----------------------------------------------------------------------------------------

def test_dpo_loss_equals_a_hand_computed_reference():
  """Two pairs in one row (segments 1-2 and 3-4) and one in another; fixed log-probabilities."""
  c = ModelConfig.create(d_model=8, num_heads=2, mlp_dim=16, num_layers=1, vocab_size=16,
                         max_len=8)
  forward = Forward(Transformer(c))
  params = nn.unbox(Transformer(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
      "params"])
  batch = {"inputs": jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0, 0, 0]]),
           "targets": jnp.asarray([[2, 3, 4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 0, 0, 0, 0]]),
           "weights": jnp.asarray([[0, 1, 0, 1, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0, 0, 0]], jnp.float32),
           "segments": jnp.asarray([[1, 1, 2, 2, 3, 3, 4, 4], [1, 1, 2, 2, 0, 0, 0, 0]]),
           "positions": jnp.asarray([[0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 0, 0, 0]])}
  from lmjax.losses import lm_losses
  nll, _ = lm_losses(forward, params, batch["inputs"], batch["targets"], batch["positions"],
                     batch["segments"])
  ref_params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  ref_nll, _ = lm_losses(forward, ref_params, batch["inputs"], batch["targets"],
                         batch["positions"], batch["segments"])
  ratio = np.asarray((ref_nll - nll) * batch["weights"], np.float64)  # log pi - log ref
  h = np.asarray([ratio[0, 0:2].sum() - ratio[0, 2:4].sum(), ratio[0, 4:6].sum() -
                  ratio[0, 6:8].sum(), ratio[1, 0:2].sum() - ratio[1, 2:4].sum()])
  beta = 0.3
  frozen = frozen_lib.Frozen(forward, ref_params)
  for kind, want in (("sigmoid", np.log1p(np.exp(-beta * h))),
                     ("ipo", (h - 1 / (2 * beta)) ** 2)):
    loss, sums = frozen_lib.preference_loss(forward, params, batch, None, True, frozen=frozen,
                                            beta=beta, kind=kind, max_segments=4)
    assert float(sums["tokens"]) == 3
    assert float(loss) == pytest.approx(want.sum(), rel=1e-4)
    assert float(sums["accuracy"]) == (h > 0).sum()
    assert float(sums["margin"]) == pytest.approx(beta * h.sum(), rel=1e-4, abs=1e-6)
  # the policy as its own reference: every margin 0, the DPO loss log 2 a pair
  loss, sums = frozen_lib.preference_loss(forward, params, batch, None, True,
                                          frozen=frozen_lib.Frozen(forward, params), beta=beta,
                                          kind="sigmoid", max_segments=4)
  assert float(loss) == pytest.approx(3 * math.log(2), rel=1e-5)


def preference_data(root, n=160, seed=0):
  """Prompts "ANIMAL KEY"; chosen " VALUE_KEY", rejected what the base model says (KEY + 3)."""
  rng = random.Random(seed)
  records = []
  for i in range(n):
    k = i % 8
    records.append({"prompt": f"{rng.choice(ANIMALS)} {KEYS[k]}", "chosen": f" {VALUES[k]}",
                    "rejected": f" {VALUES[(k + 3) % 8]}"})
  return write_jsonl(root / "prefs.jsonl", records)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_raises_held_out_preference_accuracy(init_run, lora):
  data = preference_data(init_run["root"])
  out = str(init_run["root"] / f"dpo_{'lora' if lora else 'full'}")
  overrides = [*COMMON, "train.steps=30", "train.eval_every=30", "finetune.task=dpo",
               f"finetune.data={data}", "finetune.val_fraction=0.2", "finetune.dpo_beta=0.5",
               *(LORA if lora else [])]
  cfg = ft.resolve_config("configs/finetune.py:sft", out, init_run["init"], overrides)
  result = ft.finetune(cfg, out, progress=False)
  val = result["val"]
  assert val["pairs"] == 32 and val["accuracy"] > 0.9 and val["margin"] > 0
  train = losses(out)
  assert train[30] < train[10] < math.log(2) + 1e-3
  # the export is a plain run
  outs = run_cli("generate", f"--workdir={out}", "--prompt=cat apple", "--max_new_tokens=1")
  assert outs.returncode == 0, outs.stderr[-2000:]


def test_bad_preference_files_are_refused(init_run, tmp_path):
  tokenizer = type("T", (), {"chat_template": "", "eos_id": 1,
                             "encode": lambda self, texts: [[5] * len(t) for t in texts]})()
  with pytest.raises(DataError, match="lacks rejected"):
    tasks.preference_pair({"prompt": "a", "chosen": "b"}, "f.jsonl, line 1", tokenizer)
  with pytest.raises(DataError, match="the same response"):
    tasks.preference_pair({"prompt": "a", "chosen": "b", "rejected": "b"}, "f.jsonl, line 2",
                          tokenizer)
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "y"}] * 4)
  cfg = ft.resolve_config("configs/finetune.py:sft", str(tmp_path / "out"), init_run["init"],
                          [*COMMON, "finetune.task=dpo", f"finetune.data={bad}"])
  with pytest.raises(DataError, match="bad.jsonl:1: \"chosen\" and \"rejected\" are the same"):
    ft.finetune(cfg, str(tmp_path / "out"), progress=False)
