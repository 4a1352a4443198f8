"""The train loop: one readable function over a config, its spec and the compiled programs.

`train(config, workdir)` checks the config, builds the `experiment.RunSpec`, restores or
starts the `programs.TrainState`, and runs `programs.make_train_step` in calls of
`n_jitted_steps`, with periodic test losses, checkpoints and sample grids. Checkpoints are
only ever written from a state whose losses were all finite.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde.io import checkpoints, files, images, parallel
from score_sde.io import workdir as workdir_lib
from score_sde.io.logs import MetricsWriter
from score_sde.run import experiment, programs
from score_sde.run import latent as latent_lib
from score_sde.run.experiment import RunSpec
from score_sde.run.programs import NonFiniteLossError, TrainState

Array = jax.Array


# ----------------------------------------------------------------------------------------
# The train loop and its helpers.


def is_time(step: int, previous: int, freq: int, last: int) -> bool:
  """Whether a multiple of `freq` lies in (previous, step], or `step` is the `last` one."""
  return step // freq > previous // freq or step == last


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
    files.save_npz(stem + ".npz", samples=x)
    path = images.save_grid(x, stem + ".png", scale=2)
    writer.image(step, "samples", images.image_grid(x))
    logging.info("step %d: %d samples (%s, NFE %d) -> %s", step, len(x), method, int(nfe), path)


def _start_state(manager, config, spec: RunSpec, mesh: Mesh, workdir: str, step: int | None
                 ) -> TrainState:
  """Checkpoint `step` (None: the newest intact one), or a fresh state if there is none.

  Unreadable newer checkpoints, and with `step` the newer ones, are moved to
  `workdir/checkpoints_set_aside/` (never deleted) so that training can save those steps again.
  """
  # A fresh run skips the abstract state: it would trace the initializer once more (seconds
  # of a warm start) only to find nothing to restore.
  restored = None
  if step is not None or manager.all_steps():
    restored = checkpoints.restore_intact(manager, programs.abstract_state(spec, mesh), step)
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
  return jax.jit(lambda k: programs.init_state(k, spec),
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
    WorkdirBusyError: another process holds the workdir (a second writer).
    CheckpointSaveError: a checkpoint could not be written (disk full, permissions).
  """
  workdir_lib.check_workdir(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  experiment.check_config(config, mesh, "train")
  if checkpoints.has_checkpoints(workdir):
    experiment.check_resume_config(config, workdir)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_data = experiment.make_dataset(config, "train", **process)
  eval_data = experiment.make_dataset(config, "test", **process)
  # Symlinked checkpoints/ leaving the workdir: refused before work.
  workdir_lib.check_inside(workdir, checkpoints.checkpoint_dir(workdir), "its checkpoints")
  workdir_lib.check_inside(workdir, os.path.join(workdir, checkpoints.SET_ASIDE_DIR),
                           "its set-aside folder")
  with workdir_lib.locked(workdir, "train", enabled=jax.process_index() == 0):
    # A latent run (config.data.latent): its scale ('auto') is computed here once, into
    # WORKDIR/latent.json, before the run's programs compile.
    spec = experiment.run_spec(config, latent_lib.latent_space(config, workdir, mesh=mesh,
                                                               create=True))
    return _train_locked(config, workdir, step, mesh, progress, spec, train_data, eval_data)


def _train_locked(config, workdir: str, step: int | None, mesh: Mesh, progress: bool,
                  spec: RunSpec, train_data, eval_data) -> TrainState:
  """The body of `train`, with the workdir's lock held."""
  from tqdm import tqdm

  training = config.training
  n_jitted, n_iters = int(training.n_jitted_steps), int(training.n_iters)
  manager = checkpoints.get_manager(workdir, keep=2, keep_period=int(training.snapshot_freq))
  try:
    state = _start_state(manager, config, spec, mesh, workdir, step)
  except BaseException:
    manager.close()
    raise
  if jax.process_index() == 0:  # the run has started: record how it is trained
    previous = workdir_lib.save_config(experiment.config_to_plain(config), workdir)
    if previous:
      logging.warning("The config differs from the run's earlier one, kept as %s", previous)
  _, base_key, sample_key, eval_key = experiment.run_keys(config)
  base_key, start = parallel.replicate(base_key, mesh), int(state.step)
  step_fn = programs.make_train_step(spec, mesh=mesh, stored_as=experiment.program_description(
      config, spec))
  eval_fn = programs.make_eval_loss_fn(spec, mesh=mesh)
  sample_fn = None
  if training.snapshot_sampling:
    shape = (int(config.sampling.batch_size), *spec.image_shape)
    sample_fn = programs.make_sample_fn(spec, shape, *experiment.sampler_settings(config),
                                        mesh=mesh)
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

  done, finished = start, False  # the step of `state`; whether the loop ran to its end
  try:
    try:
      with parallel.Prefetcher(call_batch, len(calls)) as prefetched:
        for (previous, step), batch in zip(calls, prefetched):
          state, metrics = step_fn(state, base_key, batch)
          done = step
          checkpoints.check_saves(manager)  # a failed background save stops training now
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
    finished = True
  finally:
    bar.close()
    try:
      checkpoints.finish_saves(manager, finished)
    finally:
      writer.close()
  return state
