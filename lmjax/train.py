"""TrainState, the pure train step, and the loop around it.

The math of one step is `train_step`; everything stateful (data iterators, writers, the checkpoint
manager, signal handling) lives in `train`, outside the jitted function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import struct

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import masking as masking_lib
from lmjax import metrics as metrics_lib
from lmjax import sharding as sharding_lib
from lmjax.model import ModelConfig, Transformer, count_params, flops_per_token
from lmjax.optim import learning_rate_schedule, make_optimizer


class TrainingError(RuntimeError):
  """The run cannot go on (diverged loss); the message says what was kept."""


@struct.dataclass
class TrainState:
  step: jax.Array  # completed optimizer steps
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: split every step, so it is part of the checkpoint


def next_token_loss(model: Transformer, params, tokens_BT1, rng, deterministic: bool = True):
  """Sum of next-token cross-entropy over the batch, and the number of predicted tokens."""
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=deterministic,
                           rngs={"dropout": rng})
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  return nll_BT.sum(), jnp.asarray(nll_BT.size, jnp.float32)


def make_train_step(model: Transformer, optimizer, schedule, accumulation_steps: int = 1,
                    masking: masking_lib.Masking | None = None, loss_fn=None, trainable=None):
  """Causal LM, or masked LM when `masking` is given (see masking.py), or any `loss_fn(params,
  batch, rng) -> (loss sum, {tokens: count, ...})` of a batch of row arrays (finetune.py; its
  other sums are reported per token). `trainable` (top-level keys of the params) trains only
  those: the others get no gradient and no optimizer state (LoRA)."""
  custom = loss_fn is not None

  def lm_loss(params, batch, rng):  # -> (loss sum, {tokens: count[, correct: count]})
    if masking is None:
      loss, n = next_token_loss(model, params, batch[0], rng, deterministic=False)
      return loss, {"tokens": n}
    return masking_lib.masked_lm_loss(model, params, *batch, rng, deterministic=False)

  loss_fn = loss_fn or lm_loss

  def train_step(state: TrainState, tokens_BT1):
    rng, step_rng = jax.random.split(state.rng)
    if custom:
      batch = tokens_BT1
    elif masking is None:
      batch = (tokens_BT1,)
    else:  # masks for the whole batch at once: accumulation does not change them
      mask_rng, step_rng = jax.random.split(step_rng)
      batch = masking_lib.masked_batch(mask_rng, tokens_BT1, masking)
    frozen = {k: v for k, v in state.params.items() if k not in trainable} if trainable else {}
    params = {k: state.params[k] for k in trainable} if trainable else state.params
    loss_of = (lambda p, b, r: loss_fn({**p, **frozen}, b, r)) if trainable else loss_fn
    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def micro_step(carry, xs):  # sums, so that accumulated == large batch exactly
      grad_sum, sums = carry
      micro_batch, i = xs
      (loss, counts), grads = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, i))
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (grad_sum, jax.tree_util.tree_map(jnp.add, sums, {"loss": loss, **counts})), None

    a = accumulation_steps
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    # rows j, j+A, j+2A, ... form micro-batch j: slicing the unsharded axis keeps every
    # micro-batch spread over all devices with no communication.
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape(b // a, a, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, aux = jax.eval_shape(loss_of, params, jax.tree_util.tree_map(lambda x: x[0], micro),
                            step_rng)
    sums = {k: jnp.zeros((), jnp.float32) for k in ("loss", *aux)}
    if a == 1:  # a one-trip scan would put the whole step inside a while loop: slower on CPU
      only = jax.tree_util.tree_map(lambda x: x[0], micro)
      (grad_sum, sums), _ = micro_step((zeros, sums), (only, jnp.zeros((), jnp.int32)))
    else:
      (grad_sum, sums), _ = jax.lax.scan(micro_step, (zeros, sums), (micro, jnp.arange(a)))
    count = jnp.maximum(sums["tokens"], 1.0)  # a masked-LM batch may select no token at all
    grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    if trainable:
      params = {**state.params, **params}
    metrics = {"loss": sums["loss"] / count, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    if masking is not None:
      metrics["masked_accuracy"] = sums["correct"] / count
    if custom:
      metrics.update({k: v / count for k, v in sums.items() if k not in ("loss", "tokens")})
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step


def make_eval_step(model: Transformer, masking: masking_lib.Masking | None = None):
  """(params, batch) -> (loss sum, predicted tokens[, correctly predicted tokens (masked LM)])."""

  def eval_step(params, tokens_BT1):
    if masking is None:
      return next_token_loss(model, params, tokens_BT1, jax.random.PRNGKey(0), deterministic=True)
    batch = masking_lib.masked_batch(masking_lib.eval_rng(tokens_BT1), tokens_BT1, masking)
    loss, counts = masking_lib.masked_lm_loss(model, params, *batch, jax.random.PRNGKey(0))
    return loss, counts["tokens"], counts["correct"]

  return eval_step


@dataclasses.dataclass
class Setup:
  """Everything built from a config that the loop, eval, bench and generate share."""
  cfg: Any
  mesh: Any
  rules: tuple
  model: Transformer
  optimizer: Any
  schedule: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState
  batch_sharding: Any
  init_fn: Any  # jitted: () -> TrainState, placed on the mesh

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical rules for tracing (activation sharding constraints)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  @property
  def num_params(self) -> int:
    return count_params(self.abstract_state.params)


def build(cfg, devices=None) -> Setup:
  mesh = sharding_lib.make_mesh(cfg, devices)
  rules = sharding_lib.logical_rules(cfg)
  model = Transformer(ModelConfig.from_config(cfg))
  optimizer = make_optimizer(cfg)
  schedule = learning_rate_schedule(cfg)
  dummy_BT = jnp.zeros((1, cfg.data.seq_len), jnp.int32)

  def init_fn():
    key = jax.random.PRNGKey(cfg.train.seed)
    params = nn.unbox(model.init(key, dummy_BT)["params"])
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.fold_in(key, 1))

  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_BT)["params"])
  param_shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.eval_shape(init_fn)
  sharding_lib.check_divisible(abstract.params, param_shardings)
  pairs = jax.tree_util.tree_map(lambda x, s: (x.shape, s.spec), abstract.params, param_shardings)
  opt_specs = sharding_lib.spec_for_like(pairs, abstract.opt_state)
  replicated = sharding_lib.replicated(mesh)
  state_shardings = TrainState(
      replicated, param_shardings,
      jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), opt_specs), replicated)
  sharding_lib.check_divisible(abstract.opt_state, state_shardings.opt_state, "optimizer state")
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  n_batch_shards = math.prod(mesh.shape[a] for a in (batch_sharding.spec[0] or ()))
  if cfg.train.batch_size % (n_batch_shards * cfg.optim.accumulation_steps):
    raise config_lib.ConfigError(
        f"train.batch_size={cfg.train.batch_size} must be divisible by the {n_batch_shards} batch "
        f"shards of the mesh times optim.accumulation_steps={cfg.optim.accumulation_steps}.")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jit_init = jax.jit(init_fn, out_shardings=state_shardings)
  return Setup(cfg, mesh, rules, model, optimizer, schedule,
               ckpt_lib.abstract_with_shardings(abstract, state_shardings), state_shardings,
               batch_sharding, jit_init)


def compile_steps(setup: Setup, workdir: str | None = None):
  """Jitted (train_step, eval_step). A masked LM reads its mask token's id from the tokenizer of
  `workdir`'s prepared data (masking.masking_for)."""
  a = setup.cfg.optim.accumulation_steps
  masking = masking_lib.masking_for(setup.cfg, workdir)
  train_step = jax.jit(make_train_step(setup.model, setup.optimizer, setup.schedule, a, masking),
                       in_shardings=(setup.state_shardings, setup.batch_sharding),
                       out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(setup.model, masking),
                      in_shardings=(setup.state_shardings.params, setup.batch_sharding))
  return train_step, eval_step


