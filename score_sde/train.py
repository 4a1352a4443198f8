"""Training: the train state, the optimizer, the data-parallel train step and the train loop.

The loop (`train`) reads a whole config; everything it compiles is built by small factories
that take plain objects (an SDE, a network, an optimizer):

- `TrainState`: step, params, optimizer state, EMA params, and the network's frozen
  `constants` (e.g. NCSN++'s Gaussian Fourier features), one pytree that is checkpointed and
  replicated over devices.
- `make_train_step`: `n_jitted_steps` optimizer steps in one compiled call (`lax.scan`;
  unrolled on CPU, where XLA runs a network inside a loop several times slower), over
  a device mesh with a `"batch"` axis: the batch is sharded, the state replicated, and XLA
  all-reduces the gradients (the `jit` + `NamedSharding` form of `pmap`). The per-step key is
  `fold_in(base_key, step)` inside the compiled code, so a run's randomness depends only on
  (seed, step), not on how it was cut into calls or devices.
- `make_sample_fn`: the configured sampler, compiled once, its batch sharded over devices.

Checkpoints are only ever written from a state whose losses were all finite.
"""

from __future__ import annotations

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

from score_sde import checkpoints, datasets, images, losses, models, sampling
from score_sde import parameterization as param_lib
from score_sde import sde as sde_lib

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
# The config edge: config -> SDE, loss, optimizer, sampler options.


def get_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
  """The forward SDE named by `config.training.sde`, with `config.model`'s parameters."""
  name, m = config.training.sde.lower(), config.model
  if name not in sde_lib.SDES:
    raise ValueError(f"Unknown config.training.sde {config.training.sde!r}; "
                     f"valid: {sorted(sde_lib.SDES)}")
  check_parameterization(config)
  network = dict(parameterization=m.get("parameterization", "auto"),
                 sigma_data=float(m.get("sigma_data", 0.5)))
  if name == "vesde":
    return sde_lib.get_sde(name, sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max),
                           N=int(m.num_scales), **network)
  return sde_lib.get_sde(name, beta_min=float(m.beta_min), beta_max=float(m.beta_max),
                         N=int(m.num_scales), schedule=m.get("schedule", "linear"), **network)


def check_parameterization(config: ml_collections.ConfigDict) -> None:
  """Checks `config.model.{parameterization, schedule}`, `config.training.time_sampling` and
  `config.sampling.threshold` by name, and that the parameterization fits the network.

  Raises:
    ValueError: an unknown name (listing the valid ones), a non-native parameterization
      with discrete labels (`training.continuous=False`), or `model.scale_by_sigma` (the
      network dividing its output by sigma) with a parameterization other than 'auto' /
      'score'.
  """
  m, t = config.model, config.training
  name = m.get("parameterization", "auto")
  if name not in param_lib.PARAMETERIZATIONS:
    raise ValueError(f"Unknown config.model.parameterization {name!r}; "
                     f"valid: {param_lib.PARAMETERIZATIONS}")
  schedule = m.get("schedule", "linear")
  if t.sde.lower() != "vesde" and schedule not in sde_lib.VPSDE.SCHEDULES:
    raise ValueError(f"Unknown config.model.schedule {schedule!r}; "
                     f"valid: {sde_lib.VPSDE.SCHEDULES}")
  time_sampling = t.get("time_sampling", "uniform")
  if time_sampling not in losses.TIME_SAMPLINGS:
    raise ValueError(f"Unknown config.training.time_sampling {time_sampling!r}; "
                     f"valid: {losses.TIME_SAMPLINGS}")
  threshold = config.sampling.get("threshold", "none")
  if threshold not in sampling.THRESHOLDS:
    raise ValueError(f"Unknown config.sampling.threshold {threshold!r}; "
                     f"valid: {sampling.THRESHOLDS}")
  if name not in ("auto", "score") and m.scale_by_sigma:
    raise ValueError(f"config.model.scale_by_sigma=True makes the network divide its output "
                     f"by sigma (a score); it does not fit parameterization {name!r}: set "
                     f"scale_by_sigma=False or parameterization 'auto' / 'score'")
  native = "score" if t.sde.lower() == "vesde" else "epsilon"
  if not t.continuous and name not in ("auto", native):
    raise ValueError(f"config.model.parameterization={name!r} needs continuous-time training "
                     f"(config.training.continuous=True); discrete labels fit 'auto' only")


