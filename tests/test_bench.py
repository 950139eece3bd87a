"""`lmjax bench`, the memory estimate, the MFU formula, the model's memory-lean functions, and the
PyTorch baseline of benchmarks/ (no test here claims a speed: speeds are in BENCHMARKS.md)."""
import json
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY, build, run_cli, tiny_config

from lmjax import bench, memory, metrics
from lmjax.flops import flops_per_token
from lmjax.model import ModelConfig, Transformer
from lmjax.ops import attention, gelu, swiglu


def test_bench_cli_prints_table_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = run_cli("bench", "--config=configs/quickstart.py", "--config.data.source=synthetic",
                 *[f"--config.{o}" for o in TINY], "--steps=3", "--warmup=1", f"--json={out}",
                 env={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  for row in ("compile", "step time", "tokens/s", "MFU", "peak memory", "estimate / device",
              "loader"):
    assert row in proc.stdout
  r = json.loads(out.read_text())
  assert r["compile_seconds"] > 0 and r["steps"] == 3 and r["platform"] == "cpu"
  step = r["step_time_seconds"]
  assert 0 < step["min"] <= step["median"] <= step["max"]
  tokens_per_step = 8 * 16  # TINY: batch 8 x seq_len 16
  assert r["tokens_per_second"] == pytest.approx(tokens_per_step / step["median"])
  c = ModelConfig.from_config(tiny_config())
  assert r["flops_per_token"] == flops_per_token(c, 16)
  assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"] / r["peak_flops"])
  assert r["peak_memory_bytes"] > 0 and r["xla_total_bytes"] > 0
  e = r["estimate"]
  assert e["total"] == sum(e[k] for k in ("params", "optimizer", "gradients", "activations",
                                          "workspace"))
  assert e["params"] == 4 * r["num_params"]  # float32, one device
  assert r["loader_tokens_per_second"] > 0
  assert r["loader_over_training"] == pytest.approx(r["loader_tokens_per_second"] /
                                                    r["tokens_per_second"])


def test_flops_formula_by_hand():
  # GPT-2 124M at T=1024: 12 layers of 4 d^2 (attention) + 8 d^2 (MLP), the tied output
  # projection d V once, and 12 L T d for attention scores and values
  c = ModelConfig.create(style="gpt2", num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                  head_dim=64, mlp_dim=3072, vocab_size=50304, max_len=1024)
  n_matmul = 12 * 12 * 768**2 + 768 * 50304
  assert flops_per_token(c, 1024) == 6 * n_matmul + 12 * 12 * 1024 * 768
  # grouped-query attention: K and V projections shrink with the kv heads
  g = ModelConfig.create(style="llama", num_layers=1, d_model=64, num_heads=8, num_kv_heads=2,
                  head_dim=8, mlp_dim=128, vocab_size=100)
  assert flops_per_token(g, 32) == 6 * (64 * 8 * (16 + 4) + 3 * 64 * 128 + 64 * 100) + \
      12 * 32 * 8 * 8


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_flops_table(kind, peak):
  assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind,
                                                             platform="gpu")) == peak


def test_peak_flops_cpu_is_measured_and_unknown_is_nan():
  assert math.isnan(metrics.peak_flops_per_device(
      types.SimpleNamespace(device_kind="Mystery 9000", platform="gpu")))
  cpu = jax.devices("cpu")[0]
  assert 1e9 < metrics.peak_flops_per_device(cpu) < 1e15


@pytest.mark.parametrize("overrides", [
    ["model.scan_layers=true"],
    ["model.scan_layers=true", "model.remat=full"],
    ["model.style=llama", "model.num_kv_heads=2"],
])
def test_memory_estimate_matches_xla_buffer_assignment(overrides):
  """The estimate (params, optimizer, gradients and the model's traced residuals) against what
  XLA allocates for the compiled step on CPU, at a size where activations dominate."""
  cfg = tiny_config("model.num_layers=4", "model.d_model=128", "model.mlp_dim=384",
                    "model.max_len=64", "data.seq_len=64", "model.vocab_size=640",
                    "train.batch_size=32", *overrides)
  run = build(cfg)
  compiled, _ = bench.compile_train_step(run, bench.synthetic_batch(run))
  measured = bench.xla_memory(compiled)["xla_total_bytes"]
  estimate = memory.estimate_memory(cfg, 1)
  assert estimate["activations"] > estimate["params"] + estimate["optimizer"]
  assert 0.75 < estimate["total"] / measured < 1.3, (estimate, measured)


