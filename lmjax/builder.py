"""The one builder of a run: the model, mesh, shardings, optimizer and the jitted init of its state,
from a config, an objective and where the params come from.

A run's state is initialized in this order (as in big_vision's train.py):
  1. resume: the workdir's latest checkpoint, restored by the loop onto `run.abstract_state`;
  2. from another run or an import: `FromRun(workdir)` restores that run's params alone (a
     checkpoint of params only, as an import writes, included); adapters, head, optimizer state
     and RNG start fresh;
  3. from scratch: `FromSeed()`, random params from train.seed.

The params are the model's tree (pretraining), or for a fine-tuning {"model": tree, "lora": ...,
"head": ...} (adapters and a classification head where it has them); with LoRA only the adapters
and head train (`TrainState.trainable`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import lora as lora_lib
from lmjax import sharding as sharding_lib
from lmjax import workdir as workdir_lib
from lmjax.data.tokenizer import eos_for, masking_for
from lmjax.errors import ConfigError
from lmjax.flops import count_params
from lmjax.frozen import Frozen, objective as make_objective
from lmjax.losses import Forward, Objective
from lmjax.model import ModelConfig, Transformer, resolve_attention
from lmjax.optim import learning_rate_schedule, make_optimizer
from lmjax.step import TrainState, make_train_step
from lmjax.trees import unflatten


@dataclasses.dataclass(frozen=True)
class FromSeed:
  """Random params from train.seed."""


@dataclasses.dataclass(frozen=True)
class FromRun:
  """The latest params of the run in `workdir` (a `lmjax train` run or an import)."""
  workdir: str


@contextlib.contextmanager
def mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything built from a config that the loop, eval, bench, generate and export share."""
  cfg: Any
  objective: Objective
  mesh: jax.sharding.Mesh
  rules: tuple
  model: Transformer
  forward: Forward
  optimizer: Any
  schedule: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState
  batch_shardings: dict  # field -> NamedSharding
  init_state: Callable  # pure: (base model params or None for random) -> TrainState at step 0
  init: Callable[[], TrainState]  # the state at step 0 from the run's init source, on the mesh
  init_from: Callable[[Any], TrainState]  # the same with given base params (global arrays)

  def context(self):
    """Mesh and logical rules for tracing (activation sharding constraints)."""
    return mesh_context(self.mesh, self.rules)

  @property
  def num_params(self) -> int:
    return count_params(self.abstract_state.params)

  @property
  def num_trainable(self) -> int:
    return count_params(self.abstract_state.trainable_params())

  @property
  def process_rows(self):
    """The global rows of each batch that this process feeds (those its devices hold)."""
    return sharding_lib.process_rows(next(iter(self.batch_shardings.values())),
                                     self.cfg.train.batch_size)

  def put_batch(self, local_batch: dict) -> dict:
    """This process's rows of a batch -> the global batch on the mesh."""
    return sharding_lib.put_batch(local_batch, self.batch_shardings, self.cfg.train.batch_size)

  def model_params(self, params):
    """The model's own tree of a run's params."""
    return params["model"] if "model" in params else params

  def train_step(self, frozen: Frozen | None = None):
    """The pure (state, batch) -> (state, metrics) of this run's objective and optimizer (with
    the frozen model's params as they are inside a jitted step)."""
    if self.cfg.model.quantize != "none":
      raise ConfigError(f"this run's weights are quantized (model.quantize={self.cfg.model.quantize}"
                        ", written by `lmjax quantize`): it serves eval, generate and serve but "
                        "cannot be trained. Train or fine-tune the run it was quantized from, "
                        "then quantize again.")
    return make_train_step(self.objective.train_loss(self.forward, frozen), self.optimizer,
                           self.schedule, self.cfg.optim.accumulation_steps,
                           self.objective.prepare)

  def jit_train_step(self, frozen: Frozen | None = None):
    """train_step jitted with the run's shardings, the state donated; a frozen model's params
    go in as an argument (on their own shardings), not as constants."""
    if frozen is None:
      return jax.jit(self.train_step(), in_shardings=(self.state_shardings,
                                                      self.batch_shardings),
                     out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    step = jax.jit(lambda state, batch, p: self.train_step(Frozen(frozen.forward, p))(state,
                                                                                     batch),
                   in_shardings=(self.state_shardings, self.batch_shardings,
                                 _shardings_of(frozen.params)),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    return lambda state, batch: step(state, batch, frozen.params)

  def jit_eval_step(self, frozen: Frozen | None = None):
    """(params, batch) -> the objective's sums for the batch, replicated on every device."""
    replicated = sharding_lib.replicated(self.mesh)
    if frozen is None:
      return jax.jit(functools.partial(self.objective.evaluate, self.forward),
                     in_shardings=(self.state_shardings.params, self.batch_shardings),
                     out_shardings=replicated)
    step = jax.jit(lambda params, batch, p: self.objective.evaluate(
        self.forward, params, batch, Frozen(frozen.forward, p)),
                   in_shardings=(self.state_shardings.params, self.batch_shardings,
                                 _shardings_of(frozen.params)), out_shardings=replicated)
    return lambda params, batch: step(params, batch, frozen.params)


def pretraining_objective(cfg, workdir: str | None = None) -> Objective:
  """train.objective, with a masked LM's mask token read from the run's tokenizer; with a
  distill.teacher, the distillation loss (evaluated as the plain next-token loss)."""
  masking = masking_for(cfg, workdir) if cfg.train.objective == "masked_lm" else None
  eos_id = eos_for(cfg, workdir) if cfg.data.packing == "documents" else None
  if cfg.get("distill", {}).get("teacher"):
    d = cfg.distill
    return make_objective("distill", alpha=d.alpha, temperature=d.temperature, kl=d.kl,
                          eos_id=eos_id)
  return make_objective(cfg.train.objective, masking=masking, eos_id=eos_id)


def own_step_objective(cfg, workdir: str | None = None, what: str = "This command") -> Objective:
  """pretraining_objective for the commands that compile or time a config's own step (compile,
  bench): a distillation's step also runs its teacher, which they do not model: refused."""
  if cfg.get("distill", {}).get("teacher"):
    raise ConfigError(f"{what} measures a config's own train step, but this one distills from "
                      f"{cfg.distill.teacher}, whose forward pass it would leave out. Set "
                      "--config.distill.teacher='' to measure the student alone.")
  return pretraining_objective(cfg, workdir)


def _shardings_of(tree):
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def reference_model(run, workdir: str) -> Frozen:
  """The latest params of the run in `workdir` as a frozen copy of `run`'s own model (same
  architecture and runtime settings, no adapters), on the shardings of its base params: a
  preference tuning's reference."""
  abstract = run.abstract_state.params["model"]
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 read_only=True) as checkpoints:
    params = checkpoints.restore_params(None, abstract)
  return Frozen(Forward(run.model), {"model": params})


def frozen_model(workdir: str, mesh_of) -> tuple[Any, Frozen]:
  """(its config, the frozen model) of the run in `workdir`: its latest params, sharded by its
  own model's logical axes on the mesh of the run `mesh_of` (its mesh and rules), for a loss
  beside that run's model (no optimizer state)."""
  cfg = workdir_lib.load_config(workdir)
  cfg.mesh = config_lib.ConfigDict(mesh_of.cfg.mesh.to_dict())
  cfg.data.seq_len = mesh_of.cfg.data.seq_len
  cfg.train.batch_size = mesh_of.cfg.train.batch_size
  cfg.optim.accumulation_steps = mesh_of.cfg.optim.accumulation_steps
  run = build(cfg, make_objective("causal_lm"), mesh=mesh_of.mesh)
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 read_only=True) as checkpoints:
    params = checkpoints.restore_params(None, run.abstract_state.params)
  return cfg, Frozen(run.forward, params)


