"""Ahead-of-time compilation for a TPU slice this machine does not have (`lmjax compile`).

With `libtpu` installed, JAX compiles for a named TPU topology on any Linux x86-64 machine, CPU
only: `jax.experimental.topologies.get_topology_desc` gives compile-only devices, the run is
built on a mesh of them exactly as on the slice, and the real TPU compiler plans the train, eval
and decode steps. What it reports is the compiler's own: per-chip memory (arguments, outputs,
temporaries), compile time, and the collectives in the compiled HLO. As MaxText's
train_compile.py, but for lmjax's own steps.

Slices are named as Cloud TPU names them: v4-N and v5p-N count TensorCores (2 per chip, one
megacore device per chip), v5e-N and v6e-N count chips. A layout ("v5p:2x4x4") works as well.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import builder
from lmjax import decode as decode_lib
from lmjax.errors import ConfigError, LmjaxError
from lmjax.memory import GiB, estimate_memory

GENERATIONS = {  # generation: (HBM per chip, TensorCores per device-count unit, dimensions)
    "v4": (32 * GiB, 2, 3),
    "v5p": (95 * GiB, 2, 3),
    "v5e": (16 * GiB, 1, 2),
    "v6e": (32 * GiB, 1, 2),
}
# chip layouts of the standard slices (Cloud TPU's): chips -> layout
LAYOUTS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
LAYOUTS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given, e.g. "v5p-64"
  generation: str  # v4 | v5p | v5e | v6e
  layout: str  # chips per dimension, e.g. "2x4x4"
  num_slices: int

  @property
  def chips(self) -> int:
    return math.prod(int(x) for x in self.layout.split("x")) * self.num_slices

  @property
  def hbm_bytes(self) -> int:
    return GENERATIONS[self.generation][0]


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """"v5p-64" (TensorCores for v4/v5p, chips for v5e/v6e) or "v5p:2x4x4" -> a Slice."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name.strip().lower())
  if not m:
    raise ConfigError(f"Unknown TPU slice {name!r}: name one as Cloud TPU does, e.g. v5p-64, "
                      "v5e-16, v6e-8, v4-32, or give a chip layout such as v5p:2x4x4.")
  generation, count, layout = m.groups()
  cores, dims = GENERATIONS[generation][1:]
  if count is not None:
    layouts = LAYOUTS_3D if dims == 3 else LAYOUTS_2D
    chips, rest = divmod(int(count), cores)
    if rest or chips not in layouts:
      unit = "TensorCores (2 per chip)" if cores == 2 else "chips"
      raise ConfigError(f"{name}: no standard {generation} slice has {count} {unit}; choose one "
                        f"of {', '.join(f'{generation}-{c * cores}' for c in layouts)}, or give a "
                        f"chip layout such as {generation}:{next(iter(layouts.values()))}.")
    layout = layouts[chips]
  elif len(layout.split("x")) != dims:
    raise ConfigError(f"{name}: a {generation} layout has {dims} dimensions, e.g. "
                      f"{generation}:{'2x2x1' if dims == 3 else '2x2'}.")
  if num_slices < 1:
    raise ConfigError(f"--num_slices must be at least 1, got {num_slices}.")
  return Slice(name, generation, layout, num_slices)


def topology_devices(s: Slice) -> list:
  """The slice's compile-only TPU devices (one per chip; slice_index set for multi-slice)."""
  try:
    import libtpu  # noqa: F401  (the TPU compiler; on PyPI for Linux x86-64)
  except ImportError:
    raise LmjaxError("lmjax compile needs the TPU compiler: pip install 'lmjax[tpu]' (libtpu, "
                     "Linux x86-64; no TPU needed).") from None
  from jax.experimental import topologies
  # no TPU VM around: say so to libtpu, which would otherwise warn that it cannot find one
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{s.generation}-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # compiling needs no TPU: let several processes (parallel tests, a compile beside a run) load
  # libtpu at once instead of the first one locking it
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"chip_config_name": "megacore"} if GENERATIONS[s.generation][1] == 2 else {}
  if s.num_slices > 1:
    kwargs["num_slices"] = s.num_slices
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=f"{s.generation}:{s.layout}",
                                        **kwargs).devices
  except Exception as e:  # libtpu refuses layouts it does not know, with its own message
    raise ConfigError(f"libtpu cannot make the topology {s.generation}:{s.layout} "
                      f"x {s.num_slices} slice(s): {str(e).splitlines()[0]}") from None


