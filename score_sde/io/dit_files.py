"""Reading facebookresearch/DiT checkpoint files (the conversion to this project's variables
is `score_sde.models.dit_weights`, pure functions of the state dict)."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from score_sde.io import torch_zip


def read_dit_checkpoint(path: str | os.PathLike, *, ema: bool = True
                              ) -> dict[str, np.ndarray]:
  """The state dict of a facebookresearch/DiT checkpoint file, read without torch and without
  executing pickled code (`torch_zip.load`).

  As the reference's `download.find_model`: a training checkpoint of train.py (`{"model",
  "ema", "opt", "args"}`) gives its "ema" weights; a bare state dict (the published
  `DiT-XL-2-256x256.pt`) is returned as it is.

  Args:
    path: the `.pt` file.
    ema: take "ema" from a training checkpoint (the reference's choice); False: "model".
      A bare state dict has one set of weights and is returned either way.

  Returns:
    key -> float NumPy array, PyTorch layouts.

  Raises:
    FileNotFoundError: no such file.
    torch_zip.CheckpointFormatError: not a torch zip file, or a pickle referencing anything
      but tensors, plain containers and `argparse.Namespace`.
    ValueError: not a DiT state dict or training checkpoint (a training checkpoint with only
      one of "model" / "ema" gives that one either way).
  """
  model_weights, ema_weights = read_dit_weights(path)
  return ema_weights if ema else model_weights


def read_dit_weights(path: str | os.PathLike
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """`(model, ema)` state dicts of a facebookresearch/DiT checkpoint file, read once: a
  training checkpoint's "model" and "ema" (either may be missing: then it is the other), or
  a bare state dict as both (the same dict object; the published files hold EMA weights).

  Raises:
    as `read_dit_checkpoint`.
  """
  checkpoint = torch_zip.load(path)
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path}: expected a state dict or a training checkpoint dict, got "
                     f"{type(checkpoint).__name__}")
  if "ema" in checkpoint or "model" in checkpoint:
    model = _state_dict(checkpoint.get("model", checkpoint.get("ema")), path)
    ema = _state_dict(checkpoint["ema"], path) if "ema" in checkpoint else model
    return model, ema
  state_dict = _state_dict(checkpoint, path)
  return state_dict, state_dict


def _state_dict(obj, path) -> dict[str, np.ndarray]:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  state_dict = dict(obj)
  bad = [k for k, v in state_dict.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}, not a "
                     "tensor: not a DiT state dict")
  return state_dict
