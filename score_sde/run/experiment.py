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
import json
import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from score_sde import guidance, losses, models, sampling
from score_sde import parameterization as param_lib
from score_sde import sde as sde_lib
from score_sde.checks import check_choice
from score_sde.models.dit import DiT
from score_sde.io import datasets, parallel
from score_sde.io import workdir as workdir_lib
from score_sde.run import latent as latent_lib
from score_sde.run import networks

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


def make_score_model(config: ml_collections.ConfigDict, network: nn.Module | None,
                     sde: sde_lib.SDE | None = None) -> models.ScoreModel:
  """`models.ScoreModel` of `network` (None: only to check the settings) on the config's SDE,
  with `model.parameterization`, `model.sigma_data` and `training.continuous`.

  Raises:
    ValueError: an unknown parameterization, sigma_data <= 0, or a parameterization that
      needs continuous time with discrete labels.
  """
  m = config.model
  return models.ScoreModel(
      network, make_sde(config) if sde is None else sde,
      parameterization=str(m.get("parameterization", "auto")),
      sigma_data=float(m.get("sigma_data", 0.5)),
      continuous=bool(config.training.continuous))


def make_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> losses.LossFn:
  """The DSM loss of `config.training` (weighting, reduce_mean, eps, importance sampling)."""
  training = config.training
  return losses.get_loss_fn(sde, weighting=training.weighting,
                            reduce_mean=bool(training.reduce_mean), eps=float(training.eps),
                            importance_sampling=bool(training.get("importance_sampling", False)),
                            time_sampling=training.get("time_sampling", "uniform"),
                            p_mean=float(training.get("p_mean", -1.2)),
                            p_std=float(training.get("p_std", 1.2)),
                            sigma_data=float(config.model.get("sigma_data", 0.5)))


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
  check_choice("config.optim.optimizer", o.optimizer, OPTIMIZERS)
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
# Per method: config field -> sampler option, where the option's plain field means something
# else (`sampling.corrector` is pc's corrector name; unipc's UniC switch is a bool).
METHOD_FIELDS = {"unipc": {"unipc_corrector": "corrector"}}


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
  own = METHOD_FIELDS.get(method, {})
  for field, value in s.items():
    if field in own:
      name = own[field]
    elif field in own.values() or any(field in f for f in METHOD_FIELDS.values()):
      continue  # the plain field is another method's; this one reads its own
    else:
      name = SAMPLING_RENAMES.get(field, field)
    if name in valid and value is not None:
      options[name] = tuple(value) if isinstance(value, list) else value
  if "data_range" in valid:  # clipping / thresholding range: the scaled data's
    options["data_range"] = data_range(config)
  return method, options


def data_range(config: ml_collections.ConfigDict) -> tuple[float, float]:
  """The range of the data as the network sees it: [-1, 1] if `data.centered`, else [0, 1]
  (what clipping / thresholding of the denoised estimate clips to)."""
  if latent_lib.latent_path(config) is not None:  # latents: no fixed range
    return (-math.inf, math.inf)
  return (-1.0, 1.0) if config.data.centered else (0.0, 1.0)


def data_spec(config: ml_collections.ConfigDict) -> datasets.DataSpec:
  """`config.data` (and `config.seed`, the data seed) as a `datasets.DataSpec`."""
  d = config.data
  channels = d.get("num_channels", None)
  return datasets.DataSpec(
      dataset=str(d.dataset), image_size=int(d.image_size),
      num_channels=None if channels is None else int(channels),
      data_dir=d.get("data_dir", None) or None, tfds_data_dir=d.get("tfds_data_dir", None),
      random_flip=bool(d.get("random_flip", False)),
      uniform_dequantization=bool(d.get("uniform_dequantization", False)),
      seed=int(config.get("seed", 0)))


