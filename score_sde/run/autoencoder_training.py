"""Phase 1 of latent diffusion: training the KL autoencoder (`--mode=train_autoencoder`).

The objective is LDM's (Rombach et al. 2022, `LPIPSWithDiscriminator` without LPIPS), per
example summed over pixels / latent entries and averaged over the batch:

    L_ae = rec + kl_weight * KL(q(z|x) || N(0, I)) + [step >= disc_start] * lambda * g
    rec  = sum |x - D(z)|  ('l1')   or   sum (x - D(z))^2  ('l2'),   z ~ q(z | x)
    g    = -mean D_phi(D(z))                                   (the generator's hinge term)
    lambda = disc_weight * clip(||grad_w rec|| / (||grad_w g|| + 1e-4), 0, 1e4)

with w the decoder's last convolution kernel and lambda held constant in the gradient
(LDM's adaptive weight). The patch discriminator D_phi (`models.autoencoder.
PatchDiscriminator`) minimizes the hinge loss `0.5 (mean relu(1 - D_phi(x)) + mean relu(1 +
D_phi(D(z))))` from `disc_start` on. `disc_weight = 0` trains without a discriminator. Both
use Adam; the autoencoder's weights have an EMA (`ema_rate`), the weights phase 2 uses.

Everything lives under `WORKDIR/autoencoder/` (`run.autoencoder`): `autoencoder.json`,
orbax checkpoints of the whole `AETrainState` (resumed bitwise: batch `k` and the step's keys
depend only on the seed and `k`), `metrics.jsonl` and TensorBoard events with the train
losses and the reconstruction PSNR of the EMA weights on the test split.
"""

from __future__ import annotations

import functools
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

from score_sde.checks import check_choice
from score_sde.io import checkpoints, images, parallel
from score_sde.io.logs import MetricsWriter
from score_sde.models import autoencoder as ae_lib
from score_sde.run import autoencoder as autoencoder_run
from score_sde.run import experiment
from score_sde.run import programs
from score_sde.run.programs import NonFiniteLossError

Array = jax.Array

RECONSTRUCTIONS = ("l1", "l2")
# Key streams: fold_in(PRNGKey(seed), AUTOENCODER) -> (init, steps); the step key
# fold_in(steps, step) -> (posterior sample, unused).
AUTOENCODER = 25


@flax.struct.dataclass
class AETrainState:
  """step, the autoencoder's params / Adam state / EMA, the discriminator's params / Adam."""
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  disc_params: Any
  disc_opt_state: Any


@flax.struct.dataclass
class AESpec:
  """What the phase-1 step needs, from `config.autoencoder` (`ae_spec`)."""
  module: ae_lib.AutoencoderKL = flax.struct.field(pytree_node=False)
  discriminator: ae_lib.PatchDiscriminator | None = flax.struct.field(pytree_node=False)
  optimizer: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc_optimizer: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  image_shape: tuple = flax.struct.field(pytree_node=False)
  reconstruction: str = flax.struct.field(pytree_node=False, default="l1")
  kl_weight: float = flax.struct.field(pytree_node=False, default=1e-6)
  disc_weight: float = flax.struct.field(pytree_node=False, default=0.0)
  disc_start: int = flax.struct.field(pytree_node=False, default=0)
  ema_rate: float = flax.struct.field(pytree_node=False, default=0.999)


# --- config -> spec ---------------------------------------------------------------------------


def module_of(config: ml_collections.ConfigDict) -> ae_lib.AutoencoderKL:
  """The `AutoencoderKL` of `config.autoencoder` for `config.data`'s channels."""
  a = config.autoencoder
  channels = int(config.data.num_channels)
  return ae_lib.AutoencoderKL(
      in_channels=channels, out_channels=channels,
      block_out_channels=tuple(int(c) for c in a.block_out_channels),
      layers_per_block=int(a.layers_per_block), latent_channels=int(a.latent_channels),
      norm_num_groups=int(a.norm_num_groups), scaling_factor=float(a.scaling_factor),
      mid_block_add_attention=bool(a.mid_block_add_attention))