def test_memory_estimate_shards_and_remat():
  full = memory.estimate_memory(memory.ladder_config("1b", 8, remat="full"), 8)
  none = memory.estimate_memory(memory.ladder_config("1b", 8, remat="none"), 8)
  one = memory.estimate_memory(memory.ladder_config("1b", 1, remat="full"), 1)
  assert none["activations"] > 4 * full["activations"]
  assert full["params"] == pytest.approx(one["params"] / 8, rel=0.01)  # FSDP over 8
  assert full["optimizer"] == pytest.approx(2 * full["params"], rel=0.01)  # AdamW: mu, nu


def test_scan_keeps_the_program_size_flat():
  """Compile time follows the program XLA gets: with scan_layers it does not grow with depth
  (compile times themselves are in BENCHMARKS.md)."""
  def lowered_size(layers, scan):
    cfg = tiny_config(f"model.num_layers={layers}", f"model.scan_layers={scan}")
    run = build(cfg)
    with run.context():
      return len(run.jit_train_step().lower(run.abstract_state,
                                            bench.synthetic_batch(run)).as_text())

  assert lowered_size(24, True) < 1.05 * lowered_size(2, True)
  assert lowered_size(24, False) > 5 * lowered_size(2, False)


def test_attention_and_activations_equal_the_references():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 7, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
  segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]])
  pads = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], bool)
  same_segment = (segments[:, :, None] == segments[:, None, :])[:, None]
  for mask in (None, pads[:, None, None, :], same_segment):
    for causal in (True, False):
      def ours(q, k, v, mask=mask, causal=causal):
        return attention(q, k, v, mask, causal, 0.3)

      def reference(q, k, v, mask=mask, causal=causal):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=0.3,
                                            implementation="xla")
      np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-6)
      for g1, g2 in zip(jax.grad(lambda *a: (ours(*a) ** 2).sum(), (0, 1, 2))(q, k, v),
                        jax.grad(lambda *a: (reference(*a) ** 2).sum(), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g1, g2, atol=1e-5)
  x = jnp.linspace(-6, 6, 101)
  u = jnp.cos(x)
  np.testing.assert_allclose(gelu(x), nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: gelu(x).sum())(x),
                             jax.grad(lambda x: nn.gelu(x, approximate=True).sum())(x), atol=1e-6)
  np.testing.assert_allclose(swiglu(x, u), nn.silu(x) * u, atol=1e-6)
  for g1, g2 in zip(jax.grad(lambda a, b: (swiglu(a, b) ** 2).sum(), (0, 1))(x, u),
                    jax.grad(lambda a, b: ((nn.silu(a) * b) ** 2).sum(), (0, 1))(x, u)):
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)


def test_torch_baseline_is_the_same_model():
  """benchmarks/torch_gpt.py computes lmjax's GPT-2 function: same params, same logits."""
  torch = pytest.importorskip("torch")
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import torch_gpt
  finally:
    sys.path.pop(0)
  layers, d, heads, vocab, seq = 2, 32, 4, 64, 16
  cfg = tiny_config(f"model.max_len={seq}")
  model = Transformer(ModelConfig.from_config(cfg))
  tokens = np.random.default_rng(0).integers(0, vocab, (2, seq))
  params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.asarray(tokens))["params"])
  ours = model.apply({"params": params}, jnp.asarray(tokens))

  t = torch_gpt.GPT(layers, d, heads, vocab, seq, mlp_dim=64)
  assert torch_gpt.count_params(t) == sum(x.size for x in jax.tree_util.tree_leaves(params))
  w = lambda x: torch.tensor(np.asarray(x))
  state = {"embed.weight": w(params["embed"]["embedding"]), "pos_embed": w(params["pos_embed"]),
           "final_norm.weight": w(params["final_norm"]["scale"]),
           "final_norm.bias": w(params["final_norm"]["bias"])}
  for i in range(layers):
    p, b = params[f"layer_{i}"], f"blocks.{i}."
    a = p["attn"]
    state[b + "qkv.weight"] = w(np.concatenate([a[n]["kernel"].reshape(d, d).T
                                                for n in ("query", "key", "value")]))
    state[b + "qkv.bias"] = w(np.concatenate([a[n]["bias"].reshape(d)
                                              for n in ("query", "key", "value")]))
    state[b + "out.weight"] = w(a["out"]["kernel"].reshape(d, d).T)
    state[b + "out.bias"] = w(a["out"]["bias"])
    for norm in ("attn_norm", "mlp_norm"):
      state[b + norm + ".weight"] = w(p[norm]["scale"])
      state[b + norm + ".bias"] = w(p[norm]["bias"])
    for lin in ("up", "down"):
      state[b + lin + ".weight"] = w(p["mlp"][lin]["kernel"].T)
      state[b + lin + ".bias"] = w(p["mlp"][lin]["bias"])
  t.load_state_dict(state)
  with torch.no_grad():
    theirs = t(torch.tensor(tokens)).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)