class _StopRequest:
  """SIGTERM / Ctrl-C: finish the current step, save, exit cleanly."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def prepare_workdir(cfg, workdir: str) -> None:
  """Refuses a workdir that holds another model, before anything is written."""
  path = epath.Path(workdir) / "config.json"
  if path.exists():
    config_lib.check_same_model(config_lib.from_json(path.read_text()), cfg, workdir)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train(cfg, workdir: str, progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the last train and val metrics.

  `stop_at_step` ends this invocation early (with a checkpoint) as a preemption would, keeping
  the schedule of the full `train.steps`.
  """
  prepare_workdir(cfg, workdir)
  setup = build(cfg)
  is_writer = jax.process_index() == 0
  pi, pc = jax.process_index(), jax.process_count()
  if cfg.data.source != "synthetic":
    # process 0 prepares first; the others then find the shards (shared disk) or make the same
    # ones on their own disk, deterministically
    if is_writer and not data_lib.is_prepared(cfg, workdir):
      data_lib.prepare(cfg, workdir)
    sharding_lib.sync("lmjax:prepare")
  train_step, eval_step = compile_steps(setup, workdir)  # after prepare: it may read the tokenizer
  # a CPU's peak FLOP/s (for MFU) is measured: before the loader's workers start competing for it
  metrics_lib.peak_flops_total(setup.mesh.devices.flatten())
  train_iter = data_lib.make_iterator(cfg, workdir, "train", pi, pc)
  result = run_loop(
      cfg, workdir, setup, train_step, train_iter,
      lambda params: evaluate_lib.evaluate_split(cfg, workdir, setup, eval_step, params),
      progress=progress, stop_at_step=stop_at_step)
  if not result["stopped_by"] and cfg.train.sample_prompt and cfg.data.source != "synthetic":
    result["sample"] = sample_continuation(cfg, workdir, setup, result["state"].params)
  return result