def check_autoencoder_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Validates `config.autoencoder` (and the data it trains on) before anything compiles.

  Raises:
    ValueError: naming the field, its value and the valid ones.
  """
  a = config.autoencoder
  for field in ("batch_size", "n_iters", "log_freq", "eval_freq", "snapshot_freq",
                "eval_num_examples", "disc_nf", "disc_layers"):
    experiment._number("autoencoder", config, field, minimum=1, integer=True)
  for field in ("lr", "disc_lr"):
    experiment._number("autoencoder", config, field, minimum=0, min_open=True)
  for field in ("kl_weight", "disc_weight", "disc_start"):
    experiment._number("autoencoder", config, field, minimum=0)
  for field in ("beta1", "beta2", "ema_rate"):
    experiment._number("autoencoder", config, field, minimum=0, maximum=1, max_open=True)
  check_choice("config.autoencoder.reconstruction", a.reconstruction, RECONSTRUCTIONS)
  experiment._check_data(config, mesh, "train")
  parallel.check_batch(int(a.batch_size), mesh, "config.autoencoder.batch_size")
  try:
    module = module_of(config)
    ae_lib.check_architecture(module)
  except ValueError as e:
    raise ValueError(f"config.autoencoder: {e}") from None
  size = int(config.data.image_size)
  autoencoder_run.latent_shape(module, (size, size, int(config.data.num_channels)),
                               "config.data image shape", "config.autoencoder")


def ae_spec(config: ml_collections.ConfigDict) -> AESpec:
  a = config.autoencoder
  adam = lambda lr: _adam(float(lr), float(a.beta1), float(a.beta2))  # noqa: E731
  disc = None
  if float(a.disc_weight) > 0:
    disc = ae_lib.PatchDiscriminator(nf=int(a.disc_nf), n_layers=int(a.disc_layers),
                                     norm_groups=min(8, int(a.disc_nf)))
  size = int(config.data.image_size)
  return AESpec(module=module_of(config), discriminator=disc, optimizer=adam(a.lr),
                disc_optimizer=adam(a.disc_lr),
                image_shape=(size, size, int(config.data.num_channels)),
                reconstruction=str(a.reconstruction), kl_weight=float(a.kl_weight),
                disc_weight=float(a.disc_weight), disc_start=int(a.disc_start),
                ema_rate=float(a.ema_rate))


@functools.lru_cache(maxsize=16)
def _adam(lr: float, b1: float, b2: float) -> optax.GradientTransformation:
  """One (stateless) Adam transformation per setting, so that the specs of equal configs are
  equal and their compiled programs are shared (`make_train_step`)."""
  return optax.adam(lr, b1=b1, b2=b2)


def training_record(config: ml_collections.ConfigDict) -> dict:
  """The phase-1 settings written to `autoencoder.json` (plain data)."""
  return {**experiment.config_to_plain(config)["autoencoder"],
          "data": experiment.config_to_plain(config)["data"], "seed": int(config.seed)}


# --- the losses -------------------------------------------------------------------------------


def reconstruction_loss(x: Array, x_hat: Array, kind: str) -> Array:
  """Per-example `sum |x - x_hat|` ('l1') or `sum (x - x_hat)^2` ('l2'): `[B]`."""
  diff = x - x_hat
  per_pixel = jnp.abs(diff) if kind == "l1" else diff ** 2
  return jnp.sum(per_pixel, axis=tuple(range(1, x.ndim)))


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """The discriminator's hinge loss `0.5 (mean relu(1 - real) + mean relu(1 + fake))`."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(grad_rec: Array, grad_g: Array, disc_weight: float) -> Array:
  """LDM's `disc_weight * clip(||grad_rec|| / (||grad_g|| + 1e-4), 0, 1e4)` (gradients of the
  reconstruction and generator losses with respect to the decoder's last layer)."""
  ratio = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_g) + 1e-4)
  return disc_weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))


def _last_layer(tree: Any) -> Array:
  return tree["decoder"]["conv_out"]["kernel"]


def init_state(key: Array, spec: AESpec) -> AETrainState:
  k_ae, k_disc = jax.random.split(key)
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)
  params = spec.module.init(k_ae, x)["params"]
  disc_params = ({} if spec.discriminator is None
                 else spec.discriminator.init(k_disc, x)["params"])
  return AETrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=spec.optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      disc_params=disc_params,
                      disc_opt_state=spec.disc_optimizer.init(disc_params))


def abstract_state(spec: AESpec, mesh: Mesh) -> AETrainState:
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda k: init_state(k, spec), jax.ShapeDtypeStruct((2,), jnp.uint32))
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


def losses(spec: AESpec, params: Any, disc_params: Any, key: Array, x: Array, step: Array
           ) -> dict:
  """The loss terms of one batch `x` (in [-1, 1]), through the posterior draw of `key`:
  `rec`, `kl` (batch means of the per-example sums), `g` (0 without a discriminator) and
  `disc_factor` (1 from `disc_start` on, else 0)."""
  x_hat, mean, logvar = spec.module.apply({"params": params}, x, key)
  posterior = ae_lib.DiagonalGaussian(mean, logvar)
  terms = dict(rec=jnp.mean(reconstruction_loss(x, x_hat, spec.reconstruction)),
               kl=jnp.mean(posterior.kl()), g=jnp.zeros((), jnp.float32),
               disc_factor=(step >= spec.disc_start).astype(jnp.float32))
  if spec.discriminator is not None:
    terms["g"] = -jnp.mean(spec.discriminator.apply({"params": disc_params}, x_hat))
  return terms


