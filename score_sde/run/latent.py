"""Phase 2 of latent diffusion: a run whose network, SDE, loss and sampler work on the latents
of an autoencoder (`config.data.latent`).

    config.data.latent = "runs/fmnist_ae"        # phase-1 or imported workdir, diffusers folder
    config.data.latent_sample = "mean"           # encode with the posterior mean (or 'sample')
    config.data.latent_scaling_factor = "auto"   # | 'autoencoder' | a number

The data pipeline stays in pixels ([0, 1]); each batch is encoded on the devices just before
the compiled step (`LatentSpace.make_encode_fn`): `z = (E(2 x - 1) - shift) * scale`, with
`E` the posterior mean or a posterior sample (key: the step). The model sees `z` as its data
(no further scaling). Samples are decoded: `x = (D(z / scale + shift) + 1) / 2`, clipped to
[0, 1], so PNG grids, FD / KID and guidance work on pixels. `'auto'` is 1 / std of the
encoded latents of the first `data.latent_stats_examples` train images, computed once when the
run starts and stored in `WORKDIR/latent.json` (with the latents' mean and std and the
autoencoder it came from); every later use of the run reads it from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde.io import datasets, files, parallel
from score_sde.models import autoencoder as ae_lib
from score_sde.run import autoencoder as autoencoder_run

LATENT_FILE = "latent.json"
LATENT_SAMPLES = ("mean", "sample")
SCALINGS = ("auto", "autoencoder")
# Key stream of the posterior samples of batch encodings: fold_in(fold_in(key, LATENT), step).
LATENT = 1 << 27


def scaling_of(config: ml_collections.ConfigDict) -> str | float:
  """`config.data.latent_scaling_factor`: 'auto', 'autoencoder', or a number > 0 (also given
  as a string, as the command line gives it).

  Raises:
    ValueError: anything else.
  """
  scaling = config.data.get("latent_scaling_factor", "auto")
  if scaling in SCALINGS:
    return scaling
  try:
    value = float(scaling) if not isinstance(scaling, bool) else math.nan
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"config.data.latent_scaling_factor must be one of {list(SCALINGS)} or "
                     f"a number > 0, got {scaling!r}")
  return value


def latent_path(config: ml_collections.ConfigDict) -> str | None:
  """`config.data.latent` (None or '' : a pixel-space run)."""
  return config.data.get("latent", None) or None


def autoencoder_module(path: str) -> ae_lib.AutoencoderKL:
  """The architecture of the autoencoder at `path`, from its config file only (no weights).

  Raises:
    FileNotFoundError, ValueError: as `run.load_autoencoder` (not an autoencoder, ...).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.data.latent={path}: no such autoencoder directory")
  for directory in (os.path.join(path, autoencoder_run.AUTOENCODER_DIR), path):
    if os.path.isfile(os.path.join(directory, autoencoder_run.RECORD_FILE)):
      record = autoencoder_run.read_record(directory)
      return ae_lib.autoencoder_from_config(
          record["config"], where=os.path.join(directory, autoencoder_run.RECORD_FILE))
  for folder in (path, os.path.join(path, "vae")):
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
      with open(config_file) as f:
        try:
          plain = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{config_file} is not JSON: {e}") from None
      if isinstance(plain, dict) and plain.get("_class_name") == "AutoencoderKL":
        return ae_lib.autoencoder_from_config(plain, where=config_file)
  # Not an autoencoder: the loader's message says what one looks like.
  autoencoder_run.load_autoencoder(path)
  raise ValueError(f"config.data.latent={path} is not an autoencoder")  # not reached


def pixel_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  d = config.data
  return (int(d.image_size), int(d.image_size), int(d.num_channels))


def model_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """The shape the network sees: the latent shape of a latent run, else the image shape.

  Raises:
    ValueError: the images do not fit the autoencoder (channels, divisibility), naming both.
  """
  path = latent_path(config)
  if path is None:
    return pixel_shape(config)
  return autoencoder_run.latent_shape(
      autoencoder_module(path), pixel_shape(config),
      "config.data image shape (image_size, image_size, num_channels)",
      f"the autoencoder config.data.latent={path}")


