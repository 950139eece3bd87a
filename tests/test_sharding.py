"""Meshes: the same losses on any mesh; shards of the sizes the rules promise; clear errors."""
import pytest

from conftest import run_python, tiny_config
from lmjax import sharding as sharding_lib
from lmjax.errors import ConfigError

LOSSES = """
import json, jax
from conftest import tiny_config
from lmjax import train as train_lib
import tempfile
out = {}
for mesh in MESHES:
  cfg = tiny_config("train.steps=4", "train.checkpoint_every=100", "model.d_model=64",
                    "model.num_heads=4", "model.mlp_dim=128", "model.vocab_size=128",
                    f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}")
  with tempfile.TemporaryDirectory() as workdir:
    train_lib.train(cfg, workdir, progress=False)
    from lmjax.metrics import read_metrics
    out[str(mesh)] = [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]
print(json.dumps(out))
"""


def test_meshes_give_the_same_losses():
  import os
  prelude = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
  eight = run_python(prelude + LOSSES.replace("MESHES", "[(2, 2, 2)]"), 8)
  one = run_python(prelude + LOSSES.replace("MESHES", "[(1, 1, 1)]"), 1)
  reference = one["(1, 1, 1)"]
  assert len(reference) == 4 and reference[-1] < reference[0]
  for mesh, losses in eight.items():
    assert losses == pytest.approx(reference, rel=2e-5, abs=2e-5), mesh


SHARDS = """
import sys, json, jax
sys.path.insert(0, TESTS)
from conftest import build, tiny_config
cfg = tiny_config("model.d_model=64", "model.num_heads=4", "model.mlp_dim=128",
                  "model.vocab_size=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
state = build(cfg).init()
shard = lambda x: list(x.addressable_shards[0].data.shape)
p = state.params
mu = state.opt_state[1][0].mu  # clip, then adamw's (scale_by_adam, ...)
print(json.dumps({"query": shard(p["layer_0"]["attn"]["query"]["kernel"]),
                  "up": shard(p["layer_0"]["mlp"]["up"]["kernel"]),
                  "down": shard(p["layer_0"]["mlp"]["down"]["kernel"]),
                  "embed": shard(p["embed"]["embedding"]),
                  "norm": shard(p["layer_0"]["attn_norm"]["scale"]),
                  "mu_up": shard(mu["layer_0"]["mlp"]["up"]["kernel"])}))
"""


def test_shards_have_the_promised_shapes():
  import os
  out = run_python(SHARDS.replace("TESTS", repr(os.path.dirname(__file__))), 8)
  # embed -> fsdp (2), heads / mlp / vocab -> tensor (2)
  assert out["query"] == [32, 2, 16]  # [D/fsdp, N/tensor, H]
  assert out["up"] == [32, 64]  # [D/fsdp, F/tensor]
  assert out["down"] == [64, 32]
  assert out["embed"] == [64, 32]  # [V/tensor, D/fsdp]
  assert out["norm"] == [64]  # replicated
  assert out["mu_up"] == out["up"]  # optimizer state is split like its param


def test_mesh_must_fit_devices():
  cfg = tiny_config("mesh.data=3")
  with pytest.raises(ConfigError, match="3 devices, but 1 are available"):
    sharding_lib.mesh_shape(cfg, 1)
  with pytest.raises(ConfigError, match="not a multiple of 3"):
    sharding_lib.mesh_shape(tiny_config("mesh.tensor=3"), 8)
  assert sharding_lib.mesh_shape(tiny_config("mesh.fsdp=2", "mesh.tensor=2"), 8) == (2, 2, 2)


def test_multi_slice_settings_are_checked():
  code = f"""
import sys, json; sys.path.insert(0, {__import__('os').path.dirname(__file__)!r})
from conftest import tiny_config
from lmjax import sharding
try:
  sharding.make_mesh(tiny_config("mesh.dcn_data=2"))
except Exception as e:
  print(json.dumps({{"error": str(e)}}))
"""
  assert "dcn_data x dcn_fsdp x dcn_tensor = 2, but the devices form 1 processes" in run_python(
      code, 2)["error"]
  with pytest.raises(ConfigError, match="mesh.dcn_tensor=3 must be a positive divisor of the "
                                        "tensor axis"):
    sharding_lib.dcn_shape(tiny_config("mesh.tensor=4", "mesh.dcn_tensor=3"), (1, 1, 4))


def test_dimensions_that_do_not_divide_are_a_clear_error():
  code = f"""
import sys, json; sys.path.insert(0, {__import__('os').path.dirname(__file__)!r})
from conftest import build, tiny_config
from lmjax.errors import ConfigError
try:
  build(tiny_config("model.num_heads=3", "model.head_dim=8", "mesh.tensor=2"))
  print(json.dumps({{"error": None}}))
except ConfigError as e:
  print(json.dumps({{"error": str(e)}}))
"""
  out = run_python(code, 2)
  assert "cannot be split" in out["error"] and "not divisible by 2" in out["error"]