def make_train_step(spec: AESpec, *, mesh: Mesh | None = None) -> Callable:
  """`step_fn(state, base_key, images [B, H, W, C] in [0, 1]) -> (state, metrics)`, compiled
  once with the batch sharded over the mesh's `"batch"` axis and the state replicated (XLA
  all-reduces the gradients), the input state donated. `metrics`: `loss`, `rec`, `kl`, `g`,
  `d_weight`, `disc_loss`, `logits_real`, `logits_fake`. Equal specs on the same mesh get the
  same function (traced and compiled once per process)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  return _compiled_train_step(spec, mesh)


# One compiled program per (spec, mesh) in a process: a run resumed in the same process (or a
# second run of the same settings) reuses the traced and compiled step instead of tracing it
# again. Specs of equal configs are equal (`ae_spec`), meshes of the same devices too.
@functools.lru_cache(maxsize=4)
def _compiled_train_step(spec: AESpec, mesh: Mesh) -> Callable:
  module, disc = spec.module, spec.discriminator

  def step_fn(state: AETrainState, base_key: Array, images01: Array):
    key = jax.random.fold_in(base_key, state.step)
    k_post, _ = jax.random.split(key)
    x = images01 * 2.0 - 1.0

    def vae_loss(params):
      terms = losses(spec, params, state.disc_params, k_post, x, state.step)
      return terms["rec"] + spec.kl_weight * terms["kl"], terms

    (base, terms), grads = jax.value_and_grad(vae_loss, has_aux=True)(state.params)
    d_weight = jnp.zeros((), jnp.float32)
    if disc is not None:
      def g_loss(params):
        return losses(spec, params, state.disc_params, k_post, x, state.step)["g"]
      g_grads = jax.grad(g_loss)(state.params)
      rec_grads = jax.grad(lambda p: losses(spec, p, state.disc_params, k_post, x,
                                            state.step)["rec"])(state.params)
      d_weight = adaptive_weight(_last_layer(rec_grads), _last_layer(g_grads),
                                 spec.disc_weight) * terms["disc_factor"]
      grads = jax.tree_util.tree_map(lambda a, b: a + d_weight * b, grads, g_grads)
    updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: spec.ema_rate * e + (1 - spec.ema_rate) * p,
                                 state.ema_params, params)
    metrics = dict(loss=base + d_weight * terms["g"], rec=terms["rec"], kl=terms["kl"],
                   g=terms["g"], d_weight=d_weight)
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if disc is not None:
      x_hat = jax.lax.stop_gradient(
          module.apply({"params": state.params}, x, k_post)[0])

      def d_loss(dp):
        real = disc.apply({"params": dp}, x)
        fake = disc.apply({"params": dp}, x_hat)
        return hinge_d_loss(real, fake) * terms["disc_factor"], (real, fake)

      (loss_d, (real, fake)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(disc_params)
      d_updates, disc_opt_state = spec.disc_optimizer.update(d_grads, disc_opt_state,
                                                            disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)
      metrics.update(disc_loss=loss_d, logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema, disc_params=disc_params,
                          disc_opt_state=disc_opt_state)
    return state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(replicated, replicated, NamedSharding(mesh, P("batch"))),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=4)
def make_reconstruct_fn(module: ae_lib.AutoencoderKL, mesh: Mesh) -> Callable:
  """`(params, images [B, H, W, C] in [0, 1]) -> (reconstructions in [0, 1] through the
  posterior mean, per-image PSNR [B] in dB, data range 1)`, batch sharded; one compiled
  function per (module, mesh) in a process."""
  def fn(params, images01):
    x_hat = module.apply({"params": params}, images01 * 2.0 - 1.0)[0]
    x_hat = jnp.clip((x_hat + 1.0) / 2.0, 0.0, 1.0)
    mse = jnp.mean((x_hat - images01) ** 2, axis=(1, 2, 3))
    return x_hat, 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))
  return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))))


def test_psnr(reconstruct: Callable, params: Any, data, limit: int, mesh: Mesh
              ) -> tuple[float, np.ndarray, np.ndarray]:
  """Mean reconstruction PSNR (dB) of the first `limit` test images, and the first batch's
  images and reconstructions (for a grid)."""
  values, seen, first = [], 0, None
  for batch in data.iterate_once():
    if seen >= limit:
      break
    x_hat, psnr = parallel.to_host(reconstruct(params, parallel.shard_batch(batch["image"],
                                                                            mesh)))
    keep = np.asarray(batch["mask"]) & (np.arange(len(psnr)) + seen < limit)
    values.append(np.asarray(psnr)[keep])
    seen += int(keep.sum())
    if first is None:
      first = (np.asarray(batch["image"]), np.asarray(x_hat))
  return float(np.mean(np.concatenate(values))), first[0], first[1]


@functools.lru_cache(maxsize=4)
def _compiled_init(spec: AESpec, sharding: NamedSharding) -> Callable:
  return jax.jit(functools.partial(init_state, spec=spec), out_shardings=sharding)


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, *,
                      mesh: Mesh | None = None) -> AETrainState:
  """Trains (or resumes) the autoencoder of `config.autoencoder` on `config.data` until
  `autoencoder.n_iters` steps, in `WORKDIR/autoencoder/`.

  Raises:
    ValueError / FileNotFoundError: a bad config or missing data (before compiling); an
      existing autoencoder of another architecture in the workdir.
    NonFiniteLossError: a non-finite loss (the last good checkpoint is kept).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  check_autoencoder_config(config, mesh)
  a = config.autoencoder
  directory = autoencoder_run.autoencoder_dir(workdir)
  spec = ae_spec(config)
  record_path = os.path.join(directory, autoencoder_run.RECORD_FILE)
  if os.path.isfile(record_path):
    saved = autoencoder_run.read_record(directory)["config"]
    if saved != autoencoder_run.config_of(spec.module):
      raise ValueError(f"{record_path} holds another autoencoder ({saved}) than "
                       f"config.autoencoder ({autoencoder_run.config_of(spec.module)}); use "
                       f"its settings or another --workdir")
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  data = experiment.make_dataset(config, "train", batch_size=int(a.batch_size), **process)
  test = experiment.make_dataset(config, "test", batch_size=int(a.batch_size), **process)
  if jax.process_index() == 0:
    autoencoder_run.write_record(directory, spec.module, source="trained",
                                 training=training_record(config))
  replicated = NamedSharding(mesh, P())
  init_key, base_key = jax.random.split(
      jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), AUTOENCODER))
  manager = checkpoints.get_manager(directory, keep=2)
  try:
    restored = checkpoints.restore(manager, abstract_state(spec, mesh))
  except BaseException:
    manager.close()
    raise
  if restored is None:
    state = _compiled_init(spec, replicated)(init_key)
  else:
    state, _ = restored
    logging.info("Resuming the autoencoder from step %d in %s", int(state.step), directory)
  step_fn = make_train_step(spec, mesh=mesh)
  reconstruct = make_reconstruct_fn(spec.module, mesh)
  base_key = jax.device_put(base_key, replicated)
  step = int(state.step)
  batches = data.iterate(start_step=step)
  writer = MetricsWriter(directory, enabled=jax.process_index() == 0)
  last = [time.perf_counter(), step]

  def log(step: int, metrics: dict) -> dict:
    if not all(np.isfinite(v) for v in metrics.values()):
      raise NonFiniteLossError(
          f"Non-finite autoencoder loss at step {step} ({metrics}); stopped without "
          f"saving. Last good checkpoint: {manager.latest_step()} in "
          f"{checkpoints.checkpoint_dir(directory)}")
    now = time.perf_counter()
    metrics["images_per_s"] = (step - last[1]) * int(a.batch_size) / max(now - last[0], 1e-9)
    last[:] = [now, step]
    logging.info("autoencoder step %d: %s", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics

  def evaluate(step: int, state: AETrainState) -> None:
    if step % int(a.eval_freq) and step != int(a.n_iters):
      return
    psnr, x, x_hat = test_psnr(reconstruct, state.ema_params, test,
                               int(a.eval_num_examples), mesh)
    logging.info("autoencoder step %d: test PSNR %.2f dB (EMA, posterior mean)", step, psnr)
    writer.scalars(step, "eval", dict(psnr=psnr))
    if writer.enabled:
      n = min(len(x), 8)  # a row of test images over a row of their reconstructions
      images.save_grid(np.concatenate([x[:n], x_hat[:n]]),
                       os.path.join(directory, f"reconstructions_{step}.png"), nrow=n)

  return programs.train_loop(
      state, int(a.n_iters),
      lambda s: step_fn(s, base_key, parallel.shard_batch(next(batches)["image"], mesh)),
      manager=manager, writer=writer, log_freq=int(a.log_freq),
      snapshot_freq=int(a.snapshot_freq), log=log, after_step=evaluate)
