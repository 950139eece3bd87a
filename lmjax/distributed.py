"""Multi-host: joining the cluster (`jax.distributed.initialize`) and host-level agreement."""
from __future__ import annotations

import os

import jax

from lmjax.errors import LmjaxError


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
  d = cfg.distributed  # distributed.initialize is one of config.CHOICES (checked by finalize)
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


def reached_preemption_sync_point(step: int) -> bool:
  """True on every process at the same step once any of them got SIGTERM: JAX's preemption sync
  manager agrees on the step through the coordination service, in the background, with no device
  work (every process must call this at every step). False with one process."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)


def _client():
  # the coordination service's key-value store (what Orbax and the preemption sync use); jax has
  # no public name for it
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


_published = {"count": 0}


def share_from_process_0(compute, what: str, wait_s: float = 24 * 3600) -> str:
  """Process 0 runs `compute() -> str` and every process returns its result; the others wait
  for it on the coordination service (host RPCs, no device collective), however long it takes.
  An exception on process 0 is raised on every process. Every process must call this the same
  number of times, in the same order."""
  if jax.process_count() == 1:
    return compute()
  _published["count"] += 1
  key = f"lmjax/{what}/{_published['count']}"
  client = _client()
  if jax.process_index() == 0:
    try:
      value = compute()
    except BaseException as e:
      client.key_value_set(key, "error:" + f"{type(e).__name__}: {e}".replace("\n", " "))
      raise
    client.key_value_set(key, "ok:" + value)
    return value
  value = client.blocking_key_value_get(key, int(wait_s * 1000))
  if value.startswith("error:"):
    raise LmjaxError(f"Process 0 failed at {what}: {value[len('error:'):]}")
  return value[len("ok:"):]


def check_everywhere(check, what: str, wait_s: float = 3600) -> None:
  """Every process runs `check()`, which raises an LmjaxError to refuse; if any process refuses,
  every process raises, with that process's message (host RPCs, no device work), so that no host
  starts a collective the others will never join. Called by every process in the same order."""
  if jax.process_count() == 1:
    check()
    return
  _published["count"] += 1
  key, me = f"lmjax/{what}/{_published['count']}", jax.process_index()
  client = _client()
  try:
    check()
  except LmjaxError as e:
    client.key_value_set(f"{key}/{me}", "error:" + str(e))
    raise
  client.key_value_set(f"{key}/{me}", "ok")
  for i in range(jax.process_count()):
    value = client.blocking_key_value_get(f"{key}/{i}", int(wait_s * 1000))
    if value.startswith("error:"):
      raise LmjaxError(f"Process {i} refused at {what}: {value[len('error:'):]}")
