"""Reading pytorch-fid's Inception-v3 weights file (the conversion to the Flax network's
variables is `score_sde.models.inception.variables_from_state_dict`, a pure function of the
state dict).

    state_dict = load_inception_variables("pt_inception-2015-12-05-6726825d.pth")
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import numpy as np

from score_sde.io import torch_zip

# pytorch-fid's file (also `models.inception.WEIGHTS_FILENAME`; io does not import models).
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)


def load_inception_variables(path: str | os.PathLike | None) -> dict[str, np.ndarray]:
  """The state dict of pytorch-fid's Inception-v3 weights file, read without torch and without
  executing pickled code (`torch_zip.load`: torch's zip format or its legacy one).

  Args:
    path: the `pt_inception-2015-12-05-*.pth` file (a torch state dict); None: not given.

  Returns:
    torch name -> numpy array, torch layouts (convert with
    `models.inception.variables_from_state_dict`).

  Raises:
    FileNotFoundError: no file (the message says where to download it).
    torch_zip.CheckpointFormatError (a ValueError): not a torch checkpoint, or a pickle that
      references anything but tensors and plain containers.
    ValueError: the file holds something other than a dict of tensors.
  """
  if path is None or not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception-v3 FID weights not found at {path!r}. This machine does not download "
        f"them: get {WEIGHTS_FILENAME} from {WEIGHTS_URL} (the file pytorch-fid uses; "
        f"torch-fidelity and pytorch-fid cache it under ~/.cache/torch/hub/checkpoints/) and "
        f"pass its path (config.eval.inception_weights or --inception_weights)")
  state_dict = torch_zip.load(path)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
  bad = [k for k, v in state_dict.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}, not a "
                     "tensor: not an Inception-v3 state dict")
  return dict(state_dict)


def sha256_of_file(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes (recorded with FID statistics to name the weights)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