def run_loop(cfg, workdir: str, setup: Setup, train_step, train_iter, evaluate=None, *,
             progress: bool = True, stop_at_step: int | None = None,
             checkpoint_workdir: str | None = None, format_eval=evaluate_lib.format_result):
  """The loop of `train` and `lmjax finetune`: restores the latest checkpoint of
  `checkpoint_workdir` (default `workdir`; data position included) or starts from
  `setup.init_fn()`, then runs `train_step` on `train_iter`'s batches (an array or a dict of
  arrays of this process's rows) up to train.steps, writing metrics to `workdir`, calling
  `evaluate(params) -> dict` every train.eval_every steps and at the end, checkpointing, and
  stopping cleanly on SIGTERM / Ctrl-C."""
  is_writer = jax.process_index() == 0
  checkpoint_workdir = checkpoint_workdir or workdir
  checkpointer = ckpt_lib.Checkpointer(checkpoint_workdir, cfg.train.keep_checkpoints)

  start = checkpointer.latest_step()
  if start is not None:
    state, data_state = checkpointer.restore(start, setup.abstract_state)
    if data_state:
      train_iter.set_state(data_state)
    _log(f"Resuming from step {start} in {workdir}.")
  else:
    state, start = setup.init_fn(), 0
  if is_writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(cfg))

  model_cfg = setup.model.cfg
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  flops_per_step = flops_per_token(model_cfg, cfg.data.seq_len) * tokens_per_step
  devices = setup.mesh.devices.flatten()
  peak_total = metrics_lib.peak_flops_total(devices)
  _log(f"Model: {setup.num_params / 1e6:.2f}M params ({model_cfg.style}, {model_cfg.num_layers} "
       f"layers, d_model {model_cfg.d_model}); mesh {dict(setup.mesh.shape)} on {len(devices)} "
       f"{devices[0].platform} device(s); {tokens_per_step} tokens/step.")

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer)
  bar = None
  if progress and is_writer:
    from tqdm import tqdm
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

  def say(msg):
    if bar is not None:
      bar.write(msg)
    else:
      _log(msg)

  def run_eval(step, params):
    result = evaluate(params)
    writer.write(step, "val", **result)
    return result

  last_train, last_val, stopped_by = {}, {}, None
  pending = None  # (step, metrics) of the previous step, checked one step late to keep async
  interval_start, interval_steps = None, 0

  def check_finite(step, metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss) or not math.isfinite(float(metrics["grad_norm"])):
      checkpointer.wait()
      kept = checkpointer.latest_step()
      raise TrainingError(
          f"Loss became {loss} at step {step}: training diverged. Nothing after it was saved; the "
          f"last good checkpoint is step {kept} in {ckpt_lib.checkpoint_dir(checkpoint_workdir)}. "
          "Lower optim.learning_rate, raise optim.warmup_steps or set optim.grad_clip, then rerun.")

  try:
    with _StopRequest() as stop, setup.context():
      def next_batch():  # (the batch placed on the devices, the data position after it)
        batch = sharding_lib.put_batch(next(train_iter), setup.batch_sharding)
        return batch, train_iter.get_state()

      upcoming = next_batch() if start < cfg.train.steps else None
      for step in range(start, cfg.train.steps):
        (batch, data_state), upcoming = upcoming, None
        state, metrics = train_step(state, batch)
        done = step + 1
        if done < cfg.train.steps:  # the next batch loads and transfers while this step computes
          upcoming = next_batch()
        if pending is not None:
          check_finite(*pending)
        pending = (done, metrics)
        if interval_start is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          interval_start, interval_steps = time.perf_counter(), 0
        else:
          interval_steps += 1

        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
          metrics = jax.device_get(metrics)
          check_finite(done, metrics)
          now = time.perf_counter()
          elapsed = now - interval_start
          record = {k: float(v) for k, v in metrics.items()}
          if interval_steps:
            step_time = elapsed / interval_steps
            record.update(step_time=step_time, tokens_per_second=tokens_per_step / step_time,
                          mfu=flops_per_step / step_time / peak_total)
          writer.write(done, "train", **record)
          last_train = record
          interval_start, interval_steps = now, 0
          if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            tok_s=f"{record.get('tokens_per_second', 0):.0f}")
          else:
            say(f"step {done}: loss {record['loss']:.4f}" + (
                f", masked accuracy {record['masked_accuracy']:.3f}"
                if "masked_accuracy" in record else "") +
                f", lr {record['lr']:.2e}, grad norm {record['grad_norm']:.3f}" + (
                    f", {record['tokens_per_second']:.0f} tokens/s, MFU {record['mfu']:.1%}, "
                    f"{record['step_time'] * 1000:.0f} ms/step" if "step_time" in record else ""))
        if bar is not None:
          bar.update(1)

        if evaluate and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
          last_val = run_eval(done, state.params)
          say(format_eval(done, last_val))
          interval_start, interval_steps = time.perf_counter(), 0
        if stop_at_step is not None and done >= stop_at_step and not stop.requested:
          stop.requested = f"stop_at_step={stop_at_step}"
        if sharding_lib.any_process(stop.requested is not None) and not stop.requested:
          stop.requested = "another host's stop request"  # every host saves at the same step
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or stop.requested:
          check_finite(*pending)
          checkpointer.save(done, state, data_state, force=True)  # position after `batch`
          interval_start, interval_steps = time.perf_counter(), 0
        if stop.requested:
          stopped_by = stop.requested
          break
      if pending is not None:
        check_finite(*pending)
  finally:
    checkpointer.close()  # waits for async saves to finish
    writer.close()
    if bar is not None:
      bar.close()
    if hasattr(train_iter, "close"):
      train_iter.close()

  final_step = int(jax.device_get(state.step))
  if stopped_by:
    _log(f"Stopped by {stopped_by} at step {final_step}; checkpoint saved. Rerun the same command "
         "to resume.")
  elif start >= cfg.train.steps:
    _log(f"{workdir} already finished {start} of {cfg.train.steps} steps; raise "
         "--config.train.steps to train further.")
  return {"step": final_step, "train": last_train, "val": last_val, "stopped_by": stopped_by,
          "sample": None, "state": state, "setup": setup}


