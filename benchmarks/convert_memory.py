"""Peak host memory of `lmjax convert` (HF import, then export) of a ~1 GB model, for code trees.

  python benchmarks/convert_memory.py [--code DIR ...] [--layers 16] [--d_model 1536]

Writes a random Llama-style HF checkpoint (float32 safetensors + config.json; by default 8 layers,
d_model 1024, MLP 4096, vocabulary 32000, untied: 0.20B params, 0.74 GiB), then for
each `--code` tree runs, each in a fresh process on one CPU device, `lmjax convert --from_hf` into
a new workdir and `lmjax convert --to_hf` back out, and prints the peak resident memory of each
(the child's own ru_maxrss) next to the model's size, and the size of the imported checkpoint. On a CPU the devices are host memory too, so
the imported params (and the optimizer state an import writes) count: the baseline to compare is
the model's size, and the old tree's figure from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path: str, layers: int, d: int, mlp: int, vocab: int) -> int:
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  heads = d // 64
  tensors = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
             "lm_head.weight": (vocab, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    tensors.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                    p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
                    p + "mlp.down_proj.weight": (d, mlp)})
  arrays = {k: (0.02 * rng.standard_normal(s, np.float32)) for k, s in tensors.items()}
  save_file(arrays, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
            "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "torch_dtype": "float32"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return sum(a.nbytes for a in arrays.values())


CHILD = ("import resource, sys\nfrom lmjax import commands\nrc = commands.run(sys.argv[1:])\n"
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
         "sys.exit(rc)")


def peak_rss(code: str, args: list[str]) -> float:
  """Peak RSS (bytes) of the lmjax command ARGS, run from `code` in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=code)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=code, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{code}: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
  return int(proc.stdout.split("PEAK")[-1]) * 1024.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--code", action="append")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--mlp", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=32000)
  args = parser.parse_args()
  codes = args.code or [ROOT]
  with tempfile.TemporaryDirectory(prefix="lmjax_convert_") as tmp:
    size = write_checkpoint(f"{tmp}/hf", args.layers, args.d_model, args.mlp, args.vocab)
    print(f"model: {size / 2**30:.2f} GiB float32 ({size // 4 / 1e6:.0f}M params)")
    for k, code in enumerate(codes):
      imported = peak_rss(code, ["convert", f"--from_hf={tmp}/hf", f"--workdir={tmp}/run{k}"])
      on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                    os.walk(f"{tmp}/run{k}/checkpoints") for f in fs)
      print(f"{code}: import peak RSS {imported / 2**30:.2f} GiB = "
            f"{imported / size:.2f}x the model; checkpoint on disk {on_disk / 2**30:.2f} GiB = "
            f"{on_disk / size:.2f}x", flush=True)
      exported = peak_rss(code, ["convert", f"--to_hf={tmp}/out{k}", f"--workdir={tmp}/run{k}"])
      print(f"{code}: export peak RSS {exported / 2**30:.2f} GiB = "
            f"{exported / size:.2f}x the model", flush=True)


if __name__ == "__main__":
  main()
