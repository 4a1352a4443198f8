"""The config edge: a config becomes the objects a run is made of, and is checked first.

Only this module (with `main.py`, `train.py` and `evaluate.py`) reads a whole config; what it
returns are plain objects the math layer takes:

- `make_sde`, `make_loss_fn`, `make_optimizer` (+ `learning_rate_schedule`),
  `sampler_settings`, `run_keys`, `is_conditional`;
- `RunSpec`: one frozen record of everything the compiled step functions need (SDE, network,
  loss, optimizer, EMA, time labels, class labels, data scaling), built by `run_spec(config)`;
  `train.make_train_step`, `make_eval_loss_fn` and `make_sample_fn` take it;
- `check_config`: the validation pass before anything compiles, one small check function
  per config section (`SECTION_CHECKS`), so a new field gets its check next to its section's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from score_sde import datasets, losses, models, parallel, sampling
from score_sde import sde as sde_lib

Array = jax.Array

# ----------------------------------------------------------------------------------------
# Config -> objects.

# SDE dataclass field -> `config.model` field, where the names differ; every other field of
# the SDE named by `training.sde` is read from `config.model` under its own name if present.
_SDE_FIELDS_IN_CONFIG = {"N": "num_scales"}


def make_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
  """The forward SDE named by `config.training.sde`, its parameters from `config.model`
  (`num_scales` -> `N`; `beta_min`, `sigma_max`, `schedule`, ...: the same names).

  Raises:
    ValueError: unknown SDE name, or parameters the SDE rejects.
  """
  name = str(config.training.sde).lower()
  if name not in sde_lib.SDES:
    raise ValueError(f"Unknown config.training.sde {config.training.sde!r}; "
                     f"valid: {sorted(sde_lib.SDES)}")
  cls = sde_lib.SDES[name]
  kwargs = {}
  for field in dataclasses.fields(cls):
    key = _SDE_FIELDS_IN_CONFIG.get(field.name, field.name)
    value = config.model.get(key, None)
    if field.init and value is not None:
      default = field.default
      kwargs[field.name] = (type(default)(value) if default is not dataclasses.MISSING
                            else value)
  try:
    return cls(**kwargs)
  except ValueError as e:
    fields = ", ".join(f"config.model.{_SDE_FIELDS_IN_CONFIG.get(k, k)}={v!r}"
                       for k, v in kwargs.items())
    raise ValueError(f"Bad SDE parameters for config.training.sde={name!r} ({fields}): "
                     f"{e}") from None


def make_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> losses.LossFn:
  """The DSM loss of `config.training` (weighting, reduce_mean, eps, importance sampling)."""
  training = config.training
  return losses.get_loss_fn(sde, weighting=training.weighting,
                            reduce_mean=bool(training.reduce_mean), eps=float(training.eps),
                            importance_sampling=bool(training.get("importance_sampling", False)))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup` steps, then constant (as the
  reference)."""
  o = config.optim
  if o.warmup > 0:
    return optax.linear_schedule(0.0, float(o.lr), int(o.warmup))
  return optax.constant_schedule(float(o.lr))


OPTIMIZERS = ("Adam", "AdamW")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
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
SAMPLING_RENAMES = {"n_steps_each": "n_steps", "noise_removal": "denoise"}


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
    name = SAMPLING_RENAMES.get(field, field)
    if name in valid and value is not None:
      options[name] = tuple(value) if isinstance(value, list) else value
  return method, options


def is_conditional(config: ml_collections.ConfigDict) -> bool:
  """Whether the network takes class labels (`model.num_classes > 0`)."""
  return int(config.model.get("num_classes", 0)) > 0


