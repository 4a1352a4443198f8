"""Reading published KL-autoencoder weights (Stable Diffusion / LDM first stage) from files.

Two layouts, as users have them:

- a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or its
  `.fp16.safetensors` variant, or a torch `diffusion_pytorch_model.bin`); a whole pipeline
  folder with the autoencoder in `vae/` is accepted too;
- an LDM / Stable Diffusion checkpoint: `.safetensors`, or a torch zip `.ckpt` / `.pt` /
  `.pth` (PyTorch Lightning's `{"state_dict": ...}` or a bare state dict), read by the
  restricted reader `torch_zip.load`, which never runs pickled code.

    config, state = read_diffusers_folder("sd-vae-ft-mse")
    ae = autoencoder.autoencoder_from_config(config)
    params = autoencoder.params_from_diffusers(state, ae, where="sd-vae-ft-mse")

    state = read_ldm_checkpoint("vae-ft-mse-840000-ema-pruned.ckpt")
    ae = autoencoder.autoencoder_from_config(autoencoder.infer_config_from_ldm(state))
    params = autoencoder.params_from_ldm(state, ae)

The readers only read (files and devices, no networks: this module belongs with `io/`); the
mapping onto Flax is `score_sde.models.autoencoder`'s, and `run` joins the two.
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.numpy

from score_sde.io import torch_zip

# Weight files of a diffusers folder, in order of preference.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{key: array}` of a `.safetensors` file, read with the `safetensors` package.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a safetensors file (the message names it).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No safetensors file {path}")
  try:
    return dict(safetensors.numpy.load_file(path))
  except Exception as e:  # safetensors raises its own error type for malformed headers
    raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}"
                     ) from None


def _state_dict_of(obj, path: str) -> dict[str, np.ndarray]:
  """The state dict in a loaded torch checkpoint object: Lightning's `state_dict` or bare."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of "
                     "tensors, or a dict with one under 'state_dict')")
  arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not arrays:
    raise ValueError(f"{path}: its dict holds no tensors (keys {sorted(map(str, obj))[:5]})")
  return arrays


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict of a torch zip checkpoint, without torch and without running pickles.

  Raises:
    FileNotFoundError: no such file.
    torch_zip.CheckpointFormatError (a ValueError): not a torch zip file, or a pickle that
      references anything but tensors and plain containers.
    ValueError: the file holds no state dict.
  """
  path = os.fspath(path)
  return _state_dict_of(torch_zip.load(path), path)


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """The config and weights of a diffusers `AutoencoderKL` folder.

  Args:
    path: the folder with `config.json` and one of `DIFFUSERS_WEIGHTS`, or a pipeline folder
      whose `vae/` subfolder is one.

  Returns:
    `(config, state_dict)`: the parsed `config.json` and `{key: array}` in PyTorch layouts.

  Raises:
    FileNotFoundError: no such folder, no `config.json` or no weights file (named).
    ValueError: `config.json` is not JSON, or the weights file is not readable.
  """
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"No diffusers autoencoder folder {folder}")
  if (not os.path.isfile(os.path.join(folder, "config.json"))
      and os.path.isfile(os.path.join(folder, "vae", "config.json"))):
    folder = os.path.join(folder, "vae")
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No {config_path}: a diffusers AutoencoderKL folder holds "
                            f"config.json and {DIFFUSERS_WEIGHTS[0]}")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not JSON: {e}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_path} holds a {type(config).__name__}, not a config object")
  for name in DIFFUSERS_WEIGHTS:
    weights = os.path.join(folder, name)
    if os.path.isfile(weights):
      state = (read_safetensors(weights) if name.endswith(".safetensors")
               else read_torch_state_dict(weights))
      return config, state
  raise FileNotFoundError(f"No weights in {folder}: expected one of {DIFFUSERS_WEIGHTS}")


def read_ldm_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict of an LDM / Stable Diffusion checkpoint (autoencoder or full model).

  Args:
    path: a `.safetensors` file, or a torch zip file (`.ckpt`, `.pt`, `.pth`, `.bin`).

  Returns:
    `{key: array}` as stored (keys may carry `first_stage_model.`; see
    `autoencoder.ldm_autoencoder_state`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unknown suffix, or a file that is not of its format (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch_state_dict(path)
  raise ValueError(f"{path}: unknown checkpoint suffix; valid: ('.safetensors',) + "
                   f"{TORCH_SUFFIXES}")

