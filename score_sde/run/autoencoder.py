"""A KL autoencoder (latent diffusion's first stage) from a directory, and the import of
published ones into a workdir.

    ae = score_sde.run.load_autoencoder("runs/fmnist_ae")      # phase-1 or imported workdir
    ae = score_sde.run.load_autoencoder("sd-vae-ft-mse")       # or a diffusers folder
    mean, logvar = ae.encode(x)          # x: [B, H, W, C] NHWC in [-1, 1]
    x_hat = ae.decode(z)                 # z: [B, H / f, W / f, L]
    z_model = (z - ae.shift_factor) * ae.scaling_factor        # what a diffusion model sees

An autoencoder workdir keeps everything under `WORKDIR/autoencoder/`:

- `autoencoder.json`: `{"config": <diffusers AutoencoderKL config dict>, "source": ...,
  "training": <phase-1 training settings or null>}`;
- `checkpoints/<step>/`: orbax checkpoints of a pytree with `ema_params` (the weights used
  here) and, for a phase-1 run, `params`, the optimizer and discriminator states.

`import_diffusers_vae` / `import_ldm_vae` (`scripts/import_checkpoint.py --format=diffusers_vae
| ldm_vae`) write such a workdir from a published checkpoint; `--mode=train_autoencoder`
(`run.autoencoder_training`) trains one. Every file is read and every shape checked with
numpy before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde.io import autoencoder_files, checkpoints, files
from score_sde.io import workdir as workdir_lib
from score_sde.io.checkpoints import CheckpointMismatchError
from score_sde.models import autoencoder as ae_lib

AUTOENCODER_DIR = "autoencoder"
RECORD_FILE = "autoencoder.json"


def autoencoder_dir(workdir: str | os.PathLike) -> str:
  """`WORKDIR/autoencoder`: where a workdir keeps its autoencoder."""
  return os.path.join(os.fspath(workdir), AUTOENCODER_DIR)


def config_of(module: ae_lib.AutoencoderKL) -> dict[str, Any]:
  """The diffusers-style config dict of `module` (`ae_lib.autoencoder_from_config` inverts
  it), JSON-serializable."""
  config = {field: getattr(module, field) for field in ae_lib.CONFIG_FIELDS}
  config["block_out_channels"] = [int(c) for c in module.block_out_channels]
  config["shift_factor"] = float(module.shift_factor)
  config["scaling_factor"] = float(module.scaling_factor)
  config["_class_name"] = "AutoencoderKL"
  return config


@dataclasses.dataclass(frozen=True, eq=False)
class Autoencoder:
  """A KL autoencoder with its weights.

  Attributes:
    module: the `models.AutoencoderKL`.
    params: its params (float32 arrays, Flax layouts).
    source: where it was loaded from (a workdir or a diffusers folder).
    step: the checkpoint's step (None for a diffusers folder).
  """
  module: ae_lib.AutoencoderKL
  params: Any
  source: str
  step: int | None = None

  def __post_init__(self):
    m = self.module
    object.__setattr__(self, "_encode", jax.jit(
        lambda p, x: m.apply({"params": p}, x, method=m.encode)))
    object.__setattr__(self, "_decode", jax.jit(
        lambda p, z: m.apply({"params": p}, z, method=m.decode)))

  @property
  def scaling_factor(self) -> float:
    return float(self.module.scaling_factor)

  @property
  def shift_factor(self) -> float:
    return float(self.module.shift_factor)

  @property
  def downsample_factor(self) -> int:
    return self.module.downsample_factor

  @property
  def latent_channels(self) -> int:
    return int(self.module.latent_channels)

  def variables(self) -> dict:
    return {"params": self.params}

  def latent_shape(self, image_shape: tuple[int, int, int], what: str = "image shape"
                   ) -> tuple[int, int, int]:
    """`(H / f, W / f, L)` of images `(H, W, C)`.

    Raises:
      ValueError: C is not the autoencoder's `in_channels`, or H, W not divisible by f.
    """
    return latent_shape(self.module, image_shape, what, self.source)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mean, logvar)` of images `x` `[B, H, W, C]` in [-1, 1] (jitted)."""
    self.latent_shape(tuple(x.shape[1:]))
    return self._encode(self.params, x)

  def decode(self, z: jax.Array) -> jax.Array:
    """Images `[B, H, W, out_channels]` (in [-1, 1] up to the decoder's error) of latents
    `z` `[B, h, w, L]` (jitted; unscaled latents, as `encode` gives them)."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"{self.source}: decode takes latents [B, h, w, {self.latent_channels}]"
                       f"; got shape {tuple(z.shape)}")
    return self._decode(self.params, z)


def latent_shape(module: ae_lib.AutoencoderKL, image_shape, what: str = "image shape",
                 source: str = "the autoencoder") -> tuple[int, int, int]:
  """`(H / f, W / f, L)` of images `(H, W, C)` for `module` (see `Autoencoder.latent_shape`)."""
  f = module.downsample_factor
  shape = tuple(int(s) for s in image_shape)
  if len(shape) != 3 or shape[-1] != module.in_channels or shape[0] % f or shape[1] % f:
    raise ValueError(
        f"{what} {shape} does not fit {source}: it takes images (H, W, {module.in_channels}) "
        f"with H and W divisible by {f} (block_out_channels="
        f"{tuple(module.block_out_channels)})")
  return (shape[0] // f, shape[1] // f, int(module.latent_channels))


# --- reading --------------------------------------------------------------------------------


def read_record(directory: str) -> dict:
  """The `autoencoder.json` of an autoencoder directory (`WORKDIR/autoencoder`)."""
  path = os.path.join(directory, RECORD_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise ValueError(f"{path} holds no autoencoder config (a dict under 'config')")
  return record


def _check_params(params: Any, module: ae_lib.AutoencoderKL, where: str) -> None:
  """CheckpointMismatchError naming the first parameter that is missing, unexpected or of
  another shape than `module` needs, with both shapes."""
  ae_lib.check_shapes(ae_lib.flat_shapes(params), ae_lib.flat_shapes(ae_lib.param_shapes(module)),
                      where, "the autoencoder of its record", noun="parameter",
                      error=CheckpointMismatchError)


def _placement(mesh: Mesh | None) -> jax.sharding.Sharding:
  """Where an autoencoder's weights go: replicated over `mesh`, or the first local device."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(mesh, P())


