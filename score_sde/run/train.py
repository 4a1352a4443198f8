"""Training: the train state, the compiled step functions and the train loop.

The loop (`train`) reads a whole config; everything it compiles is built by small factories
that take a `experiment.RunSpec` (SDE, network, loss, optimizer, EMA, labels, scaling):

- `TrainState`: step, params, optimizer state, EMA params, and the network's frozen
  `constants` (e.g. NCSN++'s Gaussian Fourier features), one pytree that is checkpointed and
  replicated over devices.
- `make_train_step`: `n_jitted_steps` optimizer steps in one compiled call (`lax.scan`;
  unrolled on CPU, where XLA runs a network inside a loop several times slower), over
  a device mesh with a `"batch"` axis: the batch is sharded, the state replicated, and XLA
  all-reduces the gradients (the `jit` + `NamedSharding` form of `pmap`). The per-step key is
  `fold_in(base_key, step)` inside the compiled code, so a run's randomness depends only on
  (seed, step), not on how it was cut into calls or devices.
- `make_eval_loss_fn`, `make_sample_fn`: the test loss and the configured sampler, compiled
  once, their batch sharded over devices.

Checkpoints are only ever written from a state whose losses were all finite.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde.io import checkpoints, datasets, images, parallel
from score_sde.run import experiment
from score_sde import guidance, models
from score_sde import sampling
from score_sde.io import workdir as workdir_lib
from score_sde.run.experiment import RunSpec

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as one pytree.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the network's trainable parameters.
    opt_state: the optax optimizer state.
    ema_params: exponential moving average of `params` (rate `config.model.ema_rate`); the
      weights used for evaluation and sampling.
    constants: the network's other variable collections (frozen arrays, not trained).
  """
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  constants: Any

  def variables(self, ema: bool = True) -> dict:
    """The variables for `model.apply`: EMA (default) or raw params plus the constants."""
    return {"params": self.ema_params if ema else self.params, **self.constants}


# ----------------------------------------------------------------------------------------
# State and step.


def init_state(key: Array, config: ml_collections.ConfigDict, model, optimizer
               ) -> TrainState:
  """A fresh `TrainState`: initialized params, EMA = params, step 0. Usable under
  `jax.eval_shape`."""
  variables = models.init_model(key, config, model)
  params = variables.pop("params")
  ema_params = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the state is donated
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema_params,
                    constants=variables)


