"""muP (model.parametrization="mup"): the init, the per-layer learning rates, and the coordinate
check: activation changes stay flat across widths under mup and grow under sp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, tiny_config

from lmjax import mup
from lmjax import optim as optim_lib
from lmjax.errors import ConfigError


def test_mup_init_and_learning_rates():
  base = tiny_config("model.d_model=32", "model.num_heads=2", "model.mlp_dim=128")
  wide = tiny_config("model.d_model=128", "model.num_heads=8", "model.mlp_dim=512",
                     "model.parametrization=mup", "model.mup_base_width=32",
                     "optim.warmup_steps=0", "optim.grad_clip=0.0", "optim.weight_decay=0.0")
  params = build(wide).init().params
  layer = params["layer_0"]
  # hidden matrices: std 0.02 / sqrt(width_mult = 4); embeddings keep sp's 0.02
  assert np.std(layer["attn"]["query"]["kernel"]) == pytest.approx(0.01, rel=0.1)
  assert np.std(layer["mlp"]["up"]["kernel"]) == pytest.approx(0.01, rel=0.1)
  assert np.std(params["embed"]["embedding"]) == pytest.approx(0.02, rel=0.1)
  assert np.std(build(base).init().params["layer_0"]["mlp"]["up"]["kernel"]) == \
      pytest.approx(0.02, rel=0.1)
  # Adam's first update has size lr for every weight; mup divides the hidden ones by 4
  sp = wide.copy_and_resolve_references()
  sp.model.parametrization = "sp"
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates = {}
  for name, cfg in (("sp", sp), ("mup", wide)):
    opt = optim_lib.make_optimizer(cfg)
    updates[name], _ = opt.update(grads, opt.init(params), params)
  lr = wide.optim.learning_rate
  for path, u_mup in jax.tree_util.tree_leaves_with_path(updates["mup"]):
    u_sp = dict(jax.tree_util.tree_leaves_with_path(updates["sp"]))[path]
    expected = 4.0 if optim_lib.is_hidden_matrix(path) else 1.0
    np.testing.assert_allclose(np.asarray(u_sp), np.asarray(u_mup) * expected, rtol=1e-5)
  assert float(jnp.abs(updates["mup"]["layer_0"]["attn"]["out"]["kernel"]).max()) == \
      pytest.approx(lr / 4, rel=1e-3)
  with pytest.raises(ConfigError, match="mup_base_width"):
    tiny_config("model.parametrization=mup")


def test_coordinate_check_flat_under_mup_grows_under_sp():
  cfg = tiny_config("model.num_layers=1", "model.vocab_size=64", "data.seq_len=16",
                    "optim.learning_rate=1e-2", "model.head_dim=8")
  result = mup.coord_check(cfg, widths=(32, 64, 128), steps=3, batch_size=4)
  print(mup.format_table(result))
  sp, mu = result["slopes"]["sp"], result["slopes"]["mup"]
  hidden = ("layer_0.attn", "layer_0.mlp", "layer_0")
  # sp: a few Adam steps change hidden activations more the wider the model (slope ~1 or more)
  assert min(sp[name] for name in hidden) > 0.8 and sp["logits"] > 0.5
  # mup: about the same change at every width
  assert max(abs(slope) for slope in mu.values()) < 0.45
  assert abs(sp["embedding"]) < 0.2  # embeddings learn at the same rate in both


def test_hf_export_refuses_mup(tmp_path):
  from lmjax import config as config_lib
  from lmjax import hf
  cfg = tiny_config("model.parametrization=mup", "model.mup_base_width=16")
  (tmp_path / "config.json").write_text(config_lib.to_json(cfg))
  with pytest.raises(hf.ConversionError, match="muP"):
    hf.export_hf(str(tmp_path), str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()
