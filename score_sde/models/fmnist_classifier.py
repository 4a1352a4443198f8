"""A small Fashion-MNIST classifier: the feature network of "FD-FMNIST".

Inception-v3 features say little about 28x28 grey clothes, and its weights cannot be
downloaded here; this CNN is trained by `scripts/train_fmnist_classifier.py` on the train
split, and its weights ship with the package (`score_sde/assets/fmnist_classifier.npz`), their
SHA-256 checked at load, so every user gets the same numbers. Its penultimate activations
(`FEATURE_DIM` = 128, taken before the ReLU: after it a fifth of the units are
always zero and the covariance would be singular; divided by `FEATURE_SCALE`) are the features of the Frechet distance, KID and
precision / recall; its logits give a classifier-based Inception Score and the class
histogram of samples.

    net = FashionMNISTClassifier()
    logits, features = net.apply(variables, images)   # images [B, 28, 28, 1] in [0, 1]
    variables = load_variables()                      # the shipped weights, checksum verified
"""

from __future__ import annotations

import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

NUM_CLASSES = 10
FEATURE_DIM = 128
# Features are the pre-activations divided by this constant: on the train split their RMS is
# then ~0.5 (5.5 before), the scale of Inception pool features, for which KID's cubic kernel
# (x.y / d + 1)^3 was designed; unscaled, x.y / d ~ 17 and a few large products dominate KID.
FEATURE_SCALE = 10.0
IMAGE_SHAPE = (28, 28, 1)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "assets", "fmnist_classifier.npz")
# SHA-256 of the shipped weights file; scripts/train_fmnist_classifier.py prints the new value.
WEIGHTS_SHA256 = "1ae92af38da9760c203ebb2abd5701f5d3bf2296ca021b5ac4e382a178868c69"


class FashionMNISTClassifier(nn.Module):
  """Three 3x3 conv stages (conv -> GroupNorm -> ReLU; 2x2 max pools after the first two:
  28 -> 14 -> 7), then a dense layer of `FEATURE_DIM` units on the flattened 7 x 7 maps (the
  features, before its ReLU) and the class logits.

  Attributes:
    widths: channels of the conv stages.
    dropout: dropout rate on the features while training.
  """
  widths: tuple[int, ...] = (16, 32, 64)
  dropout: float = 0.3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Args: x [B, 28, 28, 1] in [0, 1]. Returns (logits [B, 10], features [B, 128])."""
    h = x * 2.0 - 1.0
    for i, width in enumerate(self.widths):
      h = nn.Conv(width, (3, 3))(h)
      h = nn.GroupNorm(num_groups=8)(h)
      h = nn.relu(h)
      if i < 2:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))  # 28 -> 14 -> 7
    h = h.reshape(h.shape[0], -1)
    pre_activation = nn.Dense(FEATURE_DIM)(h)
    hidden = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(pre_activation))
    return nn.Dense(NUM_CLASSES)(hidden), pre_activation / FEATURE_SCALE


def sha256_of_file(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_variables(path: str | os.PathLike, variables) -> str:
  """Writes `variables` as an .npz of float32 arrays named by their '/'-joined paths.

  Returns:
    The file's SHA-256.
  """
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in sorted(flat.items())})
  return sha256_of_file(path)


def load_variables(path: str | os.PathLike | None = None,
                   sha256: str | None = None) -> dict:
  """Loads classifier variables, checking the file's SHA-256.

  Args:
    path: an .npz of `save_variables`; None: the shipped `WEIGHTS_PATH`.
    sha256: the expected hash; None: `WEIGHTS_SHA256` for the shipped file, no check for
      another file.

  Returns:
    The variables pytree ({'params': ...}) as jnp arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the hash differs (a corrupt or different file), or the arrays do not fit the
      network.
  """
  shipped = path is None
  path = WEIGHTS_PATH if shipped else os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Fashion-MNIST classifier weights not found at {path!r}"
        + ("; they ship with the package (reinstall it, or train them with "
           "`python scripts/train_fmnist_classifier.py`)" if shipped else ""))
  expected = sha256 if sha256 is not None else (WEIGHTS_SHA256 if shipped else None)
  actual = sha256_of_file(path)
  if expected is not None and actual != expected:
    raise ValueError(f"{path}: SHA-256 {actual} differs from the expected {expected}: a "
                     f"corrupt or different weights file; FD-FMNIST numbers made with it "
                     f"would not be comparable")
  with np.load(path, allow_pickle=False) as f:
    flat = {k: jnp.asarray(f[k]) for k in f.files}
  variables = traverse_util.unflatten_dict(flat, sep="/")
  reference = jax.eval_shape(
      lambda: FashionMNISTClassifier().init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, *IMAGE_SHAPE))))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(reference, sep="/").items()}
  got = {k: v.shape for k, v in flat.items()}
  if want != got:
    raise ValueError(f"{path}: arrays {sorted(got.items())} do not fit FashionMNISTClassifier "
                     f"(expected {sorted(want.items())})")
  return variables