def make_train_step(spec: RunSpec, *, mesh: Mesh | None = None) -> Callable:
  """Builds the compiled multi-step train function.

  Args:
    spec: the run's SDE, network, loss, optimizer, EMA rate (and warmup: decay
      min(ema_rate, (1 + step) / (10 + step)), so that a short run's EMA weights are not
      dominated by the initialization: with 0.995 and no warmup, 8% of the EMA is still the
      random initial network after 500 steps), time labels, class labels and data scaling
      (applied inside the compiled step); its schedule only to report the learning rate.
    mesh: device mesh with axis `"batch"` (default: all devices).

  Returns:
    `step_fn(state, base_key, batch) -> (state, metrics)`: `batch` is a dict of `image
    [n, B, H, W, C]` in [0, 1] and `label [n, B]` (n steps, global batch B, sharded over
    `"batch"` on axis 1); `metrics` holds `[n]` arrays `loss`, `grad_norm`, `lr`. The input
    state is donated.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  sde, optimizer, scaler = spec.sde, spec.optimizer, spec.scaler
  model = spec.network("train")  # at training precision; params, opt_state, EMA float32

  def one_step(base_key, state: TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    k_loss, k_dropout = jax.random.split(key)
    labels = batch["label"] if spec.conditional else None
    if labels is not None and spec.label_dropout > 0:  # classifier-free guidance training
      labels = guidance.drop_labels(jax.random.fold_in(key, 2), labels, spec.label_dropout,
                                    spec.num_classes)

    def param_score_fn(params, x, t):
      variables = {"params": params, **state.constants}
      return models.get_score_fn(sde, model, variables, train=True,
                                 continuous=spec.continuous, rng=k_dropout,
                                 class_labels=labels)(x, t)

    def objective(params):
      return spec.loss_fn(k_loss, param_score_fn, params, scaler(batch["image"]))

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rate = spec.ema_rate
    if spec.ema_warmup:  # min(rate, (1 + n) / (10 + n)): early steps forget the initialization
      n = state.step.astype(jnp.float32)
      rate = jnp.minimum(spec.ema_rate, (1.0 + n) / (10.0 + n))
    ema = jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p,
                                 state.ema_params, params)
    lr = spec.schedule(state.step) if spec.schedule is not None else jnp.nan
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads),
                   lr=jnp.asarray(lr, jnp.float32))
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema)
    return state, metrics

  # XLA:CPU runs a network inside a while loop several times slower than the same network
  # outside one (measured: Fashion-MNIST DDPM++, batch 64, 9 s vs 1.5 s per step), so on CPU
  # the steps are unrolled in Python (compile time grows with n_jitted_steps instead; even
  # `lax.scan(unroll=True)` keeps a one-trip loop).
  unrolled = jax.default_backend() == "cpu"

  def step_fn(state, base_key, batch):
    if not unrolled:
      return jax.lax.scan(functools.partial(one_step, base_key), state, batch)
    per_step = []
    for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0]):
      state, metrics = one_step(base_key, state, jax.tree_util.tree_map(lambda a: a[i], batch))
      per_step.append(metrics)
    return state, jax.tree_util.tree_map(lambda *m: jnp.stack(m), *per_step)

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, "batch"))
  return jax.jit(step_fn, in_shardings=(replicated, replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_loss_fn(spec: RunSpec, *, mesh: Mesh | None = None) -> Callable:
  """`eval_fn(variables, key, batch) -> (loss_sum, count)` on one sharded batch (`image
  [B, ...]` in [0, 1], `label [B]`, optional `mask [B]`), network in eval mode (no
  dropout), at `spec.eval_precision`."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = spec.network("eval")

  def eval_fn(variables, key, batch):
    labels = batch["label"] if spec.conditional else None

    def param_score_fn(params, x, t):
      return models.get_score_fn(spec.sde, model, {**variables, "params": params},
                                 train=False, continuous=spec.continuous,
                                 class_labels=labels)(x, t)

    _, aux = spec.loss_fn(key, param_score_fn, variables["params"], spec.scaler(batch["image"]))
    mask = batch.get("mask", jnp.ones_like(aux["per_example_loss"], bool))
    return jnp.sum(jnp.where(mask, aux["per_example_loss"], 0.0)), jnp.sum(mask)

  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_fn, in_shardings=(replicated, replicated, NamedSharding(mesh, P("batch"))),
                 out_shardings=replicated)


def make_sample_fn(spec: RunSpec, shape: tuple[int, ...], method: str, options: dict, *,
                   mesh: Mesh | None = None, score_fn_of: Callable | None = None
                   ) -> Callable:
  """`sample_fn(variables, key) -> (images [B, H, W, C] in [0, 1], nfe)`, one compiled
  program with the batch `shape[0]` sharded over devices. `method` and `options` as for
  `sampling.sample` (e.g. from `experiment.sampler_settings`). The starting noise is
  `sde.prior_sampling(fold_in(key, 0), shape)`, so calls with the same key but different
  methods start from the same x_T. `score_fn_of(variables) -> score_fn` makes the score
  function from `variables` (any pytree; default: the network's score with the network's
  variables, at `spec.sample_precision`), e.g. a guided one."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch(shape[0], mesh, "sampling batch size")
  batch_sharding = NamedSharding(mesh, P("batch"))
  sde = spec.sde

  if score_fn_of is None:
    def score_fn_of(variables):
      return models.get_score_fn(sde, spec.network("sample"), variables, train=False,
                                 continuous=spec.continuous)

  def sample_fn(variables, key):
    score_fn = score_fn_of(variables)
    x_T = sde.prior_sampling(jax.random.fold_in(key, 0), shape)
    x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    x, nfe = sampling.sample(jax.random.fold_in(key, 1), score_fn, sde, shape, method=method,
                             x_T=x_T, **options)
    return jnp.clip(spec.inverse_scaler(x), 0.0, 1.0), nfe

  return jax.jit(sample_fn)


def abstract_state(config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh
                   ) -> TrainState:
  """The `TrainState`'s shapes and dtypes, replicated over `mesh`, without memory."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda k: init_state(k, config, model, optimizer),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))  # a key, not made: no compile
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