def make_dataset(config: ml_collections.ConfigDict, split: str = "train", *,
                 batch_size: int | None = None, **kwargs) -> datasets.Dataset:
  """`datasets.get_dataset` of the config's data; `batch_size` None: `training.batch_size`
  for train, `eval.batch_size` for test. Other keyword arguments as `get_dataset`'s."""
  if batch_size is None:
    batch_size = int(config.training.batch_size if split == "train"
                     else config.eval.batch_size)
  return datasets.get_dataset(data_spec(config), split, batch_size=batch_size, **kwargs)


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
    score_model: the network, its forward process and what it predicts (at float32; the
      `sde`, `model` and `continuous` properties read it).
    image_shape: `(H, W, C)` of the network's input.
    loss_fn: from `losses.get_loss_fn`.
    optimizer: the optax transformation (gradients of `params` only).
    schedule: the learning-rate schedule (reported in the metrics), or None.
    ema_rate: EMA decay per step.
    ema_warmup: use the decay min(ema_rate, (1 + step) / (10 + step)) instead, so that a
      short run's EMA weights are not dominated by the initialization.
    conditional: pass the batch's class labels to the network.
    centered: model inputs in [-1, 1] (data in [0, 1] are scaled inside the compiled code).
    label_dropout: with `conditional`, the probability that a training label becomes the
      null label `num_classes` (classifier-free guidance).
    num_classes: the model's number of classes (0: unconditional).
    train_precision, eval_precision, sample_precision: the network's compute precision
      ('float32' | 'bfloat16', `models.PRECISIONS`) in the train step, the evaluation
      (loss, bits/dim) and sampling; `network(purpose)` gives the network at it.
    latent: a latent run's `latent.LatentSpace` (None: pixel space). Batches are encoded
      before the compiled step, and the scaled latents are the model's data as they are
      (`scaler` is the identity); samples are decoded to [0, 1].
  """
  score_model: models.ScoreModel
  image_shape: tuple[int, int, int]
  loss_fn: losses.LossFn
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule | None = None
  ema_rate: float = 0.9999
  ema_warmup: bool = False
  conditional: bool = False
  centered: bool = False
  label_dropout: float = 0.0
  num_classes: int = 0
  train_precision: str = "float32"
  eval_precision: str = "float32"
  sample_precision: str = "float32"
  latent: latent_lib.LatentSpace | None = None

  def network(self, purpose: str) -> nn.Module:
    """`model` at the precision of `purpose` ('train' | 'eval' | 'sample'); the same
    variables serve every precision."""
    precisions = {"train": self.train_precision, "eval": self.eval_precision,
                  "sample": self.sample_precision}
    check_choice("purpose", purpose, precisions)
    return models.with_precision(self.model, precisions[purpose])

  def score_model_for(self, purpose: str) -> models.ScoreModel:
    """`score_model` with its network at the precision of `purpose`."""
    return self.score_model.with_network(self.network(purpose))

  @property
  def sde(self) -> sde_lib.SDE:
    return self.score_model.sde

  @property
  def model(self) -> nn.Module:
    """The network at float32."""
    return self.score_model.network

  @property
  def continuous(self) -> bool:
    return self.score_model.continuous

  @property
  def scaler(self) -> Callable[[Any], Any]:
    """Data [0, 1] -> model scale (the identity on a latent run's encoded batches)."""
    if self.latent is not None:
      return lambda x: x
    return datasets.get_data_scaler(self.centered)

  @property
  def inverse_scaler(self) -> Callable[[Any], Any]:
    """Model scale -> data [0, 1] (a latent run's samples are decoded instead, see
    `programs.make_sample_fn`: this is the identity on its latents)."""
    if self.latent is not None:
      return lambda x: x
    return datasets.get_data_inverse_scaler(self.centered)


def run_spec(config: ml_collections.ConfigDict,
             latent: latent_lib.LatentSpace | None = None) -> RunSpec:
  """The `RunSpec` of a config (builds the SDE, network, loss and optimizer); `latent`: a
  latent run's space (`latent.latent_space(config, workdir)`), which a run with
  `config.data.latent` needs for its programs (its shapes come from the config alone)."""
  sde = make_sde(config)
  return RunSpec(
      score_model=make_score_model(config, networks.get_model(config), sde),
      image_shape=networks.image_shape(config),
      loss_fn=make_loss_fn(config, sde),
      optimizer=make_optimizer(config), schedule=learning_rate_schedule(config),
      ema_rate=float(config.model.ema_rate),
      ema_warmup=bool(config.training.get("ema_warmup", False)),
      conditional=is_conditional(config),
      centered=bool(config.data.centered),
      label_dropout=float(config.training.get("label_dropout", 0.0)),
      num_classes=int(config.model.get("num_classes", 0)),
      train_precision=str(config.training.get("precision", "float32")),
      eval_precision=str(config.eval.get("precision", "float32")),
      sample_precision=str(config.sampling.get("precision", "float32")),
      latent=latent)


# ----------------------------------------------------------------------------------------
# Guidance and the classifier of classifier guidance.

GUIDANCE = ("none", "cfg", "classifier")


def guidance_settings(config: ml_collections.ConfigDict) -> tuple[str, float, int]:
  """`(guidance, scale, class_label)` from `config.sampling` (defaults: none, 0, 0)."""
  s = config.sampling
  return (str(s.get("guidance", "none")).lower(), float(s.get("guidance_scale", 0.0)),
          s.get("class_label", 0))


def check_guidance_config(config: ml_collections.ConfigDict) -> None:
  """Validates the guidance settings before anything compiles (that a classifier for this
  config's data is in the run's directory, `guided.check_guidance` checks).

  Raises:
    ValueError: unknown guidance name, CFG asked of an unconditional model
      (`model.num_classes == 0`), a class label out of range, a classifier for other data.
  """
  name, _, label = guidance_settings(config)
  check_choice("config.sampling.guidance", name, GUIDANCE)
  if name == "none":
    return
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
    raise ValueError(f"config.sampling.class_label must be an int, got {label!r}")
  num_classes = int(config.model.get("num_classes", 0))
  if name == "cfg":
    if num_classes < 1:
      raise ValueError("config.sampling.guidance='cfg' needs a class-conditional model "
                       "(config.model.num_classes > 0, trained with training.label_dropout > "
                       f"0), but config.model.num_classes={num_classes}; use guidance='none' "
                       "or 'classifier'")
    guidance.check_labels(label, num_classes, allow_null=True,
                          what="config.sampling.class_label")
    return
  check_classifier_config(config)
  guidance.check_labels(label, int(config.classifier.num_classes), allow_null=False,
                        what="config.sampling.class_label")


def check_classifier_config(config: ml_collections.ConfigDict) -> None:
  """Validates `config.classifier` before anything compiles.

  Raises:
    ValueError: a non-positive size or step count, fewer than 2 classes, or a snapshot
      frequency < 1.
  """
  c = config.classifier
  for field in ("nf", "num_res_blocks", "batch_size", "n_iters", "log_freq", "snapshot_freq"):
    if int(c[field]) < 1:
      raise ValueError(f"config.classifier.{field} must be >= 1, got {c[field]}")
  if int(c.num_classes) < 2:
    raise ValueError(f"config.classifier.num_classes must be >= 2, got {c.num_classes}")
  if not 0.0 < float(c.eps) < 1.0:
    raise ValueError(f"config.classifier.eps must lie in (0, 1), got {c.eps}")
  make_sde(config)



# ----------------------------------------------------------------------------------------
# The validation pass: every field a run uses, before anything compiles.

# The modes `check_config` knows (main.MODES adds train_classifier, checked as train).
CHECKED_MODES = ("train", "eval", "sample")


def _number(section: str, config: ml_collections.ConfigDict, field: str, *, minimum=None,
            maximum=None, integer: bool = False, min_open: bool = False,
            max_open: bool = False, optional: bool = False) -> None:
  """Raises ValueError unless `config.<section>.<field>` is a finite number (an int if
  `integer`) in the range [minimum, maximum] (open ends with `min_open` / `max_open`)."""
  value = config[section].get(field, None)
  if value is None and optional:
    return
  lo = "" if minimum is None else ("(" if min_open else "[") + str(minimum)
  hi = "" if maximum is None else str(maximum) + (")" if max_open else "]")
  wanted = ("an integer" if integer else "a number") + (
      f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else "")
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and (not integer or float(value).is_integer()))
  if ok and minimum is not None:
    ok = value > minimum if min_open else value >= minimum
  if ok and maximum is not None:
    ok = value < maximum if max_open else value <= maximum
  if not ok:
    raise ValueError(f"config.{section}.{field} must be {wanted}, got {value!r}")