def _load_workdir(directory: str, step: int | None, ema: bool, mesh: Mesh | None
                  ) -> Autoencoder:
  record = read_record(directory)
  where = os.path.join(directory, RECORD_FILE)
  module = ae_lib.autoencoder_from_config(record["config"], where=where)
  with checkpoints.get_manager(directory, read_only=True) as manager:
    # Placed here, not as saved: a phase-1 run trained on 2 devices restores on 1.
    restored = checkpoints.restore_as_saved(manager, step, sharding=_placement(mesh))
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(directory)}; train "
                            f"the autoencoder first (--mode=train_autoencoder) or import one "
                            f"(scripts/import_checkpoint.py --format=diffusers_vae)")
  tree, step = restored
  name = "ema_params" if ema and "ema_params" in tree else "params"
  if name not in tree:
    raise CheckpointMismatchError(f"{checkpoints.checkpoint_dir(directory)}/{step} holds no "
                                  f"'ema_params' or 'params' (keys {sorted(tree)})")
  params = tree[name]
  _check_params(params, module, f"{checkpoints.checkpoint_dir(directory)}/{step} ({name})")
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  return Autoencoder(module, params, source=os.path.dirname(directory) or directory,
                     step=int(step))


def _is_diffusers_folder(path: str) -> bool:
  """Whether `path` (or `path/vae`) holds a `config.json` of class AutoencoderKL."""
  for parts in ((), ("vae",)):
    config = os.path.join(path, *parts, "config.json")
    if os.path.isfile(config):
      try:
        with open(config) as f:
          plain = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # read_diffusers_folder names the bad file
      return isinstance(plain, dict) and plain.get("_class_name") == "AutoencoderKL"
  return False


