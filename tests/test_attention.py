"""Attention kernels: splash (TPU, Pallas; here in interpret mode and AOT-compiled for a TPU
topology) and cuDNN (NVIDIA GPUs; its arguments traced here) against lmjax's XLA attention,
and what model.attention=auto picks."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lmjax import builder, losses, ops
from lmjax.model import ModelConfig, resolve_attention

RNG = np.random.default_rng(0)
B, T, N, K, H = 2, 256, 4, 2, 64  # grouped-query: 2 query heads per key/value head


def _qkv(dtype=jnp.float32):
  return [jnp.asarray(RNG.normal(size=(B, T, heads, H)), dtype) for heads in (N, K, K)]


PACKED = jnp.asarray(np.concatenate([np.full((B, 100), 1), np.full((B, 120), 2),
                                     np.zeros((B, 36))], 1), jnp.int32)  # two examples + pads


def _reference(q, k, v, segments, causal):
  mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
  return ops.attention(q, k, v, mask, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [None, PACKED])
def test_splash_equals_the_reference_forward_and_backward(causal, segments):
  q, k, v = _qkv()
  splash = lambda q, k, v: ops.splash_attention(q, k, v, segments, causal=causal, interpret=True)
  reference = lambda q, k, v: _reference(q, k, v, segments, causal)
  np.testing.assert_allclose(splash(q, k, v), reference(q, k, v), atol=2e-5)
  cotangent = jnp.asarray(RNG.normal(size=(B, T, N, H)), jnp.float32)
  loss = lambda f: lambda *a: (f(*a) * cotangent).sum()
  for got, want in zip(jax.grad(loss(splash), (0, 1, 2))(q, k, v),
                       jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_the_model_with_splash_equals_xla_attention_on_a_mesh():
  """The whole model, packed rows, on 1 device: splash (interpret) and XLA attention give the
  same loss and gradients through the SFT objective."""
  rows = {"inputs": jnp.asarray(RNG.integers(1, 64, (2, 128)), jnp.int32),
          "targets": jnp.asarray(RNG.integers(1, 64, (2, 128)), jnp.int32),
          "weights": jnp.ones((2, 128)), "positions": jnp.tile(jnp.arange(128) % 64, (2, 1)),
          "segments": jnp.tile(jnp.arange(128) // 64 + 1, (2, 1))}

  def grads(attention):
    cfg = tiny_config("model.style=llama", "model.num_heads=4", "model.num_kv_heads=2",
                      "data.seq_len=128", "model.max_len=128", f"model.attention={attention}")
    run = builder.build(cfg, losses.objective("sft"))
    params = run.init().params
    with run.context():
      return jax.grad(lambda p: losses.sft_loss(run.forward, p, rows, None, True)[0])(params)
  for a, b in zip(jax.tree_util.tree_leaves(grads("splash")), jax.tree_util.tree_leaves(grads("xla"))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_auto_picks_the_kernel_of_the_devices():
  c = ModelConfig.create(attention="auto", dtype="bfloat16")
  assert resolve_attention(c, _device("tpu", "TPU v5 lite")).attention == "splash"
  assert resolve_attention(c, _device("gpu", "NVIDIA H100 80GB HBM3")).attention == "cudnn"
  assert resolve_attention(c, _device("gpu", "AMD Instinct MI300X")).attention == "xla"
  assert resolve_attention(c, _device("cpu", "cpu")).attention == "xla"
  fp32 = dataclasses.replace(c, dtype="float32")  # cuDNN flash attention is 16-bit only
  assert resolve_attention(fp32, _device("gpu", "NVIDIA H100")).attention == "xla"
  assert resolve_attention(dataclasses.replace(c, attention="xla"),
                           _device("tpu", "TPU v4")).attention == "xla"  # a choice stays


def test_packed_rows_become_cudnn_segment_lengths_and_offsets():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  lengths, offsets = ops.segments_as_lengths(segments)
  assert lengths.tolist() == [[3, 2] + [-1] * 6, [8] + [-1] * 7]
  assert offsets.tolist() == [[0, 3, 5] + [-1] * 6, [0, 8] + [-1] * 7]


def test_the_gpu_path_passes_lengths_not_a_dense_mask(monkeypatch):
  """What cuDNN gets, traced on CPU: packed rows as per-segment lengths and offsets, and no
  [B, 1, T, S] tensor anywhere in the program."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  seen = {}

  def stand_in(q, k, v, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
               kv_offsets=None, *, scale=1.0, mask_type=None, **_):
    seen.update(mask=mask, bias=bias, q_seqlen=q_seqlen, q_offsets=q_offsets,
                mask_type=mask_type)
    return q
  monkeypatch.setattr(cudnn, "dot_product_attention", stand_in)
  q, k, v = _qkv(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda q, k, v: ops.cudnn_attention(q, k, v, PACKED, causal=True))(q, k, v)
  assert seen["mask"] is None and seen["bias"] is None
  assert seen["q_seqlen"].shape == (B, T) and seen["q_offsets"].shape == (B, T + 1)
  assert seen["mask_type"] == cudnn.MaskType.CAUSAL
  shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
  assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (T, T)], "a T x S tensor was built"
  lengths, offsets = ops.segments_as_lengths(PACKED)
  assert lengths[0, :3].tolist() == [100, 120, -1] and offsets[0, :4].tolist() == [0, 100, 220, -1]


def test_the_model_routes_cudnn_through_the_kernel(monkeypatch):
  calls = []
  monkeypatch.setattr("lmjax.model.cudnn_attention",
                      lambda q, k, v, seg, *, causal, scale: calls.append(seg) or
                      ops.attention(q, k, v, None, causal))
  cfg = tiny_config("model.attention=cudnn", "model.dtype=bfloat16")
  run = builder.build(cfg, losses.objective("causal_lm"))
  segments = jnp.ones((2, 16), jnp.int32)
  calls.clear()  # building traced the model without segments
  with run.context():
    jax.eval_shape(lambda p: run.forward(p, jnp.zeros((2, 16), jnp.int32), None, segments),
                   run.abstract_state.params)
  assert calls and all(seg is not None and seg.shape == (2, 16) for seg in calls)


def _tpu_devices():
  pytest.importorskip("libtpu")
  from lmjax import aot
  return aot, aot.topology_devices(aot.parse_slice("v5e-4"))


def test_splash_compiles_for_tpu_and_saves_the_scores():
  """AOT for a v5e-4 (the real TPU compiler): auto takes splash (a Pallas TPU custom call in the
  program) and, at 4k tokens, needs a fraction of the XLA attention's temporaries."""
  aot, devices = _tpu_devices()
  temps = {}
  for attention in ("auto", "xla"):
    cfg = tiny_config("model.style=llama", "model.num_layers=1", "model.d_model=256",
                      "model.num_heads=2", "model.mlp_dim=512", "model.vocab_size=512",
                      "data.seq_len=4096", "model.max_len=4096", "train.batch_size=4",
                      "model.dtype=bfloat16", f"model.attention={attention}", "mesh.data=4")
    run = builder.build(cfg, losses.objective("causal_lm"), devices=devices)
    with run.context():
      compiled = run.jit_train_step().lower(run.abstract_state, aot.abstract_batch(run)).compile()
    temps[run.model.cfg.attention] = compiled.memory_analysis().temp_size_in_bytes
    if attention == "auto":
      assert run.model.cfg.attention == "splash"
      assert "tpu_custom_call" in compiled.as_text()
  assert temps["splash"] < temps["xla"] / 4, temps