def _choice(section: str, config: ml_collections.ConfigDict, field: str, valid,
            default: Any = None) -> None:
  check_choice(f"config.{section}.{field}", config[section].get(field, default), valid)


def _check_training(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  training = config.training
  # The noise range of the VE SDE and of EDM-style sigmas (whatever the SDE: a typo is a typo).
  _number("model", config, "sigma_min", minimum=0, min_open=True, optional=True)
  _number("model", config, "sigma_max", minimum=0, min_open=True, optional=True)
  m = config.model
  if m.get("sigma_min") is not None and m.get("sigma_max") is not None and not (
      float(m.sigma_min) < float(m.sigma_max)):
    raise ValueError(f"config.model.sigma_min={m.sigma_min} must be below "
                     f"config.model.sigma_max={m.sigma_max}")
  # The log-normal time sampling's N(p_mean, p_std^2) of log sigma.
  _number("training", config, "p_mean", optional=True)
  _number("training", config, "p_std", minimum=0, min_open=True, optional=True)
  _check_parameterization(config)  # before the SDE is built: it takes these fields
  sde = make_sde(config)
  try:
    make_score_model(config, None, sde)
  except ValueError as e:
    raise ValueError(f"config.model.parameterization="
                     f"{config.model.get('parameterization', 'auto')!r}: {e}") from None
  _choice("training", config, "weighting", losses.WEIGHTINGS)
  _choice("training", config, "time_sampling", losses.TIME_SAMPLINGS, "uniform")
  _choice("training", config, "precision", models.PRECISIONS, "float32")
  try:
    make_loss_fn(config, sde)
  except ValueError as e:
    raise ValueError(f"config.training (weighting={training.weighting!r}, "
                     f"importance_sampling={training.get('importance_sampling')!r}): {e}"
                     ) from None
  _number("training", config, "eps", minimum=0, maximum=sde.T, min_open=True, max_open=True)
  for field in ("batch_size", "n_iters", "n_jitted_steps", "snapshot_freq",
                "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
    _number("training", config, field, minimum=1, integer=True)
  if mode != "train":  # the device count may differ from training's
    return
  parallel.check_batch(int(training.batch_size), mesh)
  for field in ("snapshot_freq", "snapshot_freq_for_preemption"):
    if training[field] % training.n_jitted_steps:
      raise ValueError(f"config.training.{field}={training[field]} must be a multiple of "
                       f"config.training.n_jitted_steps={training.n_jitted_steps}")
  label_dropout = float(training.get("label_dropout", 0.0))
  if not 0.0 <= label_dropout < 1.0:
    raise ValueError(f"config.training.label_dropout must lie in [0, 1), got {label_dropout}")
  if label_dropout > 0 and not is_conditional(config):
    raise ValueError(f"config.training.label_dropout={label_dropout} needs a class-conditional "
                     f"model (config.model.num_classes > 0), got num_classes="
                     f"{config.model.get('num_classes', 0)}")


def _check_data(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  del mesh, mode
  _number("data", config, "image_size", minimum=1, integer=True)
  _number("data", config, "num_channels", minimum=1, integer=True)
  latent_lib.check_latent_config(config)


def _check_model(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  del mesh, mode
  d, m = config.data, config.model
  try:
    networks.get_model(config)
  except ValueError as e:
    raise ValueError(f"config.model (name={m.name!r}): {e}") from None
  _number("model", config, "num_scales", minimum=1, integer=True)
  _number("model", config, "ema_rate", minimum=0, maximum=1, max_open=True)
  if models.MODELS[m.name] is DiT:  # its shapes are checked by networks.get_model
    _check_dit_label_dropout(config)
    return
  _number("model", config, "nf", minimum=1, integer=True)
  _number("model", config, "fourier_scale", minimum=0, min_open=True, optional=True)
  _number("model", config, "init_scale", minimum=0, optional=True)
  _number("model", config, "num_res_blocks", minimum=1, integer=True)
  _number("model", config, "dropout", minimum=0, maximum=1, max_open=True)
  _number("model", config, "num_classes", minimum=0, integer=True, optional=True)
  ch_mult = m.get("ch_mult", None)
  if (not isinstance(ch_mult, (tuple, list)) or not ch_mult
      or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in ch_mult)):
    raise ValueError(f"config.model.ch_mult must be a non-empty tuple of integers >= 1, got "
                     f"{ch_mult!r}")
  levels = len(m.ch_mult) - 1
  size = networks.image_shape(config)[0]  # a latent run's network sees the latents
  what = (f"config.data.image_size={d.image_size}" if latent_lib.latent_path(config) is None
          else f"the latent size {size} (config.data.latent)")
  if size % (2 ** levels):
    raise ValueError(f"{what} is not divisible by "
                     f"2**(len(ch_mult) - 1) = {2 ** levels} (ch_mult={tuple(m.ch_mult)})")
  resolutions = {size // 2 ** i for i in range(levels + 1)}
  bad = sorted(set(m.attn_resolutions) - resolutions)
  if bad:
    raise ValueError(f"config.model.attn_resolutions {bad} are not resolutions of this "
                     f"network; valid: {sorted(resolutions)}")


def _check_dit_label_dropout(config: ml_collections.ConfigDict) -> None:
  """Exactly one label dropout: a conditional DiT with `model.class_dropout_prob > 0` drops
  labels itself (in the network, as the reference; it also has the null row), so
  `training.label_dropout` (the train step's, for every network) must then be 0; with
  `class_dropout_prob = 0` the DiT has no null row, so there is nothing to drop to.

  Raises:
    ValueError: both > 0, or `training.label_dropout > 0` with `class_dropout_prob = 0`.
  """
  m = config.model
  inner = float(m.get("class_dropout_prob", 0.1))
  outer = float(config.training.get("label_dropout", 0.0))
  if int(m.get("num_classes", 0)) < 1 or outer == 0:
    return
  if inner > 0:
    raise ValueError(f"config.model.class_dropout_prob={inner} (the DiT's own label dropout) "
                     f"and config.training.label_dropout={outer} would both drop labels; set "
                     "training.label_dropout=0 (the DiT's dropout is the reference's) or "
                     "model.class_dropout_prob=0")
  raise ValueError(f"config.training.label_dropout={outer} drops labels to the null class, "
                   "but a DiT with config.model.class_dropout_prob=0 has no null class row; "
                   f"set model.class_dropout_prob={outer} and training.label_dropout=0")


def _check_parameterization(config: ml_collections.ConfigDict) -> None:
  """`model.parameterization` / `schedule` by name, and that a network that divides its
  output by sigma (`scale_by_sigma`) predicts a score. (Whether the parameterization fits
  discrete labels `models.ScoreModel` answers when `check_config` builds it through
  `make_score_model`, before anything compiles.)"""
  m = config.model
  _choice("model", config, "parameterization", param_lib.PARAMETERIZATIONS, "auto")
  schedules = getattr(sde_lib.SDES.get(str(config.training.sde).lower()), "SCHEDULES", None)
  if schedules is not None:  # the SDEs with a beta schedule name theirs
    _choice("model", config, "schedule", schedules, "linear")
  _number("model", config, "sigma_data", minimum=0, min_open=True, optional=True)
  name = m.get("parameterization", "auto")
  if name not in ("auto", "score") and m.scale_by_sigma:
    raise ValueError(f"config.model.scale_by_sigma=True makes the network divide its output "
                     f"by sigma (a score); it does not fit config.model.parameterization="
                     f"{name!r}: set scale_by_sigma=False or parameterization 'auto' / 'score'")


def _check_optim(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  del mesh, mode
  _choice("optim", config, "optimizer", OPTIMIZERS)
  _number("optim", config, "lr", minimum=0, min_open=True)
  _number("optim", config, "warmup", minimum=0, integer=True)
  _number("optim", config, "beta1", minimum=0, maximum=1, max_open=True)
  _number("optim", config, "eps", minimum=0)
  _number("optim", config, "weight_decay", minimum=0)
  _number("optim", config, "grad_clip", optional=True)  # < 0: no clipping
  make_optimizer(config)


def _check_sampling(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  del mode
  _number("sampling", config, "guidance_scale", optional=True)  # finite (NaN in, NaN out)
  check_guidance_config(config)
  s = config.sampling
  _choice("sampling", config, "precision", models.PRECISIONS, "float32")
  _number("sampling", config, "batch_size", minimum=1, integer=True)
  parallel.check_batch(int(s.batch_size), mesh, "config.sampling.batch_size")
  method, options = sampler_settings(config)
  # Names are checked whatever the method (a typo is a typo); values for the method's options.
  for field, valid in (("predictor", sampling.PREDICTORS), ("corrector", sampling.CORRECTORS),
                       ("solver", sampling.ODE_SOLVERS)):
    if field in s:
      _choice("sampling", config, field, valid)
  if "order" in s:
    _choice("sampling", config, "order", (1, 2, 3))
  _choice("sampling", config, "threshold", sampling.THRESHOLDS, "none")
  _number("sampling", config, "threshold_percentile", minimum=0, maximum=1, min_open=True,
          optional=True)
  ranges = dict(steps=dict(minimum=2 if method == "heun" else 1, integer=True, optional=True),
                n_steps_each=dict(minimum=1, integer=True), snr=dict(minimum=0, min_open=True),
                rtol=dict(minimum=0, min_open=True), atol=dict(minimum=0, min_open=True),
                eta=dict(minimum=0), rho=dict(minimum=0, min_open=True),
                s_churn=dict(minimum=0), eps=dict(minimum=0, min_open=True, optional=True))
  for field, limits in ranges.items():
    if SAMPLING_RENAMES.get(field, field) in options or field == "steps":
      _number("sampling", config, field, **limits)
  if options.get("variance") == "learned":  # ddpm with the network's variance
    m = config.model
    if not (models.MODELS.get(m.name) is DiT and m.get("learn_sigma", False)):
      raise ValueError(f"config.sampling.variance='learned' needs a network with learned "
                       f"variance (config.model.name='dit' with learn_sigma=True), got "
                       f"name={m.name!r}, learn_sigma={m.get('learn_sigma', False)!r}; valid "
                       f"variances: {[v for v in sampling.DDPM_VARIANCES if v != 'learned']}")
    options = {**options, "var_interp_fn": lambda x, t: x}  # made by programs.make_sample_fn
  # The sampler's own checks (option combinations, ranges that depend on the SDE), without
  # tracing or compiling it.
  try:
    sampling.check_options(make_sde(config), method, options)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.sampling (method={method!r}): {e}") from None


def _check_eval(config: ml_collections.ConfigDict, mesh: Mesh, mode: str) -> None:
  del mode
  _choice("eval", config, "precision", models.PRECISIONS, "float32")
  _number("eval", config, "batch_size", minimum=1, integer=True)
  parallel.check_batch(int(config.eval.batch_size), mesh, "config.eval.batch_size")
  _number("eval", config, "num_samples", minimum=1, integer=True)
  _number("eval", config, "bpd_num_examples", minimum=1, integer=True, optional=True)
  _number("eval", config, "bpd_rtol", minimum=0, min_open=True)
  _number("eval", config, "bpd_atol", minimum=0, min_open=True)


# One check per config section, run in this order for every mode; each raises ValueError
# naming the field (`config.<section>.<field>`), the bad value and the valid range or
# choices. A new field gets its check in its section's function; a new section, an entry.
SECTION_CHECKS: dict[str, Callable[[ml_collections.ConfigDict, Mesh, str], None]] = {
    "training": _check_training,
    "data": _check_data,
    "model": _check_model,
    "optim": _check_optim,
    "sampling": _check_sampling,
    "eval": _check_eval,
}


def check_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
                 mode: str = "train") -> None:
  """Validates a config before any compilation or data loading.

  Args:
    config: the run's config.
    mesh: the device mesh (default: all devices).
    mode: 'train', 'eval' or 'sample' (the training batch is checked against the devices
      only when training).

  Raises:
    ValueError: naming the field, its value and the valid ones: unknown SDE / model /
      sampler / predictor / corrector / solver / weighting / optimizer / precision names,
      sampler options out of range, batch sizes or sample counts < 1 or not divisible by the
      device count, a learning rate that is not finite and > 0, an EMA rate outside [0, 1),
      impossible image shapes, or snapshot frequencies that are not multiples of
      `n_jitted_steps`.
  """
  check_choice("mode", mode, CHECKED_MODES)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"The config must be an ml_collections.ConfigDict (get_config()'s "
                     f"result), got {type(config).__name__}")
  missing = [name for name in SECTION_CHECKS
             if not isinstance(config.get(name, None), ml_collections.ConfigDict)]
  if missing:
    raise ValueError(f"The config lacks section(s) {missing} (each a ConfigDict); it has "
                     f"{sorted(config.keys())}. Start from a file of configs/ "
                     f"(e.g. configs/default.py's get_config)")
  seed = config.get("seed", 0)
  if (isinstance(seed, bool) or not isinstance(seed, int)
      or not -2 ** 63 <= seed < 2 ** 63):
    raise ValueError(f"config.seed must be a 64-bit integer, in [-2**63, 2**63) (what "
                     f"jax.random.PRNGKey takes), got {seed!r}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  for check in SECTION_CHECKS.values():
    check(config, mesh, mode)


# ----------------------------------------------------------------------------------------
# The run's config (`workdir/config.json`) against the one given.


def defines_network(path: str) -> bool:
  """Whether config field `path` ('model.nf') defines the trained network or the SDE: a
  checkpoint only means something with the values it was trained with."""
  section, _, field = path.partition(".")
  if section == "model":
    return field != "ema_rate"
  return path in ("training.sde", "training.continuous", "data.image_size",
                  "data.num_channels", "data.centered")


# Fields that may not change when resuming training either (they shape the optimizer state).
RESUME_FIELDS = ("optim.optimizer",)


def _flatten(plain: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in plain.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def config_differences(config: ml_collections.ConfigDict, saved: dict,
                       select: Callable[[str], bool]) -> list[str]:
  """`['model.nf (run: 16, given: 32)', ...]`: the fields chosen by `select` whose value in
  `config` differs from the saved (plain) config's."""
  given, run = _flatten(config_to_plain(config)), _flatten(saved)
  return [f"{path} (run: {run.get(path, 'unset')!r}, given: {given.get(path, 'unset')!r})"
          for path in sorted(set(given) | set(run))
          if select(path) and given.get(path) != run.get(path)]


def program_description(config: ml_collections.ConfigDict, spec: RunSpec) -> str | None:
  """What a compiled program of the run (train step, evaluation, sampling) depends on
  besides its inputs, for `programs.stored_program`: the whole config. None (not stored) for
  a latent run, whose programs also depend on the autoencoder's files."""
  if spec.latent is not None:
    return None
  return "config=" + json.dumps(config_to_plain(config), sort_keys=True)


def config_to_plain(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples -> lists), as `config.json` holds it."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_from_plain(plain: dict) -> ml_collections.ConfigDict:
  """A ConfigDict of plain JSON data (a run's `config.json`)."""
  return ml_collections.ConfigDict(plain, type_safe=False)


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> bool:
  """Sets `config.<path>` to a JSON value, adapted to the field's type (lists -> tuples,
  ints -> floats); False if the config has no such field."""
  *parents, field = path.split(".")
  node = config
  for name in parents:
    if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
      return False
    node = node[name]
  if field not in node:
    return False
  current = node[field]
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[field] = value
  return True


def config_for_run(config: ml_collections.ConfigDict, workdir: str, *,
                   overrides: Sequence[str] | None = None, allow_change: bool = False
                   ) -> ml_collections.ConfigDict:
  """The config to evaluate or sample a run with: the run's `config.json`, with `overrides`
  taken from `config` on top.

  Args:
    config: the given config (a config file with its command-line overrides).
    workdir: the run's directory.
    overrides: the field paths set on the command line ('sampling.method', ...); they win
      over the run's values. None: every field of `config` is meant as given (the Python API).
    allow_change: accept fields that define the network or the SDE differing from the run's
      (otherwise a ValueError).

  Returns:
    `config` itself if the run has no `config.json`, else a copy holding the run's values
    and the overrides.

  Raises:
    ValueError: a field that defines the network or the SDE differs from the run's (the
      message lists them), unless `allow_change`.
  """
  saved = workdir_lib.load_config(workdir)
  if saved is None:
    return config
  effective = config
  if overrides is not None:
    effective = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    explicit = tuple(overrides)
    for path, value in _flatten(saved).items():
      if not any(path == o or path.startswith(o + ".") for o in explicit):
        set_field(effective, path, value)
  changed = config_differences(effective, saved, defines_network)
  if changed and not allow_change:
    raise ValueError(
        f"The config differs from the run's {workdir_lib.config_path(workdir)} in fields that "
        f"define the trained network or the SDE: {'; '.join(changed)}. Drop those overrides "
        f"(or pass --allow_config_change to use them anyway)")
  if changed:
    logging.warning("Using fields that differ from the run's config: %s", "; ".join(changed))
  return effective


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if a run with checkpoints in `workdir` was trained with other values of
  the fields that define the network, the SDE or the optimizer state (listed)."""
  saved = workdir_lib.load_config(workdir)
  if saved is None:
    return
  changed = config_differences(config, saved,
                               lambda p: defines_network(p) or p in RESUME_FIELDS)
  if changed:
    raise ValueError(
        f"Cannot resume the run in {workdir} with this config: it differs from the run's "
        f"{workdir_lib.CONFIG_FILE} in fields that define the network, the SDE or the "
        f"optimizer: {'; '.join(changed)}. Use the run's values, or a new --workdir")