def run_keys(config: ml_collections.ConfigDict) -> tuple[Array, Array, Array, Array]:
  """The run's base keys from `config.seed`: (init, train steps, snapshot samples, eval)."""
  return tuple(jax.random.split(jax.random.PRNGKey(int(config.seed)), 4))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What the compiled step functions of a run need, as plain objects.

  Attributes:
    sde: the forward SDE.
    model: the score network (a Flax module).
    loss_fn: from `losses.get_loss_fn`.
    optimizer: the optax transformation (gradients of `params` only).
    schedule: the learning-rate schedule (reported in the metrics), or None.
    ema_rate: EMA decay per step.
    ema_warmup: use the decay min(ema_rate, (1 + step) / (10 + step)) instead, so that a
      short run's EMA weights are not dominated by the initialization.
    continuous: continuous-time network labels (vs. discrete step indices).
    conditional: pass the batch's class labels to the network.
    centered: model inputs in [-1, 1] (data in [0, 1] are scaled inside the compiled code).
  """
  sde: sde_lib.SDE
  model: nn.Module
  loss_fn: losses.LossFn
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule | None = None
  ema_rate: float = 0.9999
  ema_warmup: bool = False
  continuous: bool = True
  conditional: bool = False
  centered: bool = False

  @property
  def scaler(self) -> Callable[[Any], Any]:
    """Data [0, 1] -> model scale."""
    return datasets.get_data_scaler(self.centered)

  @property
  def inverse_scaler(self) -> Callable[[Any], Any]:
    """Model scale -> data [0, 1]."""
    return datasets.get_data_inverse_scaler(self.centered)


def run_spec(config: ml_collections.ConfigDict) -> RunSpec:
  """The `RunSpec` of a config (builds the SDE, network, loss and optimizer)."""
  sde = make_sde(config)
  return RunSpec(
      sde=sde, model=models.get_model(config), loss_fn=make_loss_fn(config, sde),
      optimizer=make_optimizer(config), schedule=learning_rate_schedule(config),
      ema_rate=float(config.model.ema_rate),
      ema_warmup=bool(config.training.get("ema_warmup", False)),
      continuous=bool(config.training.continuous), conditional=is_conditional(config),
      centered=bool(config.data.centered))


# ----------------------------------------------------------------------------------------
# The validation pass: every field a run uses, before anything compiles.


def _check_training(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  training = config.training
  make_sde(config)
  make_loss_fn(config, make_sde(config))
  for field in ("batch_size", "n_iters", "n_jitted_steps", "snapshot_freq",
                "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
    if int(training[field]) < 1:
      raise ValueError(f"config.training.{field} must be >= 1, got {training[field]}")
  parallel.check_batch(int(training.batch_size), mesh)
  for field in ("snapshot_freq", "snapshot_freq_for_preemption"):
    if training[field] % training.n_jitted_steps:
      raise ValueError(f"config.training.{field}={training[field]} must be a multiple of "
                       f"config.training.n_jitted_steps={training.n_jitted_steps}")


def _check_model(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  del mesh
  models.get_model(config)
  d, m = config.data, config.model
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


def _check_optim(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  del mesh
  make_optimizer(config)


def _check_sampling(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  sampler_settings(config)
  parallel.check_batch(int(config.sampling.batch_size), mesh, "config.sampling.batch_size")


def _check_eval(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  parallel.check_batch(int(config.eval.batch_size), mesh, "config.eval.batch_size")


# One check per config section, run in this order; each raises ValueError naming the field,
# the bad value and the valid ones. Add a field's check to its section's function.
SECTION_CHECKS: dict[str, Callable[[ml_collections.ConfigDict, Mesh], None]] = {
    "training": _check_training,
    "model": _check_model,
    "optim": _check_optim,
    "sampling": _check_sampling,
    "eval": _check_eval,
}


def check_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
  """Validates a config before any compilation or data loading.

  Raises:
    ValueError: unknown SDE / model / sampler / weighting / optimizer names, impossible image
      shapes, a batch size not divisible by the device count, or snapshot frequencies that
      are not multiples of `n_jitted_steps`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  for check in SECTION_CHECKS.values():
    check(config, mesh)