def _parts(cfg, objective: Objective, model: Transformer):
  """(abstract model params, logical specs of the whole params, LoRA layout, trainable keys,
  whether the params nest the model's tree: a fine-tuning's always do, {"model", "lora"?,
  "head"?}; a pretraining run's are the model's tree itself)."""
  dummy_BT = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_BT)["params"])
  base, base_specs = nn.unbox(boxed), nn.get_partition_spec(boxed)
  f = cfg.finetune
  nested = objective.name in config_lib.FINETUNE_TASKS
  rank = f.lora_rank if nested else 0
  targets = tuple(t.strip() for t in f.lora_targets.split(",") if t.strip())
  layout = lora_lib.layout(base, base_specs, targets, rank) if rank else {}
  if rank and not layout:
    raise ConfigError(f"finetune.lora_targets={f.lora_targets!r} matches no projection of this "
                      f"{cfg.model.style} model.")
  extras = {}
  if layout:
    extras["lora"] = unflatten({f"{k}/{x}": P(*v[i]) for k, v in layout.items()
                                for x, i in (("a", 1), ("b", 3))})
  if objective.num_classes:
    extras["head"] = {"kernel": P("embed", None), "bias": P(None)}
  specs = {"model": base_specs, **extras} if nested else base_specs
  trainable = tuple(extras) if layout else None
  return base, specs, layout, trainable, nested


