"""The device mesh, logical-axis rules, and the shardings of a run's state and batches.

Parameters and activations carry logical axis names (model.py); `mesh.rules` maps each to mesh
axes. Everything here derives shardings from those two: changing the parallelism is a config
change, never code.
"""
from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.errors import ConfigError
from lmjax.step import TrainState

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  if sizes.count(-1) > 1:
    raise ConfigError("At most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"Mesh sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}, "
                      f"tensor={sizes[2]}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} "
                        f"devices: {num_devices} is not a multiple of {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                      f"{math.prod(sizes)} devices, but {num_devices} are available. Set one of "
                      "mesh.data/fsdp/tensor to -1 or make the product match.")
  return tuple(sizes)


def dcn_shape(cfg, shape) -> tuple[int, int, int]:
  """How many slices (granules) each mesh axis spans: mesh.dcn_{data,fsdp,tensor}."""
  dcn = (cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp, cfg.mesh.dcn_tensor)
  for axis, size, across in zip(MESH_AXES, shape, dcn):
    if across < 1 or size % across:
      raise ConfigError(f"mesh.dcn_{axis}={across} must be a positive divisor of the {axis} "
                        f"axis (size {size}): it says how much of that axis runs across slices.")
  return dcn


def _granules(devices) -> tuple[int, bool]:
  """(number of slices, whether they are processes): TPU slices by `slice_index`, else hosts."""
  if devices[0].platform == "tpu":
    return len({getattr(d, "slice_index", 0) for d in devices}), False
  return len({d.process_index for d in devices}), True