def load_autoencoder(path: str | os.PathLike, *, step: int | None = None, ema: bool = True,
                     mesh: Mesh | None = None) -> Autoencoder:
  """The autoencoder of a workdir (phase 1 or imported) or of a diffusers folder.

  Args:
    path: a workdir with `autoencoder/autoencoder.json`, that `autoencoder/` directory itself,
      or a diffusers `AutoencoderKL` folder (`config.json` + weights; or a pipeline folder
      with `vae/`).
    step: the checkpoint step of a workdir (None: the newest).
    ema: the EMA weights of a phase-1 run (else the raw ones).
    mesh: the weights are replicated over its devices (None: on the first local device),
      whatever devices the checkpoint was written on.

  Raises:
    FileNotFoundError: no such directory, or no checkpoint in it.
    ValueError: the directory holds no autoencoder (a score-model run, an empty folder), a
      config of another class, or weights that do not fit its architecture (the message names
      the file, the first mismatching key and both shapes).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No autoencoder directory {path}")
  if os.path.isfile(os.path.join(path, AUTOENCODER_DIR, RECORD_FILE)):
    return _load_workdir(os.path.join(path, AUTOENCODER_DIR), step, ema, mesh)
  if os.path.isfile(os.path.join(path, RECORD_FILE)):
    return _load_workdir(path, step, ema, mesh)
  if _is_diffusers_folder(path):
    config, state = autoencoder_files.read_diffusers_folder(path)
    where = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(
        path, "vae")
    module = ae_lib.autoencoder_from_config(config, where=os.path.join(where, "config.json"))
    params = ae_lib.params_from_diffusers(state, module, where=where)
    return Autoencoder(module, jax.device_put(params, _placement(mesh)), source=path)
  raise ValueError(
      f"{path} is not an autoencoder: expected {os.path.join(path, AUTOENCODER_DIR, RECORD_FILE)}"
      f" (a workdir of --mode=train_autoencoder or of scripts/import_checkpoint.py "
      f"--format=diffusers_vae | ldm_vae) or a diffusers AutoencoderKL folder (config.json + "
      f"{autoencoder_files.DIFFUSERS_WEIGHTS[0]})")


# --- writing ---------------------------------------------------------------------------------


def write_record(directory: str, module: ae_lib.AutoencoderKL, *, source: str,
                 training: Mapping[str, Any] | None = None) -> str:
  """Writes `directory/autoencoder.json`; returns its path."""
  os.makedirs(directory, exist_ok=True)
  return files.write_json(os.path.join(directory, RECORD_FILE),
                          {"config": config_of(module), "source": source,
                           "training": None if training is None else dict(training)},
                          sort_keys=True, overwrite=True)


def _refuse_existing(directory: str, overwrite: bool) -> bool:
  existing = checkpoints.has_checkpoints(directory)
  if existing and not overwrite:
    raise FileExistsError(f"{checkpoints.checkpoint_dir(directory)} already holds checkpoints; "
                          "pass overwrite=True (--overwrite) to replace them, or choose "
                          "another workdir")
  return existing


def save_imported(workdir: str | os.PathLike, module: ae_lib.AutoencoderKL, params: Any, *,
                  source: str, overwrite: bool = False) -> str:
  """Writes `module` with `params` as an imported autoencoder workdir (step 0, the weights as
  `ema_params`); returns `WORKDIR/autoencoder`."""
  workdir = os.fspath(workdir)
  directory = autoencoder_dir(workdir)
  state = {"step": jnp.zeros((), jnp.int32),
           "ema_params": jax.tree_util.tree_map(jnp.asarray, params)}
  # Nothing lost: under the workdir's lock, the new checkpoint is written completely into a
  # staging folder first; an old one is then exchanged with it (atomically where the file
  # system can) and kept in checkpoints_set_aside/, never deleted.
  with workdir_lib.locked(workdir, "import", enabled=jax.process_index() == 0):
    existing = _refuse_existing(directory, overwrite)
    staging = os.path.join(directory, f".import-{os.getpid()}")
    with checkpoints.get_manager(staging, keep=1) as manager:
      checkpoints.save(manager, 0, state)
      checkpoints.check_saves(manager, wait=True)
    staged, current = checkpoints.checkpoint_dir(staging), checkpoints.checkpoint_dir(directory)
    if not os.path.lexists(current):
      os.rename(staged, current)
    elif workdir_lib.exchange(staged, current):
      os.rename(staged, workdir_lib.keep_aside(workdir, "autoencoder.before_import"))
    else:
      os.rename(current, workdir_lib.keep_aside(workdir, "autoencoder.before_import"))
      os.rename(staged, current)
    try:
      os.rmdir(staging)
    except OSError:  # orbax left something beside checkpoints/: harmless, kept
      pass
    write_record(directory, module, source=source)
    if existing:
      logging.warning("Kept the previous autoencoder checkpoints in %s",
                      os.path.join(workdir, workdir_lib.SET_ASIDE_DIR))
  return directory


def import_diffusers_vae(checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
                         overwrite: bool = False) -> dict:
  """Imports a diffusers `AutoencoderKL` folder (`config.json` + weights) into `workdir`.

  Raises:
    FileNotFoundError, ValueError: see `autoencoder_files.read_diffusers_folder` and
      `models.autoencoder.params_from_diffusers` (the first mismatching key, both shapes).
    FileExistsError: the workdir already holds an autoencoder and not `overwrite`.
  """
  path = os.fspath(checkpoint)
  if os.path.isfile(path):
    raise ValueError(f"--format=diffusers_vae takes a diffusers folder (config.json + "
                     f"{autoencoder_files.DIFFUSERS_WEIGHTS[0]}); {path} is a file (an LDM / "
                     f"SD checkpoint file is --format=ldm_vae)")
  _refuse_existing(autoencoder_dir(workdir), overwrite)
  ae = load_autoencoder(path)
  directory = save_imported(workdir, ae.module, ae.params, source=os.path.abspath(path),
                            overwrite=overwrite)
  return dict(format="diffusers_vae", autoencoder=directory,
              scaling_factor=ae.scaling_factor, config=config_of(ae.module))


def import_ldm_vae(checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
                   overwrite: bool = False, norm_num_groups: int = 32,
                   scaling_factor: float = 0.18215) -> dict:
  """Imports an LDM / Stable Diffusion autoencoder (`.ckpt` / `.pt` / `.safetensors`, bare or
  a full model with `first_stage_model.`) into `workdir`; the architecture is inferred from
  the state dict's shapes (GroupNorm groups and the latent scale are not in the weights).

  Raises:
    FileNotFoundError, ValueError: see `autoencoder_files.read_ldm_checkpoint` (a pickle
      that would run code is refused) and `models.autoencoder.params_from_ldm`.
    FileExistsError: the workdir already holds an autoencoder and not `overwrite`.
  """
  path = os.fspath(checkpoint)
  if os.path.isdir(path):
    raise ValueError(f"--format=ldm_vae takes a checkpoint file (.ckpt, .pt, .safetensors); "
                     f"{path} is a directory (a diffusers folder is --format=diffusers_vae)")
  _refuse_existing(autoencoder_dir(workdir), overwrite)
  state = autoencoder_files.read_ldm_checkpoint(path)
  config = ae_lib.infer_config_from_ldm(state, norm_num_groups=norm_num_groups,
                                        scaling_factor=scaling_factor, where=path)
  module = ae_lib.autoencoder_from_config(config, where=path)
  params = ae_lib.params_from_ldm(state, module, where=path)
  directory = save_imported(workdir, module, params, source=os.path.abspath(path),
                            overwrite=overwrite)
  logging.info("Imported the LDM autoencoder %s into %s", path, directory)
  return dict(format="ldm_vae", autoencoder=directory, scaling_factor=float(scaling_factor),
              config=config_of(module))
