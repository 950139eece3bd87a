"""The device mesh, logical-axis rules, and placing params, optimizer state and batches on it."""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.config import ConfigError

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
  """Config rules -> flax rules: "" means replicated."""
  rules = []
  for name, axes in cfg.mesh.rules:
    if isinstance(axes, (tuple, list)):
      axes = tuple(a for a in axes if a) or None
    rules.append((name, axes or None))
  return tuple(rules)


def logical_to_sharding(spec_tree, mesh: Mesh, rules):
  return nn.logical_to_mesh_sharding(spec_tree, mesh, rules)


def check_divisible(abstract_tree, sharding_tree, what: str = "parameter") -> None:
  """Every sharded dimension must divide by its mesh axes: a clear error instead of XLA's."""
  paths = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  shardings = jax.tree_util.tree_leaves(sharding_tree,
                                        is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(paths, shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % size:
        raise ConfigError(
            f"The {what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split over "
            f"mesh axes {axes} (size {size}): {dim} is not divisible by {size}. Change the mesh "
            "(mesh.fsdp / mesh.tensor) or the model dimension.")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), rules))


def put_batch(local_batch, sharding):
  """This process's rows -> one global array (each process feeds only its slice); a dict of row
  arrays with a dict of shardings gives a dict of global arrays."""
  return jax.tree_util.tree_map(lambda x, s: jax.make_array_from_process_local_data(s, x),
                                local_batch, sharding)


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


def _cluster_in_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  # Cloud TPU VM: JAX finds the slice's other hosts through the metadata server.
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) and \
      "TPU_SKIP_MDS_QUERY" not in env


def initialize_distributed(cfg) -> None:
  """`jax.distributed.initialize` from config or environment; must run before any JAX work."""
  d = cfg.distributed
  if d.initialize not in ("auto", "yes", "no"):
    raise ConfigError(f"distributed.initialize must be auto|yes|no, got '{d.initialize}'.")
  explicit = bool(d.coordinator_address) or d.num_processes > 0 or d.process_id >= 0
  if d.initialize == "no" or (d.initialize == "auto" and not explicit and
                              not _cluster_in_environment()):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  if d.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in d.local_device_ids.split(",")]
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU needs a transport
  jax.distributed.initialize(**kwargs)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a cheap host-level all-reduce)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