RESHARD = """
import sys, json, jax, numpy as np
sys.path.insert(0, TESTS)
from conftest import tiny_config
from lmjax import builder
from lmjax import train as train_lib
from lmjax.metrics import read_metrics
common = ("train.steps=6", "train.checkpoint_every=3", "model.d_model=64", "model.mlp_dim=128",
          "model.vocab_size=128")
out = {"devices": jax.device_count()}
if MODE == "first":
  train_lib.train(tiny_config(*common, "mesh.data=8"), WORKDIR + "/reference", progress=False)
  train_lib.train(tiny_config(*common, "mesh.data=8"), WORKDIR + "/moved", progress=False,
                  stop_at_step=3)
  _, _, params, _ = builder.load_params(WORKDIR + "/moved")
  out["params"] = float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree_util.tree_leaves(params)))
else:
  mesh = ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2") if MODE == "fsdp_tensor" else ("mesh.data=-1",)
  _, _, params, _ = builder.load_params(WORKDIR + "/moved", overrides=mesh)
  out["params"] = float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree_util.tree_leaves(params)))
  out["query_shard"] = list(params["layer_0"]["attn"]["query"]["kernel"].addressable_shards[0].data.shape)
  train_lib.train(tiny_config(*common, *mesh), WORKDIR + "/moved", progress=False)
  losses = lambda d: [r["loss"] for r in read_metrics(d) if r["split"] == "train"]
  out["reference"], out["moved"] = losses(WORKDIR + "/reference"), losses(WORKDIR + "/moved")
print(json.dumps(out))
"""


# (restoring onto fewer devices: test_multihost's 2-process checkpoint restored on 1 device)
@pytest.mark.parametrize("mode,devices", [("fsdp_tensor", 8)])
def test_restore_onto_another_mesh(tmp_path, mode, devices):
  import os
  code = RESHARD.replace("TESTS", repr(os.path.dirname(__file__))).replace(
      "WORKDIR", repr(str(tmp_path)))
  first = run_python(code.replace("MODE", "'first'"), 8)
  moved = run_python(code.replace("MODE", repr(mode)), devices)
  assert moved["devices"] == devices
  assert moved["params"] == pytest.approx(first["params"], rel=1e-6)  # the same params restored
  if mode == "fsdp_tensor":
    assert moved["query_shard"] == [16, 2, 16]  # now split 4 ways by fsdp and 2 by tensor
  assert len(moved["moved"]) == 6  # 3 steps on the old mesh, 3 on the new one
  assert moved["moved"] == pytest.approx(moved["reference"], rel=1e-4, abs=1e-4)


SPLIT = """
import sys, json, math, jax
sys.path.insert(0, TESTS)
from conftest import build, tiny_config
cfg = tiny_config("model.d_model=64", "model.num_heads=8", "model.mlp_dim=128",
                  "model.vocab_size=128", *MESH)
state = build(cfg).init()
def fractions(tree):
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if getattr(x, "ndim", 0):
      out[jax.tree_util.keystr(path)] = x.addressable_shards[0].data.size / x.size
  return out
print(json.dumps({"params": fractions(state.params), "opt": fractions(state.opt_state)}))
"""


@pytest.mark.parametrize("axis", ["tensor", "fsdp"])
def test_each_device_holds_its_fraction(axis):
  import os
  mesh = ("mesh.data=1", f"mesh.{axis}=8")
  out = run_python(SPLIT.replace("TESTS", repr(os.path.dirname(__file__))).replace(
      "MESH", repr(mesh)), 8)
  params, opt = out["params"], out["opt"]
  if axis == "tensor":  # attention and MLP weights: 1/8 each
    matrices = [k for k in params if ("attn" in k or "mlp" in k) and "kernel" in k]
    assert len(matrices) == 2 * (4 + 2) and all(params[k] == 1 / 8 for k in matrices)
  else:  # fsdp: every weight matrix and its Adam moments split 8 ways
    matrices = [k for k in params if "kernel" in k or "embed" in k]
    assert all(params[k] == 1 / 8 for k in matrices), params
    moments = [k for k in opt if "kernel" in k or "embed" in k]
    assert len(moments) == 2 * len(matrices) and all(opt[k] == 1 / 8 for k in moments)


README_RULES = """
import json, re, sys
sys.path.insert(0, TESTS)
from conftest import ROOT, build, tiny_config
from lmjax.errors import ConfigError
readme = open(ROOT + "/README.md").read()
rules = re.search(r'--config.mesh.rules="([^"]+)"', readme).group(1)
out = {}
for name, extra in [("readme", [f"mesh.rules={rules}"]),
                    ("bare", ["mesh.rules=(('batch', 'data'), ('embed', 'fsdp'))"])]:
  run = build(tiny_config("mesh.data=2", *extra))
  out[name] = list(run.batch_shardings["tokens"].spec)
try:
  build(tiny_config("mesh.rules=(('batch', 'dta'),)"))
except ConfigError as e:
  out["error"] = str(e)
print(json.dumps(out))
"""


def test_every_documented_rule_form_builds():
  """The README's mesh.rules example (bare mesh-axis strings such as ('batch', 'data')) builds a
  run whose batches split over that axis; a rule naming no mesh axis is a clear error."""
  import os
  out = run_python(README_RULES.replace("TESTS", repr(os.path.dirname(__file__))), 2)
  assert out["readme"] == out["bare"] == ["data", None]
  assert "maps 'batch' to 'dta'" in out["error"] and "data, fsdp, tensor" in out["error"]