def sample_continuation(cfg, workdir: str, setup: Setup, params, max_new_tokens: int = 96) -> dict:
  """A sampled continuation of train.sample_prompt: what the model learned, at a glance."""
  from lmjax import decode
  tokenizer = data_lib.load_tokenizer(data_lib.resolve_tokenizer(cfg, workdir))
  prompt = cfg.train.sample_prompt
  room = cfg.model.max_len - len(tokenizer.encode(prompt)) if cfg.model.style == "gpt2" else 10**9
  (text,) = decode.generate_from_text(setup.model, params, tokenizer, [prompt],
                                      max_new_tokens=max(min(max_new_tokens, room), 0),
                                      temperature=0.8, top_p=0.95, seed=cfg.train.seed)
  return {"prompt": prompt, "text": prompt + text}


def load_config(workdir: str, overrides=()):
  """The config a run was trained with (WORKDIR/config.json), plus overrides."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise config_lib.ConfigError(f"No run in '{workdir}': {path} is missing. Pass the --workdir "
                                 "of a `lmjax train` run.")
  saved = config_lib.default_config()  # keys newer than the run take their defaults
  saved.update(config_lib.from_json(path.read_text()))
  # how processes find each other belongs to the launch, not to the run
  saved.distributed = config_lib.default_config().distributed
  return config_lib.finalize(config_lib.apply_overrides(saved, overrides))


def load_run(workdir: str, step: int | None = None, overrides=()):
  """(cfg, setup, state) of a trained run, restored onto this machine's devices."""
  cfg = load_config(workdir, overrides)
  setup = build(cfg)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    if checkpointer.latest_step() is None:
      raise config_lib.ConfigError(f"No checkpoint in {ckpt_lib.checkpoint_dir(workdir)}: train "
                                   "first, or check the --workdir.")
    state, _ = checkpointer.restore(step, setup.abstract_state)
  finally:
    checkpointer.close()
  return cfg, setup, state
