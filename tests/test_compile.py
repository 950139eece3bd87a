"""`lmjax compile`: AOT compilation for a TPU slice on this CPU machine, with the real TPU compiler
(libtpu, in the test extra), and what it reports."""
import json
import math

import jax
import pytest

from lmjax import aot, builder, commands
from lmjax import config as config_lib
from lmjax.errors import ConfigError, LmjaxError
from lmjax.memory import GiB

libtpu = pytest.importorskip("libtpu", reason="lmjax compile needs libtpu (Linux x86-64)")

TINY = ["model.style=llama", "model.num_layers=2", "model.d_model=512", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=1024", "model.vocab_size=512", "data.seq_len=256",
        "model.max_len=256", "train.batch_size=8", "model.dtype=bfloat16", "model.scan_layers=True"]


def small(*extra):
  return config_lib.get_config(None, TINY + list(extra))


@pytest.mark.parametrize("name, generation, layout, chips", [
    ("v5p-64", "v5p", "2x4x4", 32), ("v5p-8", "v5p", "2x2x1", 4), ("v4-32", "v4", "2x2x4", 16),
    ("v5e-16", "v5e", "4x4", 16), ("v6e-8", "v6e", "2x4", 8), ("v5p:4x4x4", "v5p", "4x4x4", 64),
    ("V5E-4", "v5e", "2x2", 4)])
def test_slice_names_as_cloud_tpu_gives_them(name, generation, layout, chips):
  s = aot.parse_slice(name)
  assert (s.generation, s.layout, s.chips) == (generation, layout, chips)


@pytest.mark.parametrize("name, says", [("v5p-12", "v5p-8, v5p-16"), ("v7-8", "Unknown TPU slice"),
                                        ("v5e:2x2x1", "2 dimensions"), ("a100", "v5p-64")])
def test_unknown_slices_are_refused_with_the_choices(name, says):
  with pytest.raises(ConfigError, match=says):
    aot.parse_slice(name)


def test_slice_devices_are_one_per_chip_and_span_slices():
  devices = aot.topology_devices(aot.parse_slice("v5p-16"))  # 8 chips, megacore
  assert len(devices) == 8 and devices[0].platform == "tpu" and "v5" in devices[0].device_kind
  two = aot.topology_devices(aot.parse_slice("v5e-4", num_slices=2))
  assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}


HLO = """HloModule m

%loop_body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]) parameter(0)
  %ar = f32[16]{0} all-reduce(%x), channel_id=7, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[16]) tuple(%i, %ar)
}

%loop_cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]) parameter(0)
  %c = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[8,4]) -> f32[16] {
  %ag-start = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(%x), channel_id=1, dimensions={0}
  %ag-done = bf16[8,4]{1,0} all-gather-done(%ag-start)
  %w = (s32[], f32[16]) while(%init), condition=%loop_cond, body=%loop_body
  ROOT %rs = f32[4]{0} reduce-scatter(%y), channel_id=9, dimensions={0}, to_apply=%add
}
"""


def test_collectives_are_counted_per_execution_with_loop_trips():
  got = aot.collectives(HLO)
  assert got["all-reduce"] == {"count": 12, "bytes": 12 * 16 * 4}  # in the loop body, 12 trips
  assert got["all-gather"] == {"count": 1, "bytes": 8 * 4 * 2}  # the async pair once, its result
  assert got["reduce-scatter"] == {"count": 1, "bytes": 16}
  assert set(got) == {"all-reduce", "all-gather", "reduce-scatter"}


def _state_bytes_per_chip(run) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(run.abstract_state))