# --- the collectives in compiled HLO ----------------------------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\(")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _shape_bytes(text: str) -> int:
  return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _SHAPE.findall(text))


def _computations(hlo: str) -> tuple[dict, str]:
  """{computation name: [its instruction lines]}, and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  return comps, entry


def collectives(hlo: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives one execution of the compiled module runs:
  each op's result bytes (per device), an op inside a loop (the layer scan, accumulation)
  counted once per trip where the trip count is known, an async pair counted once. Static
  analysis of the program: XLA may still overlap them with compute."""
  comps, entry = _computations(hlo)
  times = collections.Counter({entry: 1})
  for name in reversed(list(comps)):  # HLO text lists callees before their callers
    for line in comps[name]:
      trips = _trip_count(line, comps) if re.search(r"\swhile\(", line) else 1
      callees = re.findall(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line)
      for group in re.findall(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}", line):
        callees += re.findall(r"%?([\w.\-]+)", group)
      for c in callees:
        if c in comps:
          times[c] += times[name] * trips
  # TPU's async collective fusions carry one collective through several fusions (one per piece
  # of compute it overlaps): the same channel_id is one collective, run as often as its most
  # frequent piece
  ops = {}
  for name, lines in comps.items():
    for i, line in enumerate(lines):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      shape, op = m.groups()
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVES:
        continue
      if op.endswith("-start") and shape.startswith("("):  # (operands, results[, scratch])
        shape = _async_result(shape)
      channel = re.search(r"channel_id=(\d+)", line)
      key = (kind, channel.group(1)) if channel else (kind, name, i)
      previous = ops.get(key, (0, 0))
      ops[key] = (max(previous[0], times[name]), _shape_bytes(shape))
  result = {}
  for (kind, *_), (count, nbytes) in ops.items():
    entry_ = result.setdefault(kind, {"count": 0, "bytes": 0})
    entry_["count"] += count
    entry_["bytes"] += count * nbytes
  return result


def _trip_count(while_line: str, comps: dict) -> int:
  """A while loop's trips: XLA's known_trip_count, else the bound its condition compares the
  counter with (a scan's `i < N`); 1 if neither says."""
  m = re.search(r'known_trip_count[^0-9]*?(\d+)', while_line)
  if m:
    return int(m.group(1))
  m = re.search(r"condition=%?([\w.\-]+)", while_line)
  condition = comps.get(m.group(1), []) if m else []
  bounds = [int(c) for line in condition for c in re.findall(r"s32\[\][^=]*constant\((\d+)\)", line)]
  compares = [line for line in condition if "compare(" in line and "direction=LT" in line]
  return bounds[0] if len(bounds) == 1 and compares else 1


