"""`lmjax prune`: importance finds what does nothing, the slicing keeps the function exactly, and
the pruned run is an ordinary run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from lmjax import builder, commands
from lmjax import checkpoint as ckpt_lib
from lmjax import prune as prune_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError
from test_posttrain import preference_data


def saved_run(cfg, workdir, params):
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(str(workdir))) as checkpoints:
    checkpoints.save_params(0, params)
  workdir_lib.write_config(cfg, str(workdir))


def layer_of(params, c, i):
  return jax.tree_util.tree_map(lambda x: x[i], params["layers"]) if c.scan_layers else (
      params[f"layer_{i}"])


def set_layer(params, c, i, layer):
  if c.scan_layers:
    params["layers"] = jax.tree_util.tree_map(lambda s, x: s.at[i].set(x), params["layers"], layer)
  else:
    params[f"layer_{i}"] = layer


def silence(params, c, dead_groups, dead_channels, dead_layer):
  """Params whose KV groups `dead_groups`, MLP channels `dead_channels` (every layer) and whole
  layer `dead_layer` contribute nothing: their values, activations or outputs are zero."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  for i in range(c.num_layers):
    layer = jax.tree_util.tree_map(lambda x: x, layer_of(params, c, i))
    value = layer["attn"]["value"]
    for g in dead_groups:  # a group whose values are 0 outputs 0 from all its query heads
      value["kernel"] = value["kernel"].at[:, g].set(0.0)
      if "bias" in value:
        value["bias"] = value["bias"].at[g].set(0.0)
    first = layer["mlp"]["gate" if c.style == "llama" else "up"]  # gelu(0) = 0; silu(0) * up = 0
    for f in dead_channels:
      first["kernel"] = first["kernel"].at[:, f].set(0.0)
      if "bias" in first:
        first["bias"] = first["bias"].at[f].set(0.0)
    if i == dead_layer:  # a block that adds nothing to its input
      for name in (("attn", "out"), ("mlp", "down")):
        part = layer[name[0]][name[1]]
        part["kernel"] = jnp.zeros_like(part["kernel"])
        if "bias" in part:
          part["bias"] = jnp.zeros_like(part["bias"])
    set_layer(params, c, i, layer)
  return params


@pytest.mark.parametrize("style", ["gpt2", "llama_gqa_scanned"])
def test_pruning_removes_exactly_what_does_nothing(tmp_path, style):
  extra = (["model.style=llama", "model.num_kv_heads=2", "model.scan_layers=True"]
           if style != "gpt2" else [])
  cfg = tiny_config("data.source=synthetic", "model.num_layers=3", *extra)
  c = cfg.model
  run = builder.build(cfg, builder.pretraining_objective(cfg))
  params = silence(run.init().params, c, dead_groups=[1], dead_channels=[3, 10, 40],
                   dead_layer=1)
  saved_run(cfg, tmp_path / "full", params)
  group = c.num_heads // c.num_kv_heads
  target = f"heads={c.num_heads - group},mlp={c.mlp_dim - 3},layers=2"
  out = prune_lib.prune(str(tmp_path / "full"), str(tmp_path / "small"), target, 2)
  kept = out["kept"]
  assert kept["layers"] == [0, 2]
  assert all(1 not in groups for groups in kept["groups"].values())
  assert all(not {3, 10, 40} & set(ch) for ch in kept["channels"].values())
  _, small, small_params, step = builder.load_params(str(tmp_path / "small"))
  assert step == 0 and small.model.cfg.num_heads == c.num_heads - group
  assert small.model.cfg.head_dim == c.head_dim and small.num_params < run.num_params
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, c.vocab_size)
  full_logits = run.model.apply({"params": params}, tokens)
  small_logits = small.model.apply({"params": small_params}, tokens)
  np.testing.assert_allclose(small_logits, full_logits, atol=2e-5, rtol=1e-5)
  if style != "gpt2":  # HF Llama holds any head_dim (HF GPT-2 ties it to d_model / heads)
    from lmjax import hf
    assert hf.export_hf(str(tmp_path / "small"), str(tmp_path / "hf"))["step"] == 0


def test_bad_targets_are_refused(tmp_path):
  c = tiny_config("model.style=llama", "model.num_kv_heads=2").model  # 4 heads in 2 groups
  with pytest.raises(ConfigError, match="must be a multiple of 2"):
    prune_lib.parse_target("heads=3", c)
  with pytest.raises(ConfigError, match="between 1 and the model's 64"):
    prune_lib.parse_target("mlp=100", c)
  with pytest.raises(ConfigError, match="is not NAME=SIZE"):
    prune_lib.parse_target("width=8", c)
  cfg = tiny_config("mesh.tensor=4")
  with pytest.raises(ConfigError, match="do not divide mesh.tensor=4"):
    prune_lib.check_mesh(cfg, {"heads": 2, "mlp": 64, "layers": 2})
  result = run_cli("prune", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}",
                   "--target=heads=2")
  assert result.returncode != 0 and "config" in result.stderr.lower()
  assert not (tmp_path / "out").exists()


def test_a_pruned_text_run_is_an_ordinary_run(init_run, tmp_path):
  """Pruned from a run trained on text: eval, generate, export, fine-tuning and distillation
  from the unpruned run all take it."""
  root, run = tmp_path, init_run
  small = str(root / "small")
  out = run_cli("prune", f"--workdir={run['init']}", f"--out={small}",
                "--target=mlp=32,layers=1", "--calibration_batches=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "before pruning" in out.stdout
  from lmjax import generate, hf
  assert np.isfinite(prune_lib.evaluate(small)["loss"])  # as lmjax eval
  assert len(generate.generate_text(small, ["cat apple"], max_new_tokens=2)) == 1
  assert hf.export_hf(small, str(root / "hf"))["step"] == 0
  for args in (["distill", f"--workdir={small}", f"--teacher={run['init']}",
                "--config.train.steps=4", "--config.train.eval_every=4", "--no_progress"],
               ["finetune", "--config=configs/finetune.py:sft", f"--workdir={root / 'dpo'}",
                f"--init={small}", "--config.finetune.task=dpo", "--config.train.steps=2",
                "--config.data.seq_len=32", "--config.train.batch_size=8",
                f"--config.finetune.data={preference_data(root)}", "--no_progress"]):
    assert commands.run(args) == 0, args  # in this process: the CLI itself ran prune above
  assert (root / "hf" / "config.json").exists()
  assert "distill" in open(root / "small" / "config.json").read()