def make_mesh(cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh: topology-aware within a slice; with mesh.dcn_* > 1 a hybrid
  ICI x DCN mesh over slices (TPU) or processes (GPU, CPU). A device order that is not
  topology-aware is logged, never silent."""
  from jax.experimental import mesh_utils
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  dcn = dcn_shape(cfg, shape)
  if math.prod(dcn) > 1:
    slices, by_process = _granules(devices)
    if math.prod(dcn) != slices:
      raise ConfigError(f"mesh.dcn_data x dcn_fsdp x dcn_tensor = {math.prod(dcn)}, but the "
                        f"devices form {slices} {'processes' if by_process else 'slices'}; the "
                        "product must equal that number.")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if devices[0].platform == "tpu":
      raise ConfigError(f"The mesh {dict(zip(MESH_AXES, shape))} does not fit this TPU "
                        f"topology ({e}). Choose axis sizes that tile the slice, e.g. a "
                        "multiple of the chips per host on the innermost axis.") from None
    logging.getLogger("lmjax").warning(
        "The mesh %s is laid out in plain device order, not by the topology (%s).",
        dict(zip(MESH_AXES, shape)), e)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_rules(cfg) -> tuple:
  """mesh.rules -> flax's ((logical axis, mesh axes or None), ...). A rule's mesh axes are one
  axis name, a tuple (or list) of names, or "" / None for replicated; a tuple's "" entries are
  dropped. Anything else, or a name that is not a mesh axis, is a ConfigError."""
  rules = []
  for rule in cfg.mesh.rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"Each entry of mesh.rules must be a (logical axis, mesh axes) pair, e.g. "
                        f"('batch', 'data'); got {rule!r}.")
    name, axes = rule
    if isinstance(axes, (tuple, list)):
      axes = tuple(a for a in axes if a) or None
    names = () if not axes else axes if isinstance(axes, tuple) else (axes,)
    unknown = [a for a in names if a not in MESH_AXES]
    if unknown or not all(isinstance(a, str) for a in names):
      raise ConfigError(f"mesh.rules maps '{name}' to {rule[1]!r}, but the mesh axes are "
                        f"{', '.join(MESH_AXES)} ('' = replicated).")
    rules.append((name, axes or None))
  return tuple(rules)


def axes_of(entry) -> tuple:
  """A PartitionSpec entry (None, one mesh axis, or a tuple of them) as a tuple of axes."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def shards_of(spec, mesh_sizes) -> int:
  """How many pieces a PartitionSpec cuts an array into on a mesh of `mesh_sizes` (axis -> size)."""
  return math.prod(mesh_sizes[a] for entry in spec for a in axes_of(entry))


def logical_to_sharding(spec_tree, mesh: Mesh, rules):
  return nn.logical_to_mesh_sharding(spec_tree, mesh, rules)


def check_divisible(abstract_tree, sharding_tree, what: str = "parameter") -> None:
  """Every sharded dimension must divide by its mesh axes: a clear error instead of XLA's."""
  paths = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  shardings = jax.tree_util.tree_leaves(sharding_tree,
                                        is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(paths, shardings):
    for dim, entry in zip(leaf.shape, sharding.spec):
      size = math.prod(sharding.mesh.shape[a] for a in axes_of(entry))
      if dim % size:
        raise ConfigError(
            f"The {what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split over "
            f"mesh axes {axes_of(entry)} (size {size}): {dim} is not divisible by {size}. Change "
            "the mesh (mesh.fsdp / mesh.tensor) or the model dimension.")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for_like(params_specs, tree):
  """PartitionSpecs for a tree derived from params (optimizer state): a leaf whose key path ends
  with a param's path and has that param's shape gets the param's spec; anything else (counts,
  factored second moments) is replicated."""
  by_path = {}
  for path, (shape, spec) in jax.tree_util.tree_flatten_with_path(
      params_specs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and
      isinstance(x[1], P))[0]:
    by_path[tuple(str(k) for k in path)] = (shape, spec)

  def find(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and tuple(hit[0]) == tuple(getattr(leaf, "shape", ())):
        return hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(find, tree)


def state_shardings(abstract_state: TrainState, param_shardings, mesh: Mesh) -> TrainState:
  """The shardings of a whole train state: params by their logical axes, each optimizer-state
  leaf like the param it belongs to, step and RNG replicated. Checks that every split divides."""
  check_divisible(abstract_state.params, param_shardings)
  pairs = jax.tree_util.tree_map(lambda x, s: (x.shape, s.spec), abstract_state.params,
                                 param_shardings)
  opt_specs = spec_for_like(pairs, abstract_state.opt_state)
  opt_shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), opt_specs)
  check_divisible(abstract_state.opt_state, opt_shardings, "optimizer state")
  return abstract_state.replace(step=replicated(mesh), params=param_shardings,
                                opt_state=opt_shardings, rng=replicated(mesh))


def batch_shardings(mesh: Mesh, rules, fields: dict) -> dict:
  """{field: NamedSharding}: rows split over the mesh axes of the logical "batch" axis, the rest
  of each array (`fields` gives its number of dimensions) whole."""
  rows = nn.logical_to_mesh_axes(("batch",), rules)[0]
  return {name: NamedSharding(mesh, P(rows, *[None] * (ndim - 1))) for name, ndim in fields.items()}


def check_batch_divisible(batch_size: int, accumulation_steps: int, mesh: Mesh, rules) -> None:
  rows = nn.logical_to_mesh_axes(("batch",), rules)[0]
  shards = math.prod(mesh.shape[a] for a in axes_of(rows))
  if batch_size % (shards * accumulation_steps):
    raise ConfigError(
        f"train.batch_size={batch_size} must be divisible by the {shards} batch shards of the "
        f"mesh times optim.accumulation_steps={accumulation_steps}.")


@functools.lru_cache(maxsize=64)
def process_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """The global rows of a batch of `batch_size` that this process's devices hold, sorted: what it
  reads and feeds. Rows split over processes give each its share; a batch replicated over an axis
  that spans processes (tensor across hosts) gives each process all the rows of its replicas."""
  shape = (batch_size,) + (1,) * (len(sharding.spec) - 1 if sharding.spec else 0)
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(batch_size)))
  out = np.fromiter(sorted(rows), np.int64, len(rows))
  out.flags.writeable = False  # cached: shared by every caller
  return out


def put_batch(local_batch, shardings, batch_size: int):
  """This process's rows (`process_rows` of each field's sharding, in that order) -> one global
  array of `batch_size` rows per field; each device gets its rows from this process's."""
  def place(x, sharding):
    rows = process_rows(sharding, batch_size)
    if len(x) != len(rows):
      raise ValueError(f"This process holds {len(rows)} rows of the global batch of {batch_size} "
                       f"but was given {len(x)}.")

    def shard(index):
      start = int(np.searchsorted(rows, index[0].indices(batch_size)[0]))
      stop = start + len(range(*index[0].indices(batch_size)))
      return x[(slice(start, stop),) + tuple(index[1:])]

    return jax.make_array_from_callback((batch_size,) + x.shape[1:], sharding, shard)

  return jax.tree_util.tree_map(place, local_batch, shardings)