def _async_result(tuple_shape: str) -> str:
  """The result part of an async collective's (operand, result, ...) tuple shape."""
  depth, parts, start = 0, [], 1
  for i, ch in enumerate(tuple_shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if (ch == "," and depth == 1) or (depth == 0 and ch == ")"):
      parts.append(tuple_shape[start:i])
      start = i + 1
  return parts[1] if len(parts) > 1 else tuple_shape


# --- compiling a run's steps ------------------------------------------------------------------

def memory_of(compiled) -> dict:
  """The compiled program's buffers per device: arguments, outputs, temporaries, and the total
  live at once (outputs written over donated arguments count once)."""
  a = compiled.memory_analysis()
  out = {"arguments": int(a.argument_size_in_bytes), "outputs": int(a.output_size_in_bytes),
         "aliased": int(a.alias_size_in_bytes), "temporaries": int(a.temp_size_in_bytes),
         "code": int(getattr(a, "generated_code_size_in_bytes", 0))}
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OUT_OF_MEMORY = (  # the TPU compiler's words when a program does not fit: (what it counts, pattern)
    ("temporaries", re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
               r"\(([\d.]+)([KMGT])\)")),
    ("all buffers", re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")))


def out_of_memory(message: str) -> dict | None:
  """What the TPU compiler says when a program does not fit: {"needed", "available"} (bytes of
  what it counts: "counted"), or None if `message` is not that."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  for counted, pattern in _OUT_OF_MEMORY:
    m = pattern.search(message)
    if m:
      need, unit, have, unit2 = m.groups()
      return {"needed": int(float(need) * _UNITS[unit]),
              "available": int(float(have) * _UNITS[unit2]), "counted": counted}
  return {"needed": None, "available": None, "counted": None}


def _compile(jitted, *args, **kwargs) -> dict:
  """Lowers and compiles; a program the TPU compiler refuses for memory is a result (does not
  fit, short by what the compiler says), not an error."""
  start = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(str(e))
    if oom is None:
      raise
    return {"compile_seconds": time.perf_counter() - start, "memory": None, "out_of_memory": oom,
            "compiler_says": str(e).strip().splitlines()[0][:500]}
  seconds = time.perf_counter() - start
  return {"compile_seconds": seconds, "memory": memory_of(compiled),
          "collectives": collectives(compiled.as_text())}


def abstract_batch(run) -> dict:
  """The global batch's shapes, dtypes and shardings: the train step's other argument."""
  cfg, rows = run.cfg, run.cfg.train.batch_size
  shapes = {"tokens": (rows, cfg.data.seq_len + 1), "labels": (rows,), "valid": (rows,)}
  dtypes = {"weights": jnp.float32, "valid": jnp.float32}
  return {k: jax.ShapeDtypeStruct(shapes.get(k, (rows, cfg.data.seq_len)),
                                  dtypes.get(k, jnp.int32), sharding=s)
          for k, s in run.batch_shardings.items()}


def compile_decode(run, batch_size: int, prompt_len: int, new_tokens: int) -> dict:
  """`lmjax generate`'s jitted program (prefill + the KV-cache loop), greedy, for `batch_size`
  prompts of `prompt_len` tokens and `new_tokens` new ones, on the run's params."""
  whole = NamedSharding(run.mesh, P())
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)
  floats = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=whole)
  params = run.model_params(run.abstract_state.params)
  with run.context():
    return _compile(decode_lib._generate_padded, run.model, params, ints(batch_size, prompt_len),
                    ints(batch_size), key, floats, ints(), floats, ints(),
                    max_new_tokens=new_tokens, mode=decode_lib.GREEDY)


