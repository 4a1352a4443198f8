"""The noise-conditional classifier: training on noised data of the config's SDE, its own
checkpoints, and the `log_prob_fn` that classifier guidance takes.

    python -m score_sde.main --config=configs/fashion_mnist_vp.py --workdir=W \
        --mode=train_classifier

trains `models.classifier.NoiseConditionalClassifier` (sized by `config.classifier`) with the
cross-entropy of p_t(y | x_t), x_t = alpha(t) x_0 + sigma(t) z, t ~ U(classifier.eps, T), and
writes `W/classifier/checkpoints/<step>/`, `W/classifier/meta.json` (what it was trained on:
dataset, image shape, classes, SDE) and `W/classifier/metrics.jsonl`. Sampling with
`config.sampling.guidance='classifier'` loads it from the same workdir (`load_classifier`),
after checking that it was trained for the config's dataset and SDE.

The network sees x_t / sqrt(alpha^2 + sigma^2) (unit scale for every SDE; VE inputs would
otherwise grow to sigma_max) and the half log-SNR lambda(t).
"""

from __future__ import annotations

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

from score_sde import sde as sde_lib
from score_sde.sde import batch_scalar
from score_sde.models.classifier import NoiseConditionalClassifier
from score_sde.io import checkpoints, datasets, files, parallel
from score_sde.io.logs import MetricsWriter
from score_sde.run import experiment, keys
from score_sde.run import latent as latent_lib
from score_sde.run import programs
from score_sde.run.programs import NonFiniteLossError

Array = jax.Array
CLASSIFIER_DIR = "classifier"
META_FILE = "meta.json"


@flax.struct.dataclass
class ClassifierState:
  """step (int32), params, opt_state: the whole classifier run, one pytree."""
  step: Array
  params: Any
  opt_state: Any


def classifier_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CLASSIFIER_DIR)


def get_classifier(config: ml_collections.ConfigDict) -> NoiseConditionalClassifier:
  """The classifier network of `config.classifier` for the config's images."""
  c = config.classifier
  return NoiseConditionalClassifier(
      num_classes=int(c.num_classes), nf=int(c.nf), ch_mult=tuple(int(m) for m in c.ch_mult),
      num_res_blocks=int(c.num_res_blocks), dropout=float(c.dropout),
      centered=bool(config.data.centered))


def classifier_logits(sde: sde_lib.SDE, model, variables, x: Array, t: Array, *,
                      train: bool = False, rng: Array | None = None) -> Array:
  """Logits `[B, num_classes]` of p_t(y | x) for x `[B, H, W, C]` at times t `[B]`."""
  alpha, sigma = sde.alpha(t), sde.sigma(t)
  x_in = x / batch_scalar(jnp.sqrt(alpha**2 + sigma**2), x)
  rngs = {"dropout": rng} if rng is not None else None
  return model.apply(variables, x_in, sde.log_snr(t), train=train, rngs=rngs)


def get_log_prob_fn(sde: sde_lib.SDE, model, variables) -> Callable:
  """`log_prob_fn(x [B, *D], t [B], y [B]) -> [B]` = log p_t(y | x), for
  `guidance.classifier_guided`."""

  def log_prob_fn(x, t, y):
    logits = classifier_logits(sde, model, variables, x, t)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=-1)[:, 0]

  return log_prob_fn


def get_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  c = config.classifier
  schedule = (optax.linear_schedule(0.0, float(c.lr), int(c.warmup)) if c.warmup > 0
              else optax.constant_schedule(float(c.lr)))
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def init_state(key: Array, config: ml_collections.ConfigDict, model, optimizer
               ) -> ClassifierState:
  """A fresh state; usable under `jax.eval_shape`."""
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.num_channels))
  params = model.init(key, x, jnp.zeros((1,)), train=False)["params"]
  return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=optimizer.init(params))


def make_train_step(sde: sde_lib.SDE, model, optimizer: optax.GradientTransformation, *,
                    eps: float, scaler: Callable = lambda x: x, mesh: Mesh | None = None
                    ) -> Callable:
  """`step_fn(state, base_key, batch) -> (state, metrics)`, compiled: one optimizer step of
  the cross-entropy of p_t(y | x_t) on `batch` (`image [B, H, W, C]` in [0, 1], `label [B]`,
  sharded over `"batch"`); the key is `fold_in(base_key, step)`. `metrics`: `loss`,
  `accuracy` (of this batch, at its random noise levels). The input state is donated."""
  mesh = parallel.make_mesh() if mesh is None else mesh

  def step_fn(state: ClassifierState, base_key, batch):
    k_t, k_z, k_drop = jax.random.split(jax.random.fold_in(base_key, state.step), 3)
    x0 = scaler(batch["image"])
    b = x0.shape[0]
    t = jax.random.uniform(k_t, (b,), minval=eps, maxval=sde.T)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + batch_scalar(std, x0) * jax.random.normal(k_z, x0.shape, x0.dtype)

    def loss_fn(params):
      logits = classifier_logits(sde, model, {"params": params}, x_t, t, train=True,
                                 rng=k_drop)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return jnp.mean(loss), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, dict(loss=loss, accuracy=accuracy)

  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(replicated, replicated, NamedSharding(mesh, P("batch"))),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def _meta(config: ml_collections.ConfigDict) -> dict:
  """What a classifier checkpoint must agree with to be used with `config`."""
  return dict(dataset=str(config.data.dataset), image_size=int(config.data.image_size),
              num_channels=int(config.data.num_channels),
              num_classes=int(config.classifier.num_classes),
              centered=bool(config.data.centered), sde=str(config.training.sde).lower())


