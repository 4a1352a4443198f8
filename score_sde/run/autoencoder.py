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
| ldm_vae`) write such a workdir from a published checkpoint (an LDM one optionally with its
Stable Diffusion YAML: `read_ldm_yaml`, `--yaml`); `--mode=train_autoencoder`
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
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde.io import autoencoder_files, checkpoints, files
from score_sde.io import workdir as workdir_lib
from score_sde.io.checkpoints import CheckpointMismatchError
from score_sde.models import autoencoder as ae_lib

AUTOENCODER_DIR = "autoencoder"
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion 1 / 2's latent scale, the LDM import's default
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


# --- an LDM / Stable Diffusion YAML ----------------------------------------------------------
#
# An SD / LDM YAML describes the first stage as `ddconfig` (LDM's Encoder / Decoder arguments)
# and `embed_dim`; the weights alone do not show the latent scale (`scale_factor`), and the YAML
# lets the import check the state dict against what its model was configured as.

# First-stage classes whose network is LDM's `AutoencoderKL` (the keys and math of this module):
# LDM's own, and Stability's `generative-models` (SDXL) wrappers of the same network.
LDM_AUTOENCODER_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",
                           "sgm.models.autoencoder.AutoencoderKL",
                           "sgm.models.autoencoder.AutoencoderKLInferenceWrapper")
# ddconfig fields: those without a default in LDM's Encoder / Decoder must be given.
_DDCONFIG_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels",
                      "resolution", "z_channels")
# The others, with LDM's defaults and the values `models.AutoencoderKL` can express (None:
# any value; `dropout` only acts while training).
_DDCONFIG_OPTIONS = {"ch_mult": ((1, 2, 4, 8), None), "dropout": (0.0, None),
                     "double_z": (True, (True,)), "resamp_with_conv": (True, (True,)),
                     "use_linear_attn": (False, (False,)), "give_pre_end": (False, (False,)),
                     "tanh_out": (False, (False,)),
                     "attn_type": ("vanilla", ("vanilla", "vanilla-xformers", "none"))}
# LatentDiffusion's (and sgm's DiffusionEngine's) scale_factor when a full config gives none.
LDM_DEFAULT_SCALE_FACTOR = 1.0


@dataclasses.dataclass(frozen=True)
class LdmYaml:
  """What an LDM / SD YAML says of its first stage (`read_ldm_yaml`).

  Attributes:
    path: the YAML file.
    section: where its first-stage params are, e.g. `model.params.first_stage_config.params`
      ('' for a bare first-stage config).
    ddconfig: LDM's Encoder / Decoder arguments, LDM's defaults filled in.
    embed_dim: the latent channels after quant_conv.
    scale_factor: `model.params.scale_factor` of a full config (LDM's default 1.0 where it
      gives none); None for a first-stage config alone, which holds no latent scale.
    scale_by_std: the full config's `scale_by_std` (the factor was computed from data at
      training time and saved in the checkpoint's `scale_factor` tensor).
  """
  path: str
  section: str
  ddconfig: Mapping[str, Any]
  embed_dim: int
  scale_factor: float | None
  scale_by_std: bool = False

  def where(self, field: str) -> str:
    """`PATH: section.field`, how an error names a field of the YAML."""
    return f"{self.path}: {'.'.join(p for p in (self.section, field) if p)}"


def _first_stage(data: Any, path: str) -> tuple[Mapping, str, Mapping | None]:
  """`(first-stage params, their section, model.params of a full config or None)`."""
  def mapping(value):
    return value if isinstance(value, Mapping) else {}
  top = mapping(data)
  model = mapping(top.get("model"))
  model_params = mapping(model.get("params"))
  # (the node with `target` and `params`, where its params are, a full config's model.params)
  if "first_stage_config" in model_params:
    node, section, full = (mapping(model_params["first_stage_config"]),
                           "model.params.first_stage_config.params", model_params)
  elif "ddconfig" in model_params:  # an LDM first-stage config (models/first_stage_models/)
    node, section, full = model, "model.params", None
  elif "ddconfig" in mapping(top.get("params")):
    node, section, full = top, "params", None
  elif "ddconfig" in top:
    node, section, full = {"params": top}, "", None
  else:
    raise ValueError(
        f"{path} holds no autoencoder config: expected model.params.first_stage_config.params "
        f"(a full Stable Diffusion / LDM config) or a first-stage config (ddconfig and "
        f"embed_dim, bare, under params: or under model.params:)")
  target = node.get("target", LDM_AUTOENCODER_TARGETS[0])
  if target not in LDM_AUTOENCODER_TARGETS:
    owner = section[:-len("params")].rstrip(".")  # the node whose `params` these are
    raise ValueError(f"{path}: {owner + '.' if owner else ''}target is {target!r}; supported: "
                     f"{LDM_AUTOENCODER_TARGETS} (LDM's KL autoencoder)")
  params = node.get("params")
  if not isinstance(params, Mapping):
    raise ValueError(f"{path}: {section} is not a mapping (got {params!r})")
  return params, section, full


def read_ldm_yaml(path: str | os.PathLike) -> LdmYaml:
  """The first stage of an LDM / Stable Diffusion YAML (read with `yaml.safe_load`).

  Args:
    path: a full SD / LDM config (`model.params.first_stage_config.params` and
      `model.params.scale_factor`, e.g. v1-inference.yaml) or a first-stage config (`ddconfig`
      and `embed_dim`: bare, under `params:`, or under `model.params:` as LDM's
      models/first_stage_models/*/config.yaml).

  Returns:
    An `LdmYaml`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not YAML, no first-stage config, a missing or unknown ddconfig field, or an
      option `models.AutoencoderKL` cannot express (another `target` class, attention at
      encoder / decoder resolutions, `double_z: false`, `embed_dim` != `z_channels`, ...),
      naming the field and the supported values.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No YAML file {path}")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
  params, section, full = _first_stage(data, path)
  spec = LdmYaml(path=path, section=section, ddconfig={}, embed_dim=0, scale_factor=None)
  # (`spec` names fields in errors; its values are filled in once they are checked)
  ddconfig = params.get("ddconfig")
  if not isinstance(ddconfig, Mapping):
    raise ValueError(f"{spec.where('ddconfig')} is missing or not a mapping")
  unknown = sorted(set(ddconfig) - set(_DDCONFIG_REQUIRED) - set(_DDCONFIG_OPTIONS))
  if unknown:
    raise ValueError(f"{spec.where('ddconfig.' + str(unknown[0]))}: unknown field; valid: "
                     f"{sorted(_DDCONFIG_REQUIRED + tuple(_DDCONFIG_OPTIONS))}")
  for field in _DDCONFIG_REQUIRED:
    if field not in ddconfig:
      raise ValueError(f"{spec.where('ddconfig.' + field)} is missing (LDM's Encoder needs "
                       f"{_DDCONFIG_REQUIRED})")
  filled = {field: ddconfig.get(field, default)
            for field, (default, _) in _DDCONFIG_OPTIONS.items()}
  filled.update({field: ddconfig[field] for field in _DDCONFIG_REQUIRED})
  for field in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
    value = filled[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{spec.where('ddconfig.' + field)} is {value!r}; a positive int")
  for field in ("ch_mult", "attn_resolutions"):
    value = filled[field]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise ValueError(f"{spec.where('ddconfig.' + field)} is {value!r}; a list of ints")
    filled[field] = tuple(value)
  if not filled["ch_mult"] or min(filled["ch_mult"]) <= 0:
    raise ValueError(f"{spec.where('ddconfig.ch_mult')} is {list(filled['ch_mult'])}; a "
                     f"non-empty list of positive ints")
  for field, (_, supported) in _DDCONFIG_OPTIONS.items():
    if supported is not None and filled[field] not in supported:
      raise ValueError(f"{spec.where('ddconfig.' + field)} is {filled[field]!r}, which "
                       f"models.AutoencoderKL does not implement; supported: {supported}")
  # LDM puts attention blocks in every encoder / decoder level whose resolution (resolution /
  # 2^level) is listed; this module has attention in the middle blocks only.
  levels = [filled["resolution"] // 2 ** i for i in range(len(filled["ch_mult"]))]
  attended = sorted(set(levels) & set(filled["attn_resolutions"]), reverse=True)
  if attended:
    raise ValueError(
        f"{spec.where('ddconfig.attn_resolutions')} is {list(filled['attn_resolutions'])}: "
        f"attention at the level resolutions {attended} (of {levels}, resolution "
        f"{filled['resolution']}) is not implemented; models.AutoencoderKL has attention in "
        f"the middle blocks only; supported: [] (or resolutions no level has)")
  embed_dim = params.get("embed_dim")
  if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
    raise ValueError(f"{spec.where('embed_dim')} is {embed_dim!r}; a positive int")
  if embed_dim != filled["z_channels"]:
    raise ValueError(f"{spec.where('embed_dim')} is {embed_dim} but ddconfig.z_channels is "
                     f"{filled['z_channels']}; models.AutoencoderKL has one latent width "
                     f"(supported: embed_dim == z_channels)")
  scale_factor, scale_by_std = None, False
  if full is not None:
    for field in ("latents_mean", "latents_std"):
      if full.get(field) is not None:
        raise ValueError(f"{path}: model.params.{field} is set; per-channel latent "
                         f"statistics are not supported (supported: none)")
    scale_factor = full.get("scale_factor", LDM_DEFAULT_SCALE_FACTOR)
    if not isinstance(scale_factor, (int, float)) or isinstance(scale_factor, bool) or not (
        scale_factor > 0):
      raise ValueError(f"{path}: model.params.scale_factor is {scale_factor!r}; a positive "
                       f"number")
    scale_factor, scale_by_std = float(scale_factor), bool(full.get("scale_by_std", False))
  return dataclasses.replace(spec, ddconfig=filled, embed_dim=embed_dim,
                             scale_factor=scale_factor, scale_by_std=scale_by_std)


def check_ldm_yaml(spec: LdmYaml, inferred: Mapping[str, Any], where: str) -> None:
  """Raises a ValueError naming the first YAML field whose value disagrees with the state
  dict's shapes (`inferred`: `models.autoencoder.infer_config_from_ldm` of it), with both
  values.

  Args:
    spec: the YAML's first stage (`read_ldm_yaml`).
    inferred: the architecture read off the state dict.
    where: how to name the state dict (its file).
  """
  d = spec.ddconfig
  channels = tuple(int(c) for c in inferred["block_out_channels"])
  # (YAML field, its value, what the state dict shows for it)
  pairs = [("ddconfig.in_channels", d["in_channels"], inferred["in_channels"]),
           ("ddconfig.out_ch", d["out_ch"], inferred["out_channels"]),
           ("ddconfig.ch", d["ch"], channels[0]),
           ("ddconfig.ch_mult", list(d["ch_mult"]), [c / channels[0] for c in channels]),
           ("ddconfig.num_res_blocks", d["num_res_blocks"], inferred["layers_per_block"]),
           ("ddconfig.z_channels", d["z_channels"], inferred["latent_channels"]),
           ("embed_dim", spec.embed_dim, inferred["latent_channels"])]
  for field, value, found in pairs:
    if value != found:
      if field == "ddconfig.ch_mult":  # e.g. [1, 2, 4] against [1, 2]: ints where they are
        found = [int(m) if float(m).is_integer() else m for m in found]
      raise ValueError(f"{spec.where(field)} is {value!r}, but the state dict of {where} has "
                       f"{found!r}")
  if (d["attn_type"] != "none") != inferred["mid_block_add_attention"]:
    found = "mid-block attention" if inferred["mid_block_add_attention"] else "none"
    raise ValueError(f"{spec.where('ddconfig.attn_type')} is {d['attn_type']!r}, but the "
                     f"state dict of {where} has {found} (keys 'encoder.mid.attn_1.*')")


def config_from_ldm_yaml(spec: LdmYaml, *, norm_num_groups: int = 32,
                         scaling_factor: float = 0.18215) -> dict[str, Any]:
  """The diffusers-style `AutoencoderKL` config (for `autoencoder_from_config`) of an LDM
  YAML's first stage: ch * ch_mult -> block_out_channels, num_res_blocks ->
  layers_per_block, z_channels -> latent_channels, in_channels, out_ch -> out_channels,
  attn_type -> mid_block_add_attention (LDM's GroupNorm has 32 groups, not in the YAML)."""
  d = spec.ddconfig
  n = len(d["ch_mult"])
  return {"in_channels": d["in_channels"], "out_channels": d["out_ch"],
          "block_out_channels": tuple(d["ch"] * m for m in d["ch_mult"]),
          "layers_per_block": d["num_res_blocks"], "latent_channels": d["z_channels"],
          "norm_num_groups": norm_num_groups, "scaling_factor": float(scaling_factor),
          "mid_block_add_attention": d["attn_type"] != "none", "use_quant_conv": True,
          "use_post_quant_conv": True, "down_block_types": ae_lib.DOWN_BLOCK_TYPES * n,
          "up_block_types": ae_lib.UP_BLOCK_TYPES * n}


def _yaml_scaling_factor(spec: LdmYaml, state: Mapping[str, Any], where: str) -> float | None:
  """The latent scale an LDM YAML gives: `scale_factor`, or with `scale_by_std` the one the
  training run computed and saved in the checkpoint (key `scale_factor`)."""
  if not spec.scale_by_std:
    return spec.scale_factor
  saved = state.get("scale_factor")
  if saved is None or np.size(saved) != 1:
    raise ValueError(f"{spec.path}: model.params.scale_by_std is true, so the latent scale "
                     f"was computed from data and saved in the checkpoint, but {where} holds "
                     f"no scalar 'scale_factor'; pass the factor explicitly (scaling_factor=)")
  return float(np.asarray(saved).reshape(()))


def import_ldm_vae(checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
                   overwrite: bool = False, norm_num_groups: int = 32,
                   scaling_factor: float | None = None,
                   yaml_path: str | os.PathLike | None = None) -> dict:
  """Imports an LDM / Stable Diffusion autoencoder (`.ckpt` / `.pt` / `.safetensors`, bare or
  a full model with `first_stage_model.`) into `workdir`.

  The architecture is inferred from the state dict's shapes; with `yaml_path` (an SD / LDM
  YAML, see `read_ldm_yaml`) it is the YAML's `ddconfig` / `embed_dim`, checked against those
  shapes, and the latent scale is the YAML's `scale_factor`. GroupNorm groups are in neither
  (LDM and SD use 32).

  Args:
    checkpoint: the checkpoint file.
    workdir: where to write `autoencoder/`.
    overwrite: replace an autoencoder already there (the old one is set aside).
    norm_num_groups: GroupNorm groups.
    scaling_factor: the latent scale; None: the YAML's (`model.params.scale_factor`, or the
      checkpoint's saved `scale_factor` with `scale_by_std`), else SD's 0.18215.
    yaml_path: an SD / LDM YAML of the checkpoint, or None.

  Returns:
    `{"format", "autoencoder" (the directory written), "scaling_factor", "config", "yaml"}`.

  Raises:
    FileNotFoundError, ValueError: see `autoencoder_files.read_ldm_checkpoint` (a pickle
      that would run code is refused), `read_ldm_yaml` (options the module cannot express),
      `check_ldm_yaml` (a YAML field against the state dict: the field and both values) and
      `models.autoencoder.params_from_ldm`; all before anything is built or written.
    FileExistsError: the workdir already holds an autoencoder and not `overwrite`.
  """
  path = os.fspath(checkpoint)
  if os.path.isdir(path):
    raise ValueError(f"--format=ldm_vae takes a checkpoint file (.ckpt, .pt, .safetensors); "
                     f"{path} is a directory (a diffusers folder is --format=diffusers_vae)")
  spec = None if yaml_path is None else read_ldm_yaml(yaml_path)
  _refuse_existing(autoencoder_dir(workdir), overwrite)
  state = autoencoder_files.read_ldm_checkpoint(path)
  inferred = ae_lib.infer_config_from_ldm(state, norm_num_groups=norm_num_groups, where=path)
  if spec is not None:
    check_ldm_yaml(spec, inferred, where=path)
    if scaling_factor is None:
      scaling_factor = _yaml_scaling_factor(spec, state, path)
  if scaling_factor is None:
    scaling_factor = SD_SCALING_FACTOR
  if spec is None:
    config = {**inferred, "scaling_factor": float(scaling_factor)}
  else:
    config = config_from_ldm_yaml(spec, norm_num_groups=norm_num_groups,
                                  scaling_factor=scaling_factor)
  module = ae_lib.autoencoder_from_config(config, where=path if spec is None else spec.path)
  params = ae_lib.params_from_ldm(state, module, where=path)
  directory = save_imported(workdir, module, params, source=os.path.abspath(path),
                            overwrite=overwrite)
  logging.info("Imported the LDM autoencoder %s into %s", path, directory)
  return dict(format="ldm_vae", autoencoder=directory, scaling_factor=float(scaling_factor),
              config=config_of(module), yaml=None if spec is None else spec.path)