def restore_state(manager, config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh,
                  step: int | None = None) -> tuple[TrainState, int] | None:
  """`(state, step)` from checkpoint `step` (None: the latest), or None if there is none."""
  return checkpoints.restore(manager, abstract_state(config, model, optimizer, mesh), step)


# ----------------------------------------------------------------------------------------
# The train loop and its helpers.


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the run stopped without saving."""


def is_time(step: int, previous: int, freq: int, last: int) -> bool:
  """Whether a multiple of `freq` lies in (previous, step], or `step` is the `last` one."""
  return step // freq > previous // freq or step == last


class MetricsWriter:
  """The run's scalar and image log: TensorBoard events and `metrics.jsonl` lines, written
  by the chief process only (on the others every call does nothing).

  A record `{"loss": 1.0}` in section "train" at step 5 becomes the TensorBoard scalar
  `train/loss` and the line `{"step": 5, "loss": 1.0}`; in another section, e.g. "eval",
  the scalar `eval/loss` and the key `eval_loss`.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, section: str, record: dict[str, float]) -> None:
    """Logs `record`'s values at `step`; non-finite ones become `null` in the JSON line."""
    if not self.enabled:
      return
    for name, value in record.items():
      self._tensorboard.add_scalar(f"{section}/{name}", value, step)
    prefix = "" if section == "train" else f"{section}_"
    line = {"step": step, **{prefix + name: _json_number(value) for name, value in record.items()}}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(line, allow_nan=False) + "\n")

  def image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self.enabled:
      self._tensorboard.add_image(name, grid, step, dataformats="HWC")

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _json_number(value: float) -> float | None:
  """`value` as a float, or None (JSON `null`) if it is NaN or infinite."""
  value = float(value)
  return value if np.isfinite(value) else None


def train_record(metrics: dict, steps_per_s: float, batch_size: int) -> dict[str, float]:
  """The scalars logged for the steps of `metrics` (`[n]` arrays): the mean loss, the last
  gradient norm and learning rate, and the throughput."""
  return dict(loss=float(np.mean(metrics["loss"])), grad_norm=float(metrics["grad_norm"][-1]),
              lr=float(metrics["lr"][-1]), steps_per_s=steps_per_s,
              images_per_s=steps_per_s * batch_size)


def eval_batch_loss(eval_fn: Callable, state: TrainState, batch: dict, key: Array, mesh: Mesh
                    ) -> float:
  """The mean loss of the EMA weights on one host batch (from `make_eval_loss_fn`)."""
  total, count = parallel.to_host(eval_fn(state.variables(ema=True), key,
                                          parallel.shard_batch(batch, mesh)))
  return float(total) / float(count)


def check_finite(metrics: dict, first_step: int, manager, workdir: str) -> None:
  """Raises NonFiniteLossError if a loss of the steps `first_step + 1, ...` (numbered as the
  log numbers them: step k is the one that takes the state from k - 1 to k) is not finite."""
  finite = np.isfinite(metrics["loss"])
  if np.all(finite):
    return
  bad = first_step + 1 + int(np.argmin(finite))
  last = manager.latest_step()
  raise NonFiniteLossError(
      f"Non-finite loss {metrics['loss'].tolist()} at step {bad}; stopped without "
      f"saving. Last good checkpoint: {'step ' + str(last) if last is not None else 'none'} "
      f"in {checkpoints.checkpoint_dir(workdir)}. Try a lower config.optim.lr, a "
      f"longer warmup or config.optim.grad_clip.")


