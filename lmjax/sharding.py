"""The device mesh, logical-axis rules, and the shardings of a run's state and batches.

Parameters and activations carry logical axis names (model.py); `mesh.rules` maps each to mesh
axes. Everything here derives shardings from those two: changing the parallelism is a config
change, never code.
"""
from __future__ import annotations

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


def make_mesh(cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # unusual device layouts: a plain reshape is always valid
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


def put_batch(local_batch, shardings):
  """This process's rows -> one global array (each process feeds only its slice); a dict of row
  arrays with a dict of shardings gives a dict of global arrays."""
  return jax.tree_util.tree_map(lambda x, s: jax.make_array_from_process_local_data(s, x),
                                local_batch, shardings)
