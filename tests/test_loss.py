"""The LM head and cross-entropy in chunks (model.loss_chunk): the same losses and gradients as
the whole-sequence pass, and less memory; the embedding gathered in the compute dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python, tiny_config
from lmjax import builder, losses
from lmjax import masking as masking_lib


def _loss_and_grads(cfg, objective, batch):
  run = builder.build(cfg, objective)
  params = run.init().params
  fn = lambda p: objective.loss(run.forward, p, batch, jax.random.PRNGKey(1), True)
  with run.context():
    (loss, sums), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return float(loss), jax.tree_util.tree_map(float, sums), grads


def _close(a, b):
  (la, sa, ga), (lb, sb, gb) = a, b
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)


TOKENS = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)


# 16 positions: chunks of 4 are whole, chunks of 5 leave a padded last one
@pytest.mark.parametrize("extra, chunk", [
    ([], 5),  # gpt2, tied head
    (["model.style=llama", "model.tie_embeddings=False"], 4),  # untied head
    (["model.parametrization=mup", "model.mup_base_width=16"], 5),  # logits / width_mult
])
def test_chunked_causal_lm_equals_the_whole_pass(extra, chunk):
  whole = tiny_config("model.loss_chunk=0", *extra)
  chunked = tiny_config(f"model.loss_chunk={chunk}", *extra)
  objective = losses.objective("causal_lm")
  batch = {"tokens": jnp.asarray(TOKENS)}
  _close(_loss_and_grads(chunked, objective, batch), _loss_and_grads(whole, objective, batch))


def test_chunked_masked_lm_and_sft_equal_the_whole_pass():
  masking = masking_lib.Masking(mask_id=63, random_vocab=63, prob=0.3, mask_fraction=0.8,
                                random_fraction=0.1)
  objective = losses.objective("masked_lm", masking=masking)
  batch = objective.prepare(jax.random.PRNGKey(0), {"tokens": jnp.asarray(TOKENS)})
  encoder = ["model.causal=False", "train.objective=masked_lm"]
  _close(_loss_and_grads(tiny_config("model.loss_chunk=3", *encoder), objective, batch),
         _loss_and_grads(tiny_config("model.loss_chunk=0", *encoder), objective, batch))
  rows = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
          "weights": (np.arange(16)[None] % 3 > 0).repeat(8, 0).astype(np.float32),
          "positions": np.tile(np.arange(16) % 8, (8, 1)).astype(np.int32),
          "segments": np.tile(np.arange(16) // 8 + 1, (8, 1)).astype(np.int32)}
  sft = losses.objective("sft")
  rows = jax.tree_util.tree_map(jnp.asarray, rows)
  _close(_loss_and_grads(tiny_config("model.loss_chunk=6"), sft, rows),
         _loss_and_grads(tiny_config("model.loss_chunk=0"), sft, rows))


def test_chunks_keep_the_logits_out_of_memory():
  """XLA's own buffer assignment on CPU: the chunked train step needs a fraction of the
  temporaries of the whole-sequence one at a 32k vocabulary."""
  result = run_python("""
      import json, jax
      from lmjax import bench, builder, config
      out = {}
      for chunk in (0, 128):
        cfg = config.get_config(None, ["model.num_layers=1", "model.d_model=64",
            "model.num_heads=2", "model.mlp_dim=128", "model.vocab_size=32768",
            "model.max_len=1024", "data.seq_len=1024", "train.batch_size=2",
            f"model.loss_chunk={chunk}"])
        run = builder.build(cfg, builder.pretraining_objective(cfg))
        compiled, _ = bench.compile_train_step(run, bench.synthetic_batch(run))
        out[chunk] = bench.xla_memory(compiled)["xla_temp_bytes"]
      print(json.dumps(out))
  """)
  logits = 2 * 1024 * 32768 * 4  # one float32 copy of the whole batch's logits: 256 MiB
  assert result["0"] > 2 * logits  # the whole pass keeps logits and their gradient
  assert result["128"] < result["0"] / 4


def test_the_embedding_is_gathered_in_the_compute_dtype():
  """FSDP over a TPU v5e-4 (the TPU compiler, AOT; XLA on CPU computes bfloat16 in float32, so it
  cannot show this), bfloat16 compute: every gather of the table moves bfloat16, not the
  float32 param."""
  pytest.importorskip("libtpu")
  import re
  from lmjax import aot
  cfg = tiny_config("model.num_layers=1", "model.d_model=256", "model.num_heads=2",
                    "model.mlp_dim=512", "model.vocab_size=4096", "model.max_len=128",
                    "data.seq_len=128", "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=4")
  run = builder.build(cfg, losses.objective("causal_lm"),
                      devices=aot.topology_devices(aot.parse_slice("v5e-4")))
  with run.context():
    lowered = run.jit_train_step().lower(run.abstract_state, aot.abstract_batch(run))
  # what lmjax asks for: the whole table, in bfloat16
  whole = re.findall(r"sharding_constraint .*<@mesh, \[\{\}, \{\}\]> : tensor<4096x256x(\w+)>",
                     lowered.as_text())
  assert whole and set(whole) == {"bf16"}, whole
  # and what the compiler does
  hlo = lowered.compile().as_text()
  gathers = re.findall(r"= ([a-z0-9]+)\[(?:4096,256|256,4096|1024,256)\][^ ]* all-gather\(", hlo)
  assert gathers and set(gathers) == {"bf16"}, gathers


# --- document masking in pretraining (data.packing="documents") ---------------------------------

EOS = 1


def test_documents_are_found_by_their_eos():
  inputs_BT = jnp.array([[5, 6, EOS, 7, EOS, EOS, 8, 9],
                         [EOS, 3, 4, 5, 6, 7, 8, 9]])
  positions_BT, segments_BT = losses.document_segments(inputs_BT, EOS)
  np.testing.assert_array_equal(positions_BT, [[0, 1, 2, 0, 1, 0, 0, 1],
                                               [0, 0, 1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(segments_BT, [[1, 1, 1, 2, 2, 3, 4, 4],
                                              [1, 2, 2, 2, 2, 2, 2, 2]])


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_each_document_in_a_window_has_its_loss_alone(attention):
  """A window of three eos-terminated documents: its loss is the sum of each document's loss as
  a row of its own, on the XLA attention and on splash (Pallas interpret mode; the rows alone,
  not multiples of 128, take the XLA attention); without document masking it is not."""
  rng = np.random.default_rng(3)
  docs = [rng.integers(2, 64, n).tolist() for n in (50, 41, 35)]
  window = sum((d + [EOS] for d in docs), [])  # 129 tokens: inputs and targets of 128
  cfg = tiny_config("model.style=llama", "model.tie_embeddings=False", "model.max_len=256",
                    f"model.attention={attention}", "data.seq_len=128")
  documents = losses.objective("causal_lm", eos_id=EOS)
  run = builder.build(cfg, documents)
  params = run.init().params

  def loss(tokens, objective):
    with run.context():
      total, sums = objective.loss(run.forward, params, {"tokens": jnp.asarray([tokens])}, None,
                                   True)
    return float(total), float(sums["tokens"])

  packed, scored = loss(window, documents)
  alone = [loss(d + [EOS], documents) for d in docs]
  assert scored == sum(n for _, n in alone) == sum(len(d) for d in docs)
  np.testing.assert_allclose(packed, sum(t for t, _ in alone), rtol=1e-5)
  # a document alone has no eos inside, so masking or not is the same loss there...
  plain = losses.objective("causal_lm")
  np.testing.assert_allclose([loss(d + [EOS], plain)[0] for d in docs], [t for t, _ in alone],
                             rtol=1e-5)
  # ... and in the window the plain loss sees across documents
  whole, _ = loss(window, plain)
  per_token_plain = whole / (len(window) - 1)
  assert abs(per_token_plain - packed / scored) > 1e-4


def test_document_packing_needs_documents_and_a_causal_lm():
  from lmjax.errors import ConfigError
  with pytest.raises(ConfigError, match="synthetic has none"):
    builder.pretraining_objective(tiny_config("data.packing=documents"))
  with pytest.raises(ConfigError, match="for train.objective=causal_lm"):
    builder.pretraining_objective(tiny_config("data.packing=documents", "data.source=pystdlib",
                                              "train.objective=masked_lm", "model.causal=False"))
