"""Feature networks for sample-quality metrics: images -> (features, logits), batched and jitted.

    net = features.get_feature_net("fmnist")                      # shipped weights, checksum verified
    path = "pt_inception-2015-12-05-6726825d.pth"                  # pytorch-fid's weights
    state_dict = inception_files.load_inception_variables(path)  # score_sde.io.inception_files
    net = features.get_feature_net("inception", inception_state_dict=state_dict,
                                   inception_sha256=inception_files.sha256_of_file(path))
    # (score_sde.run.quality.get_feature_net(config) does both from config.eval)
    feats, logits = net(images)        # images [N, H, W, C] in [0, 1] -> [N, d], [N, num_classes]

| name | network | images | features | logits |
|---|---|---|---|---|
| `fmnist` | `fmnist_classifier.FashionMNISTClassifier` | [N, 28, 28, 1] (or 32 x 32, zero-padded by 2) | 128 | 10 |
| `inception` | `inception.InceptionV3` (FID form) | [N, H, W, 3] or 1 channel (repeated), any size (resized to 299) | 2048 | 1008 |

Images must lie in [0, 1]: values outside [-0.5, 1.5] are an error (they are [-1, 1] or
[0, 255] data, not [0, 1] images); values slightly outside [0, 1] are clipped, as writing
samples to image files would. NaN or infinite values are an error naming how many samples
hold them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import metrics
from score_sde.checks import check_choice
from score_sde.models import fmnist_classifier
from score_sde.models import inception

_RANGE_SLACK = 0.5


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network with its weights.

  Attributes:
    name: the name in `FEATURE_NETS` (recorded in reference statistics).
    weights_sha256: SHA-256 of its weights file (recorded too: statistics of other weights
      are refused).
    feature_dim, num_classes: sizes of its outputs.
    apply: jitted `(variables, x [B, H, W, C] float32 in [0, 1]) -> (features, logits)`.
    variables: its weights.
    prepare: checks and converts a numpy batch of images (see the module docstring).
    batch_size: images per compiled call.
  """
  name: str
  weights_sha256: str
  feature_dim: int
  num_classes: int
  apply: Callable[..., Any]
  variables: Any
  prepare: Callable[[np.ndarray], np.ndarray]
  batch_size: int = 500

  def __call__(self, images, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of `images` [N, H, W, C] in [0, 1], as float32 numpy arrays.

    Raises:
      ValueError: wrong shape, range, or non-finite values (see the module docstring).
    """
    x = self.prepare(np.asarray(images))
    batch = int(batch_size or self.batch_size)
    feats, logits = [], []
    for start in range(0, len(x), batch):
      chunk = x[start:start + batch]
      n = len(chunk)
      if n < batch and len(x) > batch:  # pad: one compiled shape for every batch
        chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
      f, lg = self.apply(self.variables, jnp.asarray(chunk))
      feats.append(np.asarray(f)[:n])
      logits.append(np.asarray(lg)[:n])
    return np.concatenate(feats), np.concatenate(logits)


def check_images(images: np.ndarray, name: str) -> None:
  """Rank, finiteness and [0, 1] range of a batch of images for feature network `name`.

  Raises:
    ValueError: not [N, H, W, C], NaN / infinite values (naming how many samples), or values
      outside [-0.5, 1.5].
  """


  if images.ndim != 4:
    raise ValueError(f"feature net {name!r}: expected images [N, H, W, C], got shape "
                     f"{images.shape}")
  if len(images) == 0:
    raise ValueError(f"feature net {name!r}: no images")
  metrics.check_finite(images, "images")
  lo, hi = float(images.min()), float(images.max())
  if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
    raise ValueError(f"feature net {name!r}: images must be in [0, 1], got values in "
                     f"[{lo:.3g}, {hi:.3g}] (centered [-1, 1] data? apply "
                     f"datasets.get_data_inverse_scaler; uint8 [0, 255]? divide by 255)")


def _prepare_fmnist(images: np.ndarray) -> np.ndarray:
  check_images(images, "fmnist")
  if images.shape[1:] == (32, 32, 1):
    images = images[:, 2:30, 2:30]  # undo the zero padding of config.data.image_size = 32
  if images.shape[1:] != fmnist_classifier.IMAGE_SHAPE:
    raise ValueError(f"feature net 'fmnist': expected Fashion-MNIST images [N, 28, 28, 1] "
                     f"(or [N, 32, 32, 1], zero-padded), got {images.shape}; for other data "
                     f"use eval.fid_feature_net='inception'")
  return np.clip(images, 0.0, 1.0).astype(np.float32)


def _prepare_inception(images: np.ndarray) -> np.ndarray:
  check_images(images, "inception")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # grey -> RGB, as is usual for MNIST-like FIDs
  if images.shape[-1] != 3:
    raise ValueError(f"feature net 'inception': expected 1 or 3 channels, got shape "
                     f"{images.shape}")
  if min(images.shape[1:3]) < 2:
    raise ValueError(f"feature net 'inception': images of size {images.shape[1:3]} are too "
                     f"small to resize")
  return np.clip(images, 0.0, 1.0).astype(np.float32)


def _fmnist_net(inception_state_dict=None, inception_sha256=None) -> FeatureNet:
  del inception_state_dict, inception_sha256
  net = fmnist_classifier.FashionMNISTClassifier()
  variables = fmnist_classifier.load_variables()
  apply = jax.jit(lambda v, x: net.apply(v, x)[::-1])  # -> (features, logits)
  return FeatureNet("fmnist", fmnist_classifier.sha256_of_file(fmnist_classifier.WEIGHTS_PATH),
                    fmnist_classifier.FEATURE_DIM, fmnist_classifier.NUM_CLASSES, apply,
                    variables, _prepare_fmnist, batch_size=1000)


def _inception_net(inception_state_dict: dict[str, np.ndarray] | None = None,
                   inception_sha256: str | None = None) -> FeatureNet:
  if inception_state_dict is None or not inception_sha256:
    raise ValueError(
        "feature net 'inception' needs pytorch-fid's weights: pass inception_state_dict="
        "score_sde.io.inception_files.load_inception_variables(path) and inception_sha256="
        "inception_files.sha256_of_file(path) (run.quality.get_feature_net(config) does, "
        "from config.eval.inception_weights)")
  variables = inception.variables_from_state_dict(inception_state_dict)
  apply = jax.jit(inception.InceptionV3().apply)
  return FeatureNet("inception", inception_sha256,
                    inception.FEATURE_DIM, inception.NUM_LOGITS, apply, variables,
                    _prepare_inception, batch_size=50)


FEATURE_NETS: dict[str, Callable[..., FeatureNet]] = {
    "fmnist": _fmnist_net,
    "inception": _inception_net,
}


def get_feature_net(name: str, *, inception_state_dict: dict[str, np.ndarray] | None = None,
                    inception_sha256: str | None = None) -> FeatureNet:
  """The feature network `name` with its weights.

  Args:
    name: a key of `FEATURE_NETS`.
    inception_state_dict: pytorch-fid's Inception-v3 state dict, as
      `score_sde.io.inception_files.load_inception_variables(path)` reads it (for
      'inception').
    inception_sha256: the SHA-256 of that file (`inception_files.sha256_of_file(path)`),
      recorded with reference statistics (for 'inception').

  Raises:
    ValueError: unknown name, 'inception' without its state dict and digest, or a state dict
      that is not the FID Inception-v3.
  """
  check_choice("feature network", name, FEATURE_NETS, hint="(config.eval.fid_feature_net)")
  return FEATURE_NETS[name](inception_state_dict=inception_state_dict,
                            inception_sha256=inception_sha256)
