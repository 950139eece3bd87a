"""The README's memory table: per-chip memory of shipped configs' train steps on TPU slices, from
the TPU compiler (`lmjax compile`, libtpu on this CPU machine), next to lmjax's own estimate.

  python benchmarks/tpu_memory.py [--slices v5e-8,v5p-8,...] [--models gpt2.py:124m,...]
      [--rows_per_chip 2] [--remats none,dots_no_batch,full] [--json out.json]
      [--config.KEY=VALUE ...]
  python benchmarks/tpu_memory.py --slices v5p-8 --models llama.py:1b --rows_per_chip 1 \
      --seq_lens 4096,8192,16384,32768 --config.model.remat=dots_no_batch \
      --variants "xla, full logits:model.attention=xla,model.loss_chunk=0;splash, chunked:"

Every model trains with its config's defaults (dtype, scan, remat, attention, loss) and FSDP over
all chips; the global batch is rows_per_chip x chips sequences of the config's seq_len. A cell is
the compiler's total per chip (arguments + outputs not written over donated arguments +
temporaries) and whether it fits the chip's HBM, then the estimate in brackets. With --remats,
each model gets a row per remat policy (how the configs' remat defaults were chosen); with
--rows_per_chip 0, each config's own global batch is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmjax import aot  # noqa: E402
from lmjax import config as config_lib  # noqa: E402
from lmjax.memory import GiB  # noqa: E402

SLICES = "v5e-8,v5e-16,v6e-8,v5p-8,v5p-64"
MODELS = "gpt2.py:124m,gpt2.py:350m,gpt2.py:774m,gpt2.py:1.5b,llama.py:1b,llama.py:7b"


def measure(model: str, slice_name: str, rows_per_chip: int, overrides=()) -> dict:
  s = aot.parse_slice(slice_name)
  chips = s.chips
  batch = [f"train.batch_size={rows_per_chip * chips}"] if rows_per_chip else []
  cfg = config_lib.get_config(os.path.join(ROOT, "configs", model), [
      *batch, "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", *overrides])
  start = time.perf_counter()
  r = aot.compile_run(cfg, s, ("train",))
  train = r["steps"]["train"]
  total = train["memory"]["total"] if train["memory"] else None
  return {"model": model, "slice": slice_name, "chips": chips, "seq_len": cfg.data.seq_len,
          "batch_size": cfg.train.batch_size, "remat": cfg.model.remat,
          "attention": cfg.model.attention, "fits": train["fits"],
          "compiler_total_bytes": total, "out_of_memory": train.get("out_of_memory"),
          "estimate_bytes": r["estimate"]["total"], "hbm_bytes": s.hbm_bytes,
          "seconds": time.perf_counter() - start}


def cell(m: dict) -> str:
  est = f"est {m['estimate_bytes'] / GiB:.1f}"
  if m["compiler_total_bytes"] is None:
    oom = m["out_of_memory"] or {}
    need = oom.get("needed")
    return f"✗ > {need / GiB:.1f} ({est})" if need else f"✗ ({est})"
  mark = "✓" if m["fits"] else "✗"
  return f"{mark} {m['compiler_total_bytes'] / GiB:.1f} ({est})"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--slices", default=SLICES)
  p.add_argument("--models", default=MODELS)
  p.add_argument("--rows_per_chip", type=int, default=2)
  p.add_argument("--remats", default="", help="a row per remat policy (default: the config's)")
  p.add_argument("--json", default=None)
  p.add_argument("--seq_lens", default="", help="a row per data.seq_len (with --variants)")
  p.add_argument("--variants", default="", help="columns NAME:KEY=VALUE,...;NAME:... ")
  args, rest = p.parse_known_args()
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  if args.seq_lens:
    return sweep(args, overrides)
  slices, models = args.slices.split(","), args.models.split(",")
  remats = [r for r in args.remats.split(",") if r] or [None]
  results = []
  for model in models:
    for remat in remats:
      for name in slices:
        extra = overrides + ([f"model.remat={remat}"] if remat else [])
        m = measure(model, name, args.rows_per_chip, extra)
        results.append(m)
        print(f"{model} (remat {m['remat']}) on {name}, batch {m['batch_size']}: {cell(m)} GiB "
              f"per chip, {m['seconds']:.0f} s", file=sys.stderr, flush=True)
  header = "| model (seq, remat) | " + " | ".join(
      f"{n} ({aot.parse_slice(n).hbm_bytes // GiB} GiB)" for n in slices) + " |"
  lines = [header, "| --- |" + " ---: |" * len(slices)]
  for model in models:
    for remat in remats:
      row = [m for m in results if m["model"] == model and (remat is None or m["remat"] == remat)]
      lines.append(f"| {model} ({row[0]['seq_len']}, {row[0]['remat']}) | " +
                   " | ".join(cell(m) for m in row) + " |")
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


def sweep(args, overrides):
  """Rows: model x data.seq_len on the first slice; columns: the variants' overrides."""
  name = args.slices.split(",")[0]
  variants = [v.split(":", 1) for v in args.variants.split(";") if v.strip()]
  variants = [(n.strip(), [kv for kv in o.split(",") if kv]) for n, o in variants]
  lines = [f"| model, {name} ({aot.parse_slice(name).hbm_bytes // GiB} GiB) | seq | " +
           " | ".join(n for n, _ in variants) + " |", "| --- | ---: |" + " ---: |" * len(variants)]
  results = []
  for model in args.models.split(","):
    for seq in [int(t) for t in args.seq_lens.split(",")]:
      row = []
      for vname, extra in variants:
        m = measure(model, name, args.rows_per_chip, [*overrides, f"data.seq_len={seq}",
                                                      f"model.max_len={seq}", *extra])
        results.append({**m, "variant": vname})
        row.append(cell(m))
        print(f"{model} seq {seq} {vname} on {name}: {cell(m)} GiB per chip, "
              f"{m['seconds']:.0f} s", file=sys.stderr, flush=True)
      lines.append(f"| {model} | {seq} | " + " | ".join(row) + " |")
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