def test_compile_reports_the_compilers_memory_and_collectives():
  """The train step's arguments are the state's shard on each chip (plus the batch's rows), the
  donated state comes back in place, and FSDP over 4 chips shows its gathers and reductions."""
  cfg = small("mesh.data=1", "mesh.fsdp=4")
  r = aot.compile_run(cfg, aot.parse_slice("v5e-4"), ("train", "eval", "decode"))
  assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r["hbm_bytes_per_chip"] == 16 * GiB
  train = r["steps"]["train"]
  mem = train["memory"]
  run = builder.build(cfg, builder.pretraining_objective(cfg), devices=aot.topology_devices(
      aot.parse_slice("v5e-4")))
  state = _state_bytes_per_chip(run)
  batch = cfg.train.batch_size // 4 * (cfg.data.seq_len + 1) * 4
  assert state < mem["arguments"] <= 1.1 * (state + batch) + 64 * 1024  # TPU tiles pad a little
  assert mem["aliased"] >= 0.9 * state  # the donated state is written over
  assert mem["total"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
  assert train["fits"] and train["headroom_bytes"] == 16 * GiB - mem["total"]
  assert train["collectives"]["all-gather"]["count"] >= 1  # FSDP gathers the weights
  assert {"all-reduce", "reduce-scatter"} & set(train["collectives"])  # and reduces the grads
  assert r["steps"]["eval"]["memory"]["total"] < mem["total"]
  assert r["steps"]["decode"]["batch_size"] == 4 and r["steps"]["decode"]["memory"]["total"] > 0
  assert "train step: compiled in" in aot.format_report(r)


def test_a_config_too_big_for_the_slice_is_short_by_what_the_compiler_says():
  cfg = small("model.d_model=2048", "model.num_heads=16", "model.num_kv_heads=16",
             "model.mlp_dim=8192", "model.num_layers=8", "model.vocab_size=32000",
             "data.seq_len=2048", "model.max_len=2048", "train.batch_size=16", "mesh.data=4",
             "mesh.fsdp=1")
  r = aot.compile_run(cfg, aot.parse_slice("v5e-4"), ("train",))
  train = r["steps"]["train"]
  assert not train["fits"] and train["memory"] is None
  oom = train["out_of_memory"]
  assert 15 * GiB < oom["available"] <= 16 * GiB and oom["needed"] > oom["available"]
  assert train["headroom_bytes"] == oom["available"] - oom["needed"]
  assert f"short by {-train['headroom_bytes'] / GiB:.2f} GiB" in aot.format_report(r)
  # and the estimate agrees it does not fit
  assert r["estimate"]["total"] > 16 * GiB


def test_the_compilers_out_of_memory_words_are_read():
  assert aot.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                           "required for HLO temporaries (31.21G) exceeds available HBM "
                           "(15.75G).") == {"needed": int(31.21 * GiB),
                                            "available": int(15.75 * GiB),
                                            "counted": "temporaries"}
  assert aot.out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                           "memory in memory space hbm. Used 20.5G of 15.48G hbm.")["needed"] == \
      int(20.5 * GiB)
  assert aot.out_of_memory("INVALID_ARGUMENT: something else") is None


def test_multislice_meshes_span_slices_over_dcn():
  cfg = small("mesh.data=2", "mesh.fsdp=4", "mesh.dcn_data=2")
  r = aot.compile_run(cfg, aot.parse_slice("v5e-4", num_slices=2), ("train",))
  assert r["chips"] == 8 and r["num_slices"] == 2 and r["steps"]["train"]["fits"]
  with pytest.raises(ConfigError, match="devices form 1 slices"):
    aot.compile_run(small("mesh.data=2", "mesh.fsdp=4", "mesh.dcn_data=2"),
                    aot.parse_slice("v5e-8"), ("train",))


def test_a_mesh_that_does_not_fit_the_slice_is_the_usual_error():
  with pytest.raises(LmjaxError, match="4 is not a multiple of 3"):
    aot.compile_run(small("mesh.tensor=3", "mesh.fsdp=-1", "mesh.data=1"), aot.parse_slice("v5e-4"), ("train",))


def test_the_command_prints_the_report_and_writes_json(tmp_path, capsys):
  out = tmp_path / "compile.json"
  assert commands.run(["compile", "--topology=v6e-4", "--steps=train", f"--json={out}",
                       *[f"--config.{o}" for o in TINY]]) == 0
  printed = capsys.readouterr().out
  assert "v6e-4 (v6e:2x2, 1 slice(s)): 4 chips" in printed and "fits" in printed
  result = json.loads(out.read_text())
  assert set(result["steps"]) == {"train"} and result["steps"]["train"]["memory"]["total"] > 0
  with pytest.raises(ConfigError, match="v5p-8, v5p-16"):
    commands.run(["compile", "--topology=v5p-12", "--steps=train"])