def _state_initializer(cfg, objective, model, optimizer, layout, trainable, nested: bool):
  """init_state(base=None) -> TrainState at step 0: `base` model params (random from the seed if
  None), plus fresh adapters and head, optimizer state over what trains, the RNG."""
  dummy_BT = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  pdt = jnp.dtype(cfg.model.param_dtype)

  def init_state(base=None):
    key = jax.random.PRNGKey(cfg.train.seed)
    if base is None:
      base = nn.unbox(model.init(key, dummy_BT)["params"])
    params = {"model": base} if nested else base
    if layout:
      params["lora"] = lora_lib.init(jax.random.fold_in(key, 2), layout, pdt)
    if objective.num_classes:
      params["head"] = {"kernel": cfg.model.init_std * jax.random.normal(
          jax.random.fold_in(key, 3), (cfg.model.d_model, objective.num_classes), pdt),
                        "bias": jnp.zeros((objective.num_classes,), pdt)}
    state = TrainState(jnp.zeros((), jnp.int32), params, None, jax.random.fold_in(key, 1),
                       trainable)
    return state.replace(opt_state=optimizer.init(state.trainable_params()))

  return init_state


def build(cfg, objective: Objective, init=FromSeed(), devices=None, mesh=None) -> Run:
  """The run `cfg` makes with `objective`, its params from `init` (FromSeed, FromRun), on
  `mesh` (default: the one cfg.mesh makes of `devices`). Nothing is computed on the devices
  until `run.init()` is called."""
  mesh = sharding_lib.make_mesh(cfg, devices) if mesh is None else mesh
  rules = sharding_lib.logical_rules(cfg)
  model = Transformer(resolve_attention(ModelConfig.from_config(cfg), mesh.devices.flat[0]))
  optimizer, schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
  base, specs, layout, trainable, nested = _parts(cfg, objective, model)
  init_state = _state_initializer(cfg, objective, model, optimizer, layout, trainable, nested)
  param_shardings = sharding_lib.logical_to_sharding(specs, mesh, rules)
  abstract = jax.eval_shape(init_state)
  state_shardings = sharding_lib.state_shardings(abstract, param_shardings, mesh)
  sharding_lib.check_batch_divisible(cfg.train.batch_size, cfg.optim.accumulation_steps, mesh,
                                     rules)
  batch_shardings = sharding_lib.batch_shardings(mesh, rules, objective.batch_fields)
  abstract_base = ckpt_lib.abstract_with_shardings(
      base, param_shardings["model"] if nested else param_shardings)
  forward = Forward(model, lora_lib.scale(cfg.finetune.lora_rank, cfg.finetune.lora_alpha))
  return Run(cfg, objective, mesh, rules, model, forward, optimizer, schedule,
             ckpt_lib.abstract_with_shardings(abstract, state_shardings), state_shardings,
             batch_shardings, init_state,
             *_initializers(init, init_state, state_shardings, abstract_base, mesh, rules))


def _initializers(init, init_state, state_shardings, abstract_base, mesh, rules):
  """() -> the step-0 state from the init source, and (base params) -> the step-0 state with
  those params (fresh adapters, head, optimizer state and RNG), both placed on the mesh."""
  jitted = jax.jit(init_state, out_shardings=state_shardings)
  # a given base is consumed: its buffers become the state's params, not a second copy
  jitted_from_base = jax.jit(init_state, out_shardings=state_shardings, donate_argnums=(0,))

  def from_base(base) -> TrainState:
    with mesh_context(mesh, rules):
      return jitted_from_base(base)

  def from_source() -> TrainState:
    if isinstance(init, FromSeed):
      with mesh_context(mesh, rules):
        return jitted()
    with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(init.workdir),
                                   read_only=True) as checkpoints:
      return from_base(checkpoints.restore_params(None, abstract_base))

  return from_source, from_base


def place(params, abstract):
  """Params onto the shardings of `abstract` (ShapeDtypeStructs): global arrays as they are; of
  host arrays, or lazy readers such as an import's, each process reads only its devices' blocks."""
  return jax.tree_util.tree_map(
      lambda x, s: x if isinstance(x, jax.Array) else jax.make_array_from_callback(
          x.shape, s.sharding, lambda idx: x[idx]), params, abstract)


def load_params(workdir: str, step: int | None = None, overrides=()):
  """(cfg, run, params, step) of a run's checkpoint: the params alone (no optimizer state), for
  commands that only read a model (eval, generate, export)."""
  cfg = workdir_lib.load_config(workdir, overrides)
  run = build(cfg, pretraining_objective(cfg, workdir))
  with ckpt_lib.open_checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 read_only=True) as checkpoints:
    step = checkpoints.existing_step(step)
    params = checkpoints.restore_params(step, run.abstract_state.params)
  return cfg, run, params, step
