import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.flops import count_params, flops_per_token
from lmjax.model import ModelConfig, Transformer

GPT = ModelConfig.create(style="gpt2", num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8,
                  mlp_dim=64, vocab_size=50, max_len=16)
LLAMA = ModelConfig.create(style="llama", num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, vocab_size=50, max_len=16, tie_embeddings=False)
TOKENS = jnp.array(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)


def init(cfg):
  boxed = Transformer(cfg).init(jax.random.PRNGKey(0), TOKENS)["params"]
  return boxed, nn.unbox(boxed)


def test_styles_have_their_parts():
  _, gpt = init(GPT)
  _, llama = init(LLAMA)
  assert "pos_embed" in gpt and "head" not in gpt and "bias" in gpt["layer_0"]["attn"]["query"]
  assert "bias" in gpt["layer_0"]["attn_norm"] and "gate" not in gpt["layer_0"]["mlp"]
  assert "pos_embed" not in llama and "head" in llama
  assert "bias" not in llama["layer_0"]["attn"]["query"] and "bias" not in llama["final_norm"]
  assert "gate" in llama["layer_0"]["mlp"]
  assert llama["layer_0"]["attn"]["key"]["kernel"].shape == (32, 2, 8)  # GQA: 2 kv heads
  assert llama["layer_0"]["attn"]["query"]["kernel"].shape == (32, 4, 8)


def test_every_param_has_logical_axis_names():
  for cfg in (GPT, LLAMA, LLAMA.__class__(**{**LLAMA.__dict__, "scan_layers": True})):
    boxed, _ = init(cfg)
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for spec, leaf in zip(jax.tree_util.tree_leaves(specs, is_leaf=lambda x: x is None),
                          jax.tree_util.tree_leaves(nn.unbox(boxed))):
      assert len(spec) == leaf.ndim and all(name for name in spec)


def test_causal():
  _, params = init(LLAMA)
  model = Transformer(LLAMA)
  logits = model.apply({"params": params}, TOKENS)
  changed = TOKENS.at[:, 8:].set(0)
  logits2 = model.apply({"params": params}, changed)
  np.testing.assert_allclose(logits[:, :8], logits2[:, :8], atol=1e-6)
  assert not np.allclose(logits[:, 8:], logits2[:, 8:])


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_scan_equals_unrolled(cfg):
  _, params = init(cfg)
  scan_cfg = cfg.__class__(**{**cfg.__dict__, "scan_layers": True})
  layers = [params[f"layer_{i}"] for i in range(cfg.num_layers)]
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *layers)
  a = Transformer(cfg).apply({"params": params}, TOKENS)
  b = Transformer(scan_cfg).apply({"params": stacked}, TOKENS)
  np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_keeps_the_gradients(remat):
  _, params = init(LLAMA)

  def grads(cfg):
    loss = lambda p: Transformer(cfg).apply({"params": p}, TOKENS).mean()
    return jax.grad(loss)(params)

  reference = grads(LLAMA)
  got = grads(LLAMA.__class__(**{**LLAMA.__dict__, "remat": remat}))
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_with_float32_params():
  cfg = LLAMA.__class__(**{**LLAMA.__dict__, "dtype": "bfloat16"})
  _, params = init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  low = Transformer(cfg).apply({"params": params}, TOKENS)
  high = Transformer(LLAMA).apply({"params": params}, TOKENS)
  assert low.dtype == jnp.float32  # logits are returned in float32 for the loss
  np.testing.assert_allclose(low, high, atol=0.05)


def test_flops_per_token_formula():
  # GPT-2 124M at T=1024: 6 * (85M layer params + 38.6M head) + 12 * 12 * 1024 * 768
  cfg = ModelConfig.create(style="gpt2", num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                    head_dim=64, mlp_dim=3072, vocab_size=50304, max_len=1024)
  matmul = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50304
  assert flops_per_token(cfg, 1024) == 6 * matmul + 12 * 12 * 1024 * 768
  assert matmul == pytest.approx(123.6e6, rel=1e-3)
  params = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                                                 TOKENS)["params"]))
  assert count_params(params) == pytest.approx(124.5e6, rel=1e-3)