def save_snapshot(sample_fn: Callable, state: TrainState, key: Array, step: int, workdir: str,
                  writer: MetricsWriter, method: str) -> None:
  """Samples with the EMA weights; the chief writes `samples/step_<step>.{png,npz}` (or
  `step_<step>.<k>.*` if those exist, e.g. after resuming from an older step) and the grid
  to TensorBoard."""
  x, nfe = parallel.to_host(sample_fn(state.variables(ema=True), key))
  x = np.asarray(x)
  if writer.enabled:
    directory = os.path.join(workdir, "samples")
    os.makedirs(directory, exist_ok=True)
    stem = workdir_lib.fresh_stem(directory, f"step_{step}", (".png", ".npz"))
    path = images.save_grid(x, stem + ".png", scale=2)
    np.savez_compressed(stem + ".npz", samples=x)
    writer.image(step, "samples", images.image_grid(x))
    logging.info("step %d: %d samples (%s, NFE %d) -> %s", step, len(x), method, int(nfe), path)


def _start_state(manager, config, spec: RunSpec, mesh: Mesh, workdir: str, step: int | None
                 ) -> TrainState:
  """Checkpoint `step` (None: the newest intact one), or a fresh state if there is none.

  Unreadable newer checkpoints, and with `step` the newer ones, are moved to
  `workdir/checkpoints_set_aside/` (never deleted) so that training can save those steps again.
  """
  abstract = abstract_state(config, spec.model, spec.optimizer, mesh)
  restored = checkpoints.restore_intact(manager, abstract, step)
  if restored is not None:
    state, restored_step, unreadable = restored
    newer = [s for s in manager.all_steps() if s > restored_step and s not in unreadable]
    moved = (checkpoints.set_aside(workdir, unreadable, "unreadable")
             + checkpoints.set_aside(workdir, newer, f"after_resume_from_{restored_step}"))
    if moved:
      logging.warning("Moved checkpoints %s out of the way to %s", sorted(unreadable + newer),
                      os.path.dirname(moved[0]))
      manager.reload()
    logging.info("Resuming from checkpoint %d in %s", restored_step, workdir)
    return state
  logging.info("Starting a new run in %s", workdir)
  init_key = experiment.run_keys(config)[0]
  return jax.jit(lambda k: init_state(k, config, spec.model, spec.optimizer),
                 out_shardings=NamedSharding(mesh, P()))(init_key)