def compile_run(cfg, s: Slice, steps=("train", "eval", "decode"), workdir: str | None = None,
                decode_batch: int = 0) -> dict:
  """Builds the run `cfg` makes on the slice's devices and compiles `steps` for it."""
  devices = topology_devices(s)
  start = time.perf_counter()
  run = builder.build(cfg, builder.own_step_objective(cfg, workdir, "lmjax compile"),
                      devices=devices)
  result = {"slice": s.name, "topology": f"{s.generation}:{s.layout}", "num_slices": s.num_slices,
            "chips": len(devices), "device_kind": devices[0].device_kind,
            "hbm_bytes_per_chip": s.hbm_bytes,
            "hosts": len({d.process_index for d in devices}),
            "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
            "num_params": run.num_params, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len,
            "model": {k: cfg.model[k] for k in ("style", "num_layers", "d_model", "vocab_size",
                                                 "dtype", "param_dtype", "remat", "scan_layers",
                                                 "attention")},
            "build_seconds": time.perf_counter() - start,
            "attention": run.model.cfg.attention,
            "estimate": estimate_memory(cfg, len(devices), devices[0]), "steps": {}}
  if "train" in steps:
    with run.context():
      result["steps"]["train"] = _compile(run.jit_train_step(), run.abstract_state,
                                          abstract_batch(run))
  if "eval" in steps:
    with run.context():
      result["steps"]["eval"] = _compile(run.jit_eval_step(), run.abstract_state.params,
                                         abstract_batch(run))
  if "decode" in steps:
    if not cfg.model.causal:
      result["steps"]["decode"] = {"skipped": "an encoder (model.causal=False) does not decode"}
    else:
      half = max(cfg.data.seq_len // 2, 1)
      batch = decode_batch or len(devices)
      result["steps"]["decode"] = compile_decode(run, batch, half, half)
      result["steps"]["decode"].update(batch_size=batch, prompt_len=half, new_tokens=half)
  for step in result["steps"].values():
    if step.get("memory"):
      step["fits"] = step["memory"]["total"] <= s.hbm_bytes
      step["headroom_bytes"] = s.hbm_bytes - step["memory"]["total"]
    elif "out_of_memory" in step:
      oom = step["out_of_memory"]
      step["fits"] = False
      step["headroom_bytes"] = (oom["available"] - oom["needed"] if oom["needed"] is not None
                                else None)
  return result


def format_report(r: dict) -> str:
  """The result for the terminal: one block per compiled step."""
  m = r["model"]
  lines = [f"{r['slice']} ({r['topology']}, {r['num_slices']} slice(s)): {r['chips']} chips "
           f"({r['device_kind']}, {r['hbm_bytes_per_chip'] / GiB:.0f} GiB HBM each) on "
           f"{r['hosts']} host(s); mesh {r['mesh']}",
           f"model: {m['style']}, {m['num_layers']} layers, d_model {m['d_model']}, "
           f"{r['num_params'] / 1e6:,.1f}M params, {m['dtype']} compute / {m['param_dtype']} "
           f"params, remat {m['remat']}, attention {r['attention']}; batch "
           f"{r['batch_size']} x {r['seq_len']} tokens"]
  for name, step in r["steps"].items():
    if "skipped" in step:
      lines.append(f"\n{name}: skipped ({step['skipped']})")
      continue
    what = name if name != "decode" else (f"decode ({step['batch_size']} prompts x "
                                          f"{step['prompt_len']} + {step['new_tokens']} tokens)")
    if step["memory"] is None:  # the compiler refused it
      oom = step["out_of_memory"]
      short = (f"short by {-step['headroom_bytes'] / GiB:.2f} GiB or more: the compiler needs "
               f"{oom['needed'] / GiB:.2f} GiB for {oom['counted']} of the "
               f"{oom['available'] / GiB:.2f} GiB it can use" if oom["needed"] is not None else
               step["compiler_says"])
      lines += [f"\n{what} step: DOES NOT FIT ({short})"]
      if name == "train":
        lines.append(f"  lmjax estimate {r['estimate']['total'] / GiB:.2f} GiB per chip")
      continue
    mem = step["memory"]
    verdict = (f"fits, {step['headroom_bytes'] / GiB:.2f} GiB to spare" if step["fits"] else
               f"DOES NOT FIT: short by {-step['headroom_bytes'] / GiB:.2f} GiB")
    lines += [f"\n{what} step: compiled in {step['compile_seconds']:.1f} s",
              f"  memory per chip  {mem['total'] / GiB:8.2f} GiB of "
              f"{r['hbm_bytes_per_chip'] / GiB:.0f}: {verdict}",
              f"    arguments      {mem['arguments'] / GiB:8.2f} GiB",
              f"    outputs        {mem['outputs'] / GiB:8.2f} GiB "
              f"({mem['aliased'] / GiB:.2f} written over donated arguments)",
              f"    temporaries    {mem['temporaries'] / GiB:8.2f} GiB"]
    if name == "train":
      lines.append(f"    lmjax estimate {r['estimate']['total'] / GiB:8.2f} GiB")
    if step["collectives"]:
      lines.append("  collectives per step (per chip):")
      for kind, c in sorted(step["collectives"].items()):
        lines.append(f"    {kind:<18} {c['count']:6d} x, {c['bytes'] / GiB:8.3f} GiB")
    else:
      lines.append("  collectives: none")
  return "\n".join(lines)