def check_latent_config(config: ml_collections.ConfigDict) -> None:
  """The latent fields of `config.data`, and that the autoencoder exists and takes the
  images (reads its config only; nothing compiles).

  Raises:
    ValueError / FileNotFoundError: naming the field, the value and the valid ones.
  """
  if latent_path(config) is None:
    return
  d = config.data
  sample = d.get("latent_sample", "mean")
  if sample not in LATENT_SAMPLES:
    raise ValueError(f"Unknown config.data.latent_sample {sample!r}; valid: "
                     f"{list(LATENT_SAMPLES)}")
  scaling_of(config)
  count = d.get("latent_stats_examples", 2048)
  if not isinstance(count, int) or isinstance(count, bool) or count < 2:
    raise ValueError(f"config.data.latent_stats_examples must be an integer >= 2, got "
                     f"{count!r}")
  model_shape(config)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
  """An autoencoder with the scale and shift a run's latents have.

  Attributes:
    autoencoder: the `run.autoencoder.Autoencoder` (weights included).
    scale, shift: the model's data are `(z - shift) * scale`.
    sample: encode with a posterior sample (True) or the mean.
    image_shape: the pixel shape `(H, W, C)`.
  """
  autoencoder: autoencoder_run.Autoencoder
  scale: float
  shift: float
  sample: bool
  image_shape: tuple[int, int, int]

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self.autoencoder.latent_shape(self.image_shape)

  @property
  def params(self) -> Any:
    return self.autoencoder.params

  def encode(self, params, key: jax.Array, images01: jax.Array) -> jax.Array:
    """Scaled latents `[B, h, w, L]` of images `[B, H, W, C]` in [0, 1] (traceable)."""
    module = self.autoencoder.module
    mean, logvar = module.apply({"params": params}, images01 * 2.0 - 1.0, method=module.encode)
    z = (ae_lib.DiagonalGaussian(mean, logvar).sample(key) if self.sample else mean)
    return (z - self.shift) * self.scale

  def decode(self, params, z: jax.Array) -> jax.Array:
    """Images `[B, H, W, C]` in [0, 1] of scaled latents (traceable)."""
    module = self.autoencoder.module
    x = module.apply({"params": params}, z / self.scale + self.shift, method=module.decode)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def make_encode_fn(self, mesh: Mesh, *, steps_axis: bool) -> Callable:
    """`encode_fn(key, first_step, images) -> latents`, compiled, the batch sharded over the
    mesh's `"batch"` axis. With `steps_axis`, images are `[n, B, H, W, C]` (the n steps of one
    train call, step `first_step + i`), else `[B, H, W, C]`. The posterior sample of step s
    (if `sample`) uses `fold_in(fold_in(key, LATENT), s)`."""
    batch = NamedSharding(mesh, P(None, "batch") if steps_axis else P("batch"))
    replicated = NamedSharding(mesh, P())

    def encode_fn(params, key, first_step, images):
      key = jax.random.fold_in(key, LATENT)
      if not steps_axis:
        return self.encode(params, jax.random.fold_in(key, first_step), images)
      steps = first_step + jnp.arange(images.shape[0])
      return jax.vmap(lambda s, x: self.encode(params, jax.random.fold_in(key, s), x))(
          steps, images)

    compiled = jax.jit(encode_fn, in_shardings=(replicated, replicated, replicated, batch),
                       out_shardings=batch)
    params = jax.device_put(self.params, replicated)
    return lambda key, first_step, images: compiled(params, key, first_step, images)

  def make_decode_fn(self, mesh: Mesh | None = None) -> Callable:
    """`decode_fn(z [B, h, w, L]) -> images [B, H, W, C] in [0, 1]`, compiled (the weights an
    argument, not constants), the batch sharded over the mesh's `"batch"` axis."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    compiled = jax.jit(self.decode, in_shardings=(replicated, batch), out_shardings=batch)
    params = jax.device_put(self.params, replicated)
    return lambda z: compiled(params, z)


# --- a run's latent space ----------------------------------------------------------------------


def _read_latent_file(workdir: str) -> dict | None:
  path = os.path.join(workdir, LATENT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None


def latent_statistics(ae: autoencoder_run.Autoencoder, config: ml_collections.ConfigDict,
                      sample: bool, mesh: Mesh) -> dict:
  """Mean and std over all entries of the (unscaled, unshifted) latents of the first
  `data.latent_stats_examples` train images in stored order (posterior sample of batch i with
  `fold_in(fold_in(seed key, LATENT), i)`, or the mean), float64 sums."""
  d = config.data
  limit = int(d.get("latent_stats_examples", 2048))
  spec = datasets.DataSpec(dataset=str(d.dataset), image_size=int(d.image_size),
                           num_channels=int(d.num_channels), data_dir=d.get("data_dir", None)
                           or None, tfds_data_dir=d.get("tfds_data_dir", None),
                           seed=int(config.get("seed", 0)))
  probe = datasets.get_dataset(spec, "train", batch_size=1)
  batch_size = min(limit, probe.num_examples, 256)
  batch_size -= batch_size % mesh.size
  data = datasets.get_dataset(spec, "train", batch_size=max(batch_size, mesh.size))
  space = LatentSpace(ae, 1.0, 0.0, sample, pixel_shape(config))
  encode = space.make_encode_fn(mesh, steps_axis=False)
  key = jax.random.PRNGKey(int(config.get("seed", 0)))
  total, total_sq, count, seen = 0.0, 0.0, 0, 0
  for i, batch in enumerate(data.iterate_once()):
    if seen >= limit:
      break
    z = np.asarray(parallel.to_host(encode(key, i, parallel.shard_batch(batch["image"], mesh))),
                   np.float64)
    keep = np.asarray(batch["mask"]) & (np.arange(len(z)) + seen < limit)
    z = z[keep]
    total, total_sq, count = total + z.sum(), total_sq + (z ** 2).sum(), count + z.size
    seen += int(keep.sum())
  mean = total / count
  std = math.sqrt(max(total_sq / count - mean ** 2, 0.0))
  return dict(latent_mean=mean, latent_std=std, examples=seen)


def latent_space(config: ml_collections.ConfigDict, workdir: str | None, *,
                 mesh: Mesh | None = None, create: bool = False) -> LatentSpace | None:
  """The latent space of a run (None for a pixel-space run).

  Args:
    config: the run's config.
    workdir: the run's directory (holds `latent.json`; None: only for fixed scalings).
    mesh: devices to encode on (for 'auto').
    create: compute and write `latent.json` if it is missing (the start of training).

  Raises:
    ValueError / FileNotFoundError: no autoencoder there; 'auto' without a `latent.json`
      (and not `create`); a `latent.json` of another autoencoder.
  """
  path = latent_path(config)
  if path is None:
    return None
  check_latent_config(config)
  d = config.data
  ae = autoencoder_run.load_autoencoder(path, mesh=mesh)
  sample = d.get("latent_sample", "mean") == "sample"
  scaling = scaling_of(config)
  image_shape = pixel_shape(config)
  ae.latent_shape(image_shape, "config.data image shape")
  if scaling == "autoencoder":
    return LatentSpace(ae, ae.scaling_factor, ae.shift_factor, sample, image_shape)
  if scaling != "auto":
    return LatentSpace(ae, float(scaling), ae.shift_factor, sample, image_shape)
  saved = None if workdir is None else _read_latent_file(workdir)
  if saved is not None:
    if saved.get("autoencoder") != os.path.abspath(path):
      raise ValueError(f"{os.path.join(workdir, LATENT_FILE)} was computed for the autoencoder "
                       f"{saved.get('autoencoder')!r}, not config.data.latent="
                       f"{os.path.abspath(path)!r}; use that one or a new --workdir")
    return LatentSpace(ae, float(saved["scaling_factor"]), float(saved["shift_factor"]), sample,
                       image_shape)
  if not create:
    raise FileNotFoundError(
        f"config.data.latent_scaling_factor='auto' but the run has no "
        f"{LATENT_FILE} in {workdir}: it is written when training starts (--mode=train)")
  mesh = parallel.make_mesh() if mesh is None else mesh
  stats = latent_statistics(ae, config, sample, mesh)
  if not stats["latent_std"] > 0:
    raise ValueError(f"The latents of {path} have std {stats['latent_std']}: cannot scale them")
  record = dict(autoencoder=os.path.abspath(path), autoencoder_step=ae.step,
                scaling_factor=1.0 / stats["latent_std"], shift_factor=ae.shift_factor,
                latent_sample=d.get("latent_sample", "mean"), **stats)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, LATENT_FILE), record, allow_nan=True)
  logging.info("Latent scaling factor 'auto': 1 / std = %.5g of %d encoded train images "
               "(-> %s)", record["scaling_factor"], stats["examples"],
               os.path.join(workdir, LATENT_FILE))
  return LatentSpace(ae, record["scaling_factor"], record["shift_factor"], sample, image_shape)
