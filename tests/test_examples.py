"""examples/: the VAE, the GAN and the LSTM classifier learn (each test fails if training stops
doing anything), resume exactly, and refuse a workdir of another config."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)  # examples/ sits beside the package, run as `python -m examples.NAME.train`


def config(module, **changes):
  from lmjax import config as config_lib
  cfg = config_lib.load_config_file(module.CONFIG)
  return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in changes.items()])


def val_records(workdir):
  from lmjax import metrics
  return {r["step"]: r for r in metrics.read_metrics(workdir) if r["split"] == "val"}


def params_of(workdir, step):
  from lmjax import checkpoint, workdir as workdir_lib
  with checkpoint.open_checkpoints(workdir_lib.checkpoint_dir(str(workdir)), read_only=True) as c:
    return c.manager.restore(step).state["params"]


def test_vae_elbo_improves_and_a_resumed_run_matches(tmp_path):
  import jax
  from matplotlib.image import imread
  from examples.vae import train
  cfg = config(train, steps=200, eval_every=200, checkpoint_every=100, log_every=50)
  val = train.run(cfg, str(tmp_path / "straight"))
  start = val_records(tmp_path / "straight")[0]
  # the untrained decoder's pixels are near coin flips (64 log 2 = 44 nats); 200 steps: below 32
  assert start["negative_elbo"] > 40 and val["negative_elbo"] < 32, (start, val)
  assert val["reconstruction"] > 0 and val["kl"] > 1  # the latent is used
  assert imread(tmp_path / "straight" / "samples.png").shape[:2] == (364, 364)
  assert imread(tmp_path / "straight" / "reconstructions.png").shape[:2] == (364, 364)

  train.run(cfg, str(tmp_path / "resumed"), stop_at_step=100)
  assert not (tmp_path / "resumed" / "checkpoints" / "200").exists()
  resumed = train.run(cfg, str(tmp_path / "resumed"))
  assert resumed == val
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_of(tmp_path / "straight", 200),
                         params_of(tmp_path / "resumed", 200))


def test_an_example_refuses_a_workdir_of_another_config(tmp_path):
  from lmjax.errors import ConfigError
  from examples.vae import train
  workdir = str(tmp_path / "vae")
  train.run(config(train, steps=2, eval_every=2, checkpoint_every=2), workdir)
  before = sorted(os.listdir(workdir)), (tmp_path / "vae" / "config.json").read_text()
  with pytest.raises(ConfigError, match="changed: latent_dim"):
    train.run(config(train, steps=2, latent_dim=4), workdir)
  assert (sorted(os.listdir(workdir)), (tmp_path / "vae" / "config.json").read_text()) == before


def test_gan_samples_move_toward_the_digits(tmp_path):
  from examples.gan import train
  cfg = config(train, steps=800, eval_every=800, checkpoint_every=800, generator_lr=1e-3,
               discriminator_lr=1e-3, num_samples=300)
  val = train.run(cfg, str(tmp_path / "gan"))
  start = val_records(tmp_path / "gan")[0]
  # the untrained generator's grey blur is far from every digit and recognized as none
  assert start["nn_distance"] > 2.5 and start["digit_score"] < 1.5, start
  assert val["nn_distance"] < 0.7 * start["nn_distance"], (start, val)
  assert val["digit_score"] > 2.0, (start, val)
  assert val["real_nn_distance"] < val["nn_distance"]  # real digits still score better
  records = [json.loads(line) for line in open(tmp_path / "gan" / "metrics.jsonl")]
  assert {"discriminator_loss", "generator_loss", "d_real", "d_fake"} <= set(records[1])


def test_lstm_classifier_learns_on_finetunes_split(tmp_path, init_run):
  from lmjax import finetune
  from lmjax.data import tasks
  from examples.lstm_classifier import train
  cfg = config(train, data=init_run["cls"], tokenizer=init_run["init"], seq_len=16, steps=60,
               batch_size=16, eval_every=60, checkpoint_every=60, embed_dim=32, hidden_dim=32)
  # the same held-out examples as `lmjax finetune --config=configs/finetune.py:classification`
  ft = finetune.resolve_config(os.path.join(ROOT, "configs/finetune.py:classification"),
                               str(tmp_path / "ft"), init_run["init"],
                               [f"finetune.data={init_run['cls']}", "data.seq_len=16"])
  expected = tasks.load_task_data(ft).val
  data, _ = train.load_data(cfg)
  np.testing.assert_array_equal(data.val["inputs"], expected["inputs"])
  np.testing.assert_array_equal(data.val["labels"], expected["labels"])

  val = train.run(cfg, str(tmp_path / "lstm"))
  start = val_records(tmp_path / "lstm")[0]
  assert start["accuracy"] < 0.6 and val["accuracy"] > 0.9 and val["macro_f1"] > 0.9, (start, val)
  assert val["examples"] == len(expected["labels"])


def test_lstm_classifier_says_what_is_missing(tmp_path):
  from lmjax.errors import ConfigError
  from examples.lstm_classifier import train
  with pytest.raises(ConfigError, match="--config.data=FILE.jsonl"):
    train.run(config(train), str(tmp_path / "lstm"))
  assert not (tmp_path / "lstm").exists()