def get_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> losses.LossFn:
  """The DSM loss of `config.training` (weighting, reduce_mean, eps, importance sampling)."""
  t = config.training
  return losses.get_loss_fn(sde, weighting=t.weighting, reduce_mean=bool(t.reduce_mean),
                            eps=float(t.eps),
                            importance_sampling=bool(t.get("importance_sampling", False)),
                            time_sampling=t.get("time_sampling", "uniform"),
                            p_mean=float(t.get("p_mean", -1.2)),
                            p_std=float(t.get("p_std", 1.2)))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup` steps, then constant (as the
  reference)."""
  o = config.optim
  if o.warmup > 0:
    return optax.linear_schedule(0.0, float(o.lr), int(o.warmup))
  return optax.constant_schedule(float(o.lr))


OPTIMIZERS = ("Adam", "AdamW")


def get_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (or AdamW with `optim.weight_decay`) with warmup, after global-norm gradient
  clipping at `optim.grad_clip` (< 0 or None: no clipping)."""
  o = config.optim
  if o.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown config.optim.optimizer {o.optimizer!r}; valid: {OPTIMIZERS}")
  schedule = learning_rate_schedule(config)
  if o.optimizer == "AdamW":
    adam = optax.adamw(schedule, b1=float(o.beta1), eps=float(o.eps),
                       weight_decay=float(o.weight_decay))
  else:
    adam = optax.adam(schedule, b1=float(o.beta1), eps=float(o.eps))
  clip = o.get("grad_clip", None)
  if clip is None or clip < 0:
    return adam
  return optax.chain(optax.clip_by_global_norm(float(clip)), adam)


# Config field -> sampler option, where the reference's name differs from ours.
_SAMPLING_RENAMES = {"n_steps_each": "n_steps", "noise_removal": "denoise"}


def sampler_settings(config: ml_collections.ConfigDict) -> tuple[str, dict]:
  """`(method, options)` for `sampling.sample` from `config.sampling`: the fields the method
  takes (unset ones, e.g. `steps=None`, left at the sampler's default)."""
  s = config.sampling
  method = s.method
  if method not in sampling.SAMPLERS:
    raise ValueError(f"Unknown config.sampling.method {method!r}; "
                     f"valid: {sorted(sampling.SAMPLERS)}")
  valid = set(sampling.sampler_options(method)) - {"x_T"}
  options = {}
  for field, value in s.items():
    name = _SAMPLING_RENAMES.get(field, field)
    if name in valid and value is not None:
      options[name] = tuple(value) if isinstance(value, list) else value
  if "data_range" in valid:  # clipping / thresholding range: the scaled data's
    options["data_range"] = (-1.0, 1.0) if config.data.centered else (0.0, 1.0)
  return method, options


# ----------------------------------------------------------------------------------------
# Devices.


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis `"batch"` over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("batch",))


def check_batch(batch_size: int, mesh: Mesh, what: str = "config.training.batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over devices and hosts."""
  n, hosts = mesh.devices.size, jax.process_count()
  if batch_size % n or batch_size % hosts:
    raise ValueError(f"{what}={batch_size} is not divisible by the number of devices ({n}) "
                     f"and hosts ({hosts}); use a multiple of {n}")


def shard_batch(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
  """Places host-local arrays as one global array sharded over `"batch"` along `axis` (each
  host passes its own rows; on one host, the whole batch)."""
  spec = P(*([None] * axis), "batch")
  sharding = NamedSharding(mesh, spec)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def to_host(tree: Any) -> Any:
  """Global (sharded or replicated) arrays -> numpy arrays with every host's rows, on every
  host (`device_get` alone only reaches this host's devices)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


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


def make_train_step(sde: sde_lib.SDE, model, optimizer: optax.GradientTransformation,
                    loss_fn: losses.LossFn, *, ema_rate: float, ema_warmup: bool = False,
                    continuous: bool = True,
                    scaler: Callable = lambda x: x, conditional_labels: bool = False,
                    mesh: Mesh | None = None, schedule: optax.Schedule | None = None
                    ) -> Callable:
  """Builds the compiled multi-step train function.

  Args:
    sde, model: the forward SDE and the score network.
    optimizer: the optax transformation (gradients of `params` only).
    loss_fn: from `losses.get_loss_fn`.
    ema_rate: EMA decay per step.
    ema_warmup: use the decay min(ema_rate, (1 + step) / (10 + step)) instead, so that a
      short run's EMA weights are not dominated by the initialization (with 0.995 and no
      warmup, 8% of the EMA is still the random initial network after 500 steps, enough to
      make its samples diverge).
    continuous: continuous-time network labels (vs. discrete step indices).
    scaler: data [0, 1] -> model scale (e.g. [-1, 1]); applied inside the compiled step.
    conditional_labels: pass the batch's class labels to the network.
    mesh: device mesh with axis `"batch"` (default: all devices).
    schedule: the learning-rate schedule, only to report it.

  Returns:
    `step_fn(state, base_key, batch) -> (state, metrics)`: `batch` is a dict of `image
    [n, B, H, W, C]` in [0, 1] and `label [n, B]` (n steps, global batch B, sharded over
    `"batch"` on axis 1); `metrics` holds `[n]` arrays `loss`, `grad_norm`, `lr`. The input
    state is donated.
  """
  mesh = make_mesh() if mesh is None else mesh

  def one_step(base_key, state: TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    k_loss, k_dropout = jax.random.split(key)
    labels = batch["label"] if conditional_labels else None

    def param_score_fn(params, x, t):
      variables = {"params": params, **state.constants}
      return models.get_score_fn(sde, model, variables, train=True, continuous=continuous,
                                 rng=k_dropout, class_labels=labels)(x, t)

    def objective(params):
      return loss_fn(k_loss, param_score_fn, params, scaler(batch["image"]))

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rate = ema_rate
    if ema_warmup:  # min(rate, (1 + n) / (10 + n)): early steps forget the initialization
      n = state.step.astype(jnp.float32)
      rate = jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))
    ema = jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p,
                                 state.ema_params, params)
    lr = schedule(state.step) if schedule is not None else jnp.nan
    grad_norm = optax.global_norm(grads)
    metrics = dict(loss=loss, grad_norm=grad_norm,
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


def make_eval_loss_fn(sde: sde_lib.SDE, model, loss_fn: losses.LossFn, *,
                      continuous: bool = True, scaler: Callable = lambda x: x,
                      conditional_labels: bool = False, mesh: Mesh | None = None
                      ) -> Callable:
  """`eval_fn(variables, key, batch) -> (loss_sum, count)` on one sharded batch (`image
  [B, ...]`, `label [B]`, optional `mask [B]`), network in eval mode (no dropout)."""
  mesh = make_mesh() if mesh is None else mesh

  def eval_fn(variables, key, batch):
    labels = batch["label"] if conditional_labels else None

    def param_score_fn(params, x, t):
      return models.get_score_fn(sde, model, {**variables, "params": params}, train=False,
                                 continuous=continuous, class_labels=labels)(x, t)

    _, aux = loss_fn(key, param_score_fn, variables["params"], scaler(batch["image"]))
    mask = batch.get("mask", jnp.ones_like(aux["per_example_loss"], bool))
    return jnp.sum(jnp.where(mask, aux["per_example_loss"], 0.0)), jnp.sum(mask)

  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_fn, in_shardings=(replicated, replicated, NamedSharding(mesh, P("batch"))),
                 out_shardings=replicated)


def make_sample_fn(sde: sde_lib.SDE, model, shape: tuple[int, ...], method: str,
                   options: dict, *, continuous: bool = True,
                   inverse_scaler: Callable = lambda x: x, mesh: Mesh | None = None
                   ) -> Callable:
  """`sample_fn(variables, key) -> (images [B, H, W, C] in [0, 1], nfe)`, one compiled
  program with the batch sharded over devices. The starting noise is
  `sde.prior_sampling(fold_in(key, 0), shape)`, so calls with the same key but different
  methods start from the same x_T."""
  mesh = make_mesh() if mesh is None else mesh
  check_batch(shape[0], mesh, "sampling batch size")
  batch_sharding = NamedSharding(mesh, P("batch"))

  def sample_fn(variables, key):
    score_fn = models.get_score_fn(sde, model, variables, train=False, continuous=continuous)
    x_T = sde.prior_sampling(jax.random.fold_in(key, 0), shape)
    x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    x, nfe = sampling.sample(jax.random.fold_in(key, 1), score_fn, sde, shape, method=method,
                             x_T=x_T, **options)
    return jnp.clip(inverse_scaler(x), 0.0, 1.0), nfe

  return jax.jit(sample_fn)


def run_keys(config: ml_collections.ConfigDict) -> tuple[Array, Array, Array, Array]:
  """The run's base keys from `config.seed`: (init, train steps, snapshot samples, eval)."""
  return tuple(jax.random.split(jax.random.PRNGKey(int(config.seed)), 4))


def abstract_state(config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh
                   ) -> TrainState:
  """The `TrainState`'s shapes and dtypes, replicated over `mesh`, without memory."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda k: init_state(k, config, model, optimizer),
                          jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


def restore_state(manager, config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh,
                  step: int | None = None) -> tuple[TrainState, int] | None:
  """`(state, step)` from checkpoint `step` (None: the latest), or None if there is none."""
  return checkpoints.restore(manager, abstract_state(config, model, optimizer, mesh), step)


# ----------------------------------------------------------------------------------------
# Checks before anything compiles.


def check_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
  """Validates a config before any compilation or data loading.

  Raises:
    ValueError: unknown SDE / model / sampler / weighting / optimizer names, impossible image
      shapes, a batch size not divisible by the device count, or snapshot frequencies that
      are not multiples of `n_jitted_steps`.
  """
  mesh = make_mesh() if mesh is None else mesh
  sde = get_sde(config)
  models.get_model(config)
  get_loss_fn(config, sde)
  get_optimizer(config)
  sampler_settings(config)
  t, d, m = config.training, config.data, config.model
  for field in ("batch_size", "n_iters", "n_jitted_steps", "snapshot_freq",
                "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
    if int(t[field]) < 1:
      raise ValueError(f"config.training.{field} must be >= 1, got {t[field]}")
  check_batch(int(t.batch_size), mesh)
  check_batch(int(config.sampling.batch_size), mesh, "config.sampling.batch_size")
  check_batch(int(config.eval.batch_size), mesh, "config.eval.batch_size")
  for field in ("snapshot_freq", "snapshot_freq_for_preemption"):
    if t[field] % t.n_jitted_steps:
      raise ValueError(f"config.training.{field}={t[field]} must be a multiple of "
                       f"config.training.n_jitted_steps={t.n_jitted_steps}")
  levels = len(m.ch_mult) - 1
  if d.image_size % (2 ** levels):
    raise ValueError(f"config.data.image_size={d.image_size} is not divisible by "
                     f"2**(len(ch_mult) - 1) = {2 ** levels} (ch_mult={tuple(m.ch_mult)})")
  resolutions = {d.image_size // 2 ** i for i in range(levels + 1)}
  bad = sorted(set(m.attn_resolutions) - resolutions)
  if bad:
    raise ValueError(f"config.model.attn_resolutions {bad} are not resolutions of this "
                     f"network; valid: {sorted(resolutions)}")
  if not 0.0 <= m.ema_rate < 1.0:
    raise ValueError(f"config.model.ema_rate must lie in [0, 1), got {m.ema_rate}")


# ----------------------------------------------------------------------------------------
# The train loop.


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the run stopped without saving."""


def _log_json(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh | None = None,
          progress: bool = True) -> TrainState:
  """Trains (or resumes training) until `config.training.n_iters` steps.

  Writes into `workdir`: `checkpoints/<step>/` (orbax), `samples/step_<step>.png` and
  `.npz` at every snapshot (if `training.snapshot_sampling`), `tensorboard/` event files,
  `metrics.jsonl` (one line per log step). Resumes from the latest checkpoint.

  Returns:
    The final state.

  Raises:
    NonFiniteLossError: a NaN or infinite loss (the last good checkpoint is kept).
    ValueError / FileNotFoundError: a bad config or missing data (before compiling).
  """
  from tensorboardX import SummaryWriter
  from tqdm import tqdm

  mesh = make_mesh() if mesh is None else mesh
  check_config(config, mesh)
  t = config.training
  n_jitted, n_iters = int(t.n_jitted_steps), int(t.n_iters)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  # The pieces.
  sde = get_sde(config)
  model = models.get_model(config)
  optimizer = get_optimizer(config)
  schedule = learning_rate_schedule(config)
  scaler = datasets.get_data_scaler(config.data.centered)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  conditional_labels = int(config.model.get("num_classes", 0)) > 0
  train_data = datasets.get_dataset(config, "train", process_index=jax.process_index(),
                                    process_count=jax.process_count())

  # State: fresh, or the latest checkpoint.
  replicated = NamedSharding(mesh, P())
  init_key, base_key, sample_key, eval_key = run_keys(config)
  manager = checkpoints.get_manager(workdir, keep=2, keep_period=int(t.snapshot_freq))
  restored = restore_state(manager, config, model, optimizer, mesh)
  if restored is None:
    state = jax.jit(lambda k: init_state(k, config, model, optimizer),
                    out_shardings=replicated)(init_key)
    logging.info("Starting a new run in %s", workdir)
  else:
    state, step = restored
    logging.info("Resuming from checkpoint %d in %s", step, workdir)
  base_key = jax.device_put(base_key, replicated)
  start = int(state.step)

  step_fn = make_train_step(sde, model, optimizer, get_loss_fn(config, sde),
                            ema_rate=float(config.model.ema_rate),
                            ema_warmup=bool(t.get("ema_warmup", False)),
                            continuous=bool(t.continuous), scaler=scaler,
                            conditional_labels=conditional_labels, mesh=mesh,
                            schedule=schedule)
  sample_fn = None
  if t.snapshot_sampling:
    method, options = sampler_settings(config)
    shape = (int(config.sampling.batch_size), *models.image_shape(config))
    sample_fn = make_sample_fn(sde, model, shape, method, options,
                               continuous=bool(t.continuous), inverse_scaler=inverse_scaler,
                               mesh=mesh)
  eval_data = datasets.get_dataset(config, "test", process_index=jax.process_index(),
                                   process_count=jax.process_count())
  eval_fn = make_eval_loss_fn(sde, model, get_loss_fn(config, sde),
                              continuous=bool(t.continuous), scaler=scaler,
                              conditional_labels=conditional_labels, mesh=mesh)
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_chief else None
  metrics_path = os.path.join(workdir, "metrics.jsonl")

  def snapshot(step: int) -> None:
    if sample_fn is None:
      return
    x, nfe = to_host(sample_fn(state.variables(ema=True), jax.random.fold_in(sample_key, step)))
    x = np.asarray(x)
    if is_chief:
      path = images.save_grid(x, os.path.join(workdir, "samples", f"step_{step}.png"),
                              scale=2)
      np.savez_compressed(os.path.join(workdir, "samples", f"step_{step}.npz"), samples=x)
      writer.add_image("samples", images.image_grid(x), step, dataformats="HWC")
      logging.info("step %d: %d samples (%s, NFE %d) -> %s", step, len(x),
                   config.sampling.method, int(nfe), path)

  def save(step: int) -> None:
    checkpoints.save(manager, step, state)

  # The loop: one compiled call per n_jitted steps; the last call may be shorter.
  batches = train_data.iterate(start_step=start)
  bar = tqdm(total=n_iters, initial=start, desc="train", unit="step", disable=not progress,
             dynamic_ncols=True)
  step, last_log_time, last_log_step = start, time.perf_counter(), start
  try:
    while step < n_iters:
      n = min(n_jitted, n_iters - step)
      host = [next(batches) for _ in range(n)]
      batch = {k: np.stack([b[k] for b in host]) for k in ("image", "label")}
      state, metrics = step_fn(state, base_key, shard_batch(batch, mesh, axis=1))
      metrics = to_host(metrics)
      if not np.all(np.isfinite(metrics["loss"])):
        bad = step + int(np.argmin(np.isfinite(metrics["loss"])))
        last = manager.latest_step()
        raise NonFiniteLossError(
            f"Non-finite loss {metrics['loss'].tolist()} at step {bad}; stopped without "
            f"saving. Last good checkpoint: "
            f"{'step ' + str(last) if last is not None else 'none'} in "
            f"{checkpoints.checkpoint_dir(workdir)}. Try a lower config.optim.lr, a "
            f"longer warmup or config.optim.grad_clip.")
      previous, step = step, step + n
      bar.update(n)
      bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4g}")

      def crossed(freq: int) -> bool:
        return step // freq > previous // freq or step == n_iters

      if crossed(int(t.log_freq)):
        now = time.perf_counter()
        steps_per_s = (step - last_log_step) / max(now - last_log_time, 1e-9)
        record = dict(step=step, loss=float(np.mean(metrics["loss"])),
                      grad_norm=float(metrics["grad_norm"][-1]), lr=float(metrics["lr"][-1]),
                      steps_per_s=steps_per_s,
                      images_per_s=steps_per_s * int(t.batch_size))
        last_log_time, last_log_step = now, step
        if is_chief:
          for k, v in record.items():
            if k != "step":
              writer.add_scalar(f"train/{k}", v, step)
          _log_json(metrics_path, record)
        logging.info("step %d: loss %.5f, grad norm %.3f, lr %.2e, %.2f steps/s",
                     step, record["loss"], record["grad_norm"], record["lr"], steps_per_s)
      if crossed(int(t.eval_freq)):
        # One test batch (batch index step / eval_freq, cycling), EMA weights, no dropout.
        test_batch = eval_data.batch(step // int(t.eval_freq))
        total, count = to_host(eval_fn(state.variables(ema=True),
                                       jax.random.fold_in(eval_key, step),
                                       shard_batch(test_batch, mesh)))
        eval_loss = float(total) / float(count)
        if is_chief:
          writer.add_scalar("eval/loss", eval_loss, step)
          _log_json(metrics_path, dict(step=step, eval_loss=eval_loss))
        bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4g}", eval=f"{eval_loss:.4g}")
      is_snapshot = step % int(t.snapshot_freq) == 0 or step == n_iters
      if is_snapshot or step % int(t.snapshot_freq_for_preemption) == 0:
        save(step)
      if is_snapshot:
        snapshot(step)
  except KeyboardInterrupt:
    # Keep the last completed step (its losses were finite) before giving up.
    if step > start and manager.latest_step() != step:
      logging.warning("Interrupted: saving step %d before exiting", step)
      save(step)
    raise
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  return state