def train(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
          mesh: Mesh | None = None, progress: bool = True) -> TrainState:
  """Trains (or resumes training) until `config.training.n_iters` steps.

  Writes into `workdir`: `config.json` (once the run has started), `checkpoints/<step>/`
  (orbax), `samples/step_<step>.png` and `.npz` at every snapshot (if
  `training.snapshot_sampling`), `tensorboard/` event files, `metrics.jsonl` (one line per
  log step). Resumes from the newest intact checkpoint, or from checkpoint `step`.

  Returns:
    The final state.

  Raises:
    NonFiniteLossError: a NaN or infinite loss (the last good checkpoint is kept).
    ValueError / FileNotFoundError: a bad config, a config that differs from the run's in
      what defines its network, missing data, or no intact checkpoint (before compiling).
  """
  from tqdm import tqdm

  workdir_lib.check_workdir(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  experiment.check_config(config, mesh, "train")
  if checkpoints.has_checkpoints(workdir):
    experiment.check_resume_config(config, workdir)
  training = config.training
  n_jitted, n_iters = int(training.n_jitted_steps), int(training.n_iters)
  spec = experiment.run_spec(config)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = datasets.get_dataset(config, "train", **process)
  eval_data = datasets.get_dataset(config, "test", **process)
  os.makedirs(workdir, exist_ok=True)

  manager = checkpoints.get_manager(workdir, keep=2, keep_period=int(training.snapshot_freq))
  try:
    state = _start_state(manager, config, spec, mesh, workdir, step)
  except BaseException:
    manager.close()
    raise
  if jax.process_index() == 0:  # the run has started: record how it is trained
    previous = workdir_lib.save_config(config, workdir)
    if previous:
      logging.warning("The config differs from the run's earlier one, kept as %s", previous)
  _, base_key, sample_key, eval_key = experiment.run_keys(config)
  base_key, start = parallel.replicate(base_key, mesh), int(state.step)
  step_fn = make_train_step(spec, mesh=mesh)
  eval_fn = make_eval_loss_fn(spec, mesh=mesh)
  sample_fn = None
  if training.snapshot_sampling:
    shape = (int(config.sampling.batch_size), *models.image_shape(config))
    sample_fn = make_sample_fn(spec, shape, *experiment.sampler_settings(config), mesh=mesh)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)

  # The loop: one compiled call per n_jitted steps (the last may be shorter). A background
  # thread prepares the coming calls' batches, and a call's metrics are read only once the
  # next call is launched, so the devices do not wait for the host. A state is evaluated or
  # saved only after the losses of every step up to it were checked.
  calls = [(s, min(s + n_jitted, n_iters)) for s in range(start, n_iters, n_jitted)]
  batches = train_data.iterate(start_step=start)

  def call_batch(i: int):
    host = [next(batches) for _ in range(calls[i][1] - calls[i][0])]
    return parallel.shard_batch({k: np.stack([b[k] for b in host]) for k in ("image", "label")},
                                mesh, axis=1)

  bar = tqdm(total=n_iters, initial=start, desc="train", unit="step", disable=not progress,
             dynamic_ncols=True)
  pending = collections.deque()  # (first step, last step, device metrics) of launched calls
  last_log, last_loss = [time.perf_counter(), start], [""]

  def settle(keep: int = 0) -> None:
    """Checks (NonFiniteLossError) and logs the metrics of the launched calls, all but the
    newest `keep`; waits for them."""
    while len(pending) > keep:
      first, last, metrics = pending.popleft()
      metrics = parallel.to_host(metrics)
      check_finite(metrics, first, manager, workdir)
      bar.update(last - first)
      last_loss[0] = f"{float(metrics['loss'][-1]):.4g}"
      bar.set_postfix(loss=last_loss[0])
      if is_time(last, first, int(training.log_freq), n_iters):
        now = time.perf_counter()
        record = train_record(metrics, (last - last_log[1]) / max(now - last_log[0], 1e-9),
                              int(training.batch_size))
        last_log[:] = [now, last]
        writer.scalars(last, "train", record)
        logging.info("step %d: loss %.5f, grad norm %.3f, lr %.2e, %.2f steps/s", last,
                     record["loss"], record["grad_norm"], record["lr"], record["steps_per_s"])

  done = start  # the step of `state`
  try:
    with parallel.Prefetcher(call_batch, len(calls)) as prefetched:
      for (previous, step), batch in zip(calls, prefetched):
        state, metrics = step_fn(state, base_key, batch)
        done = step
        pending.append((previous, step, metrics))
        settle(keep=1)  # the previous call's metrics, while this one runs
        is_eval = is_time(step, previous, int(training.eval_freq), n_iters)
        is_snapshot = step % int(training.snapshot_freq) == 0 or step == n_iters
        is_save = is_snapshot or step % int(training.snapshot_freq_for_preemption) == 0
        if is_eval or is_save:
          settle()
        if is_eval:
          # One test batch (batch index step / eval_freq, cycling), EMA weights, no dropout.
          eval_loss = eval_batch_loss(eval_fn, state, eval_data.batch(step // int(
              training.eval_freq)), jax.random.fold_in(eval_key, step), mesh)
          writer.scalars(step, "eval", dict(loss=eval_loss))
          bar.set_postfix(loss=last_loss[0], eval=f"{eval_loss:.4g}")
        if is_save:
          checkpoints.save(manager, step, state)
        if is_snapshot and sample_fn is not None:
          save_snapshot(sample_fn, state, jax.random.fold_in(sample_key, step), step, workdir,
                        writer, config.sampling.method)
    settle()
  except KeyboardInterrupt:
    # Keep the last launched step before giving up, once its losses are known to be finite
    # (settle raises NonFiniteLossError otherwise, and nothing is saved).
    settle()
    if done > start and manager.latest_step() != done:
      logging.warning("Interrupted: saving step %d before exiting", done)
      checkpoints.save(manager, done, state)
    raise
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return state