def check_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises unless `workdir/classifier` holds a classifier trained for `config`'s data.

  Raises:
    FileNotFoundError: no classifier there.
    ValueError: it was trained on another dataset, image shape, class count or SDE.
  """
  path = os.path.join(classifier_dir(workdir), META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No classifier in {classifier_dir(workdir)}; train one first "
                            f"(--mode=train_classifier with the same --workdir)")
  with open(path) as f:
    saved = json.load(f)
  wanted = _meta(config)
  bad = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
  if bad:
    detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in bad.items())
    raise ValueError(f"The classifier in {classifier_dir(workdir)} was trained for other data "
                     f"than this config ({detail}); train one for this config")


def load_classifier(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                    mesh: Mesh | None = None):
  """`(model, variables, step)` of the classifier checkpoint in `workdir/classifier`.

  Raises:
    FileNotFoundError / ValueError: as `check_checkpoint` (checked before anything compiles).
  """
  check_checkpoint(config, workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  model, optimizer = get_classifier(config), get_optimizer(config)
  abstract = _abstract_state(config, model, optimizer, mesh)
  with checkpoints.get_manager(classifier_dir(workdir), read_only=True) as manager:
    restored = checkpoints.restore(manager, abstract, step)
  if restored is None:
    raise FileNotFoundError(f"No classifier checkpoint in "
                            f"{checkpoints.checkpoint_dir(classifier_dir(workdir))}")
  state, step = restored
  return model, {"params": state.params}, step


def _abstract_state(config, model, optimizer, mesh):
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda k: init_state(k, config, model, optimizer),
                          jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """What `--mode=train_classifier` checks first, from the config alone (no file read):
  `experiment.check_classifier_config`, and that the run is in pixel space.

  Raises:
    ValueError: `config.data.latent` is set (classifier guidance on latents is not
      supported), or a bad `config.classifier` section.
  """
  path = latent_lib.latent_path(config)
  if path is not None:
    raise ValueError(
        f"--mode=train_classifier needs a pixel-space config: the noise-conditional "
        f"classifier is trained on noised images, for classifier guidance of a pixel-space "
        f"run, and classifier guidance on latents is not supported; this config's data are "
        f"latents (config.data.latent={path}). Supported: train the classifier with "
        f"config.data.latent unset and guide a pixel-space run, or on this latent run use "
        f"config.sampling.guidance='cfg' with a class-conditional model "
        f"(config.model.num_classes > 0, training.label_dropout > 0)")
  experiment.check_classifier_config(config)


def train_classifier(config: ml_collections.ConfigDict, workdir: str, *,
                     mesh: Mesh | None = None) -> ClassifierState:
  """Trains (or resumes) the noise-conditional classifier until `classifier.n_iters` steps.

  Raises:
    ValueError / FileNotFoundError: bad config (`check_training_config`: a latent config is
      refused), missing data, a dataset without labels or with another number of classes,
      or an existing classifier for other data (before compiling).
  """
  check_training_config(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  c = config.classifier
  parallel.check_batch(int(c.batch_size), mesh, "config.classifier.batch_size")
  out_dir = classifier_dir(workdir)
  if os.path.exists(os.path.join(out_dir, META_FILE)):
    check_checkpoint(config, workdir)
  data = experiment.make_dataset(config, "train", batch_size=int(c.batch_size),
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  if data.num_classes != int(c.num_classes):
    raise ValueError(f"config.classifier.num_classes={c.num_classes}, but dataset "
                     f"{config.data.dataset!r} has {data.num_classes} classes")
  os.makedirs(out_dir, exist_ok=True)
  if jax.process_index() == 0:
    files.write_json(os.path.join(out_dir, META_FILE), _meta(config), overwrite=True)

  sde = experiment.make_sde(config)
  model, optimizer = get_classifier(config), get_optimizer(config)
  replicated = NamedSharding(mesh, P())
  init_key, base_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                                             keys.CLASSIFIER))
  manager = checkpoints.get_manager(out_dir, keep=2)
  restored = checkpoints.restore(manager, _abstract_state(config, model, optimizer, mesh))
  if restored is None:
    state = jax.jit(lambda k: init_state(k, config, model, optimizer),
                    out_shardings=replicated)(init_key)
  else:
    state, _ = restored
  step_fn = make_train_step(sde, model, optimizer, eps=float(c.eps),
                            scaler=datasets.get_data_scaler(config.data.centered), mesh=mesh)
  base_key = jax.device_put(base_key, replicated)
  batches = data.iterate(start_step=int(state.step))
  start = time.perf_counter()
  writer = MetricsWriter(out_dir, enabled=jax.process_index() == 0)

  def take_step(state: ClassifierState):
    batch = next(batches)
    return step_fn(state, base_key, parallel.shard_batch({"image": batch["image"],
                                                           "label": batch["label"]}, mesh))

  def log(step: int, metrics: dict) -> dict:
    if not np.isfinite(metrics["loss"]):
      raise NonFiniteLossError(f"Non-finite classifier loss at step {step}")
    logging.info("classifier step %d: loss %.4f, accuracy %.3f", step, metrics["loss"],
                 metrics["accuracy"])
    return dict(**metrics, seconds=time.perf_counter() - start)

  return programs.train_loop(state, int(c.n_iters), take_step, manager=manager,
                             writer=writer, log_freq=int(c.log_freq),
                             snapshot_freq=int(c.snapshot_freq), log=log)
