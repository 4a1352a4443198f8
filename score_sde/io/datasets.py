"""Data sources -> batches of NHWC float32 images in [0, 1].

`get_dataset(spec, split, batch_size=...)` returns a `Dataset` whose `batch(step)` is a pure function of
`(seed, step)`: which examples a batch holds, their flips and their dequantization noise all
follow from the seed and the step alone. A run resumed at step k therefore sees exactly the
batches an uninterrupted run would, with no iterator state to checkpoint.

Sources, by `config.data.dataset`:

  fashion_mnist, mnist   idx files (`train-images-idx3-ubyte[.gz]`, ...) in
                         `config.data.data_dir` (Fashion-MNIST default: the Debian package
                         `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist); 28x28,
                         or zero-padded to 32x32 by `config.data.image_size`.
  cifar10_tarball        `cifar-10-python.tar.gz` in `config.data.data_dir` (or that file's
                         path), read straight from the tarball with a restricted unpickler.
  synthetic              deterministic random uint8 images, for smoke tests without files.
  anything else          a TFDS name (`cifar10`, `celeb_a`, `lsun/bedroom`, `svhn_cropped`,
                         ...) read by random access (`array_record`) from
                         `config.data.tfds_data_dir`, without TensorFlow and never
                         downloading: a dataset that is not prepared there fails at once.

Preprocessing follows the reference codebase: random horizontal flips on the train split
(`config.data.random_flip`), uniform dequantization (`config.data.uniform_dequantization`:
`(x * 255 + U[0, 1)) / 256`), and NOT centering: mapping [0, 1] to [-1, 1] is the job of
`get_data_scaler`, which the train step applies. Everything here is numpy on the host.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import io
import itertools
import os
import pickle
import tarfile
import zlib
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from score_sde.io import torch_zip

Batch = dict[str, np.ndarray]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SPLITS = ("train", "test")

# Independent random streams of one seed: np.random.default_rng([seed, stream, counter]).
_STREAM_ORDER = 0  # per-epoch permutations; counter = epoch
_STREAM_AUGMENT = 1  # flips and dequantization noise of batch(step); counter = step
_STREAM_ONCE = 2  # dequantization noise of iterate_once(); counter = batch index
_STREAM_SYNTHETIC = 3  # the synthetic dataset itself


# ----------------------------------------------------------------------------------------
# The scaler pair: the one owner of the [0, 1] <-> [-1, 1] mapping.


def get_data_scaler(centered: bool) -> Callable[[Any], Any]:
  """Returns the map from data in [0, 1] to model inputs: [-1, 1] if `centered`, else [0, 1].

  Works on numpy and jax arrays alike (`x * 2 - 1` or the identity).
  """
  if centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(centered: bool) -> Callable[[Any], Any]:
  """Returns the inverse of `get_data_scaler(centered)`: model space back to [0, 1]."""
  if centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


# ----------------------------------------------------------------------------------------
# Sources: a source holds (or reaches) uint8 images and answers `get(indices)`.


class Source(Protocol):
  """What `Dataset` needs of a data source."""

  num_examples: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int  # 0 when the dataset has no labels

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images uint8 [n, H, W, C], labels int32 [n])` for `indices: [n]`."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A dataset held in memory: `images` uint8 `[N, H, W, C]`, `labels` int `[N]`."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, C]; got {self.images.dtype} "
                       f"{self.images.shape}")
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"labels must be [N] = {self.images.shape[:1]}; got "
                       f"{self.labels.shape}")

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices].astype(np.int32)


# ---- idx files (MNIST, Fashion-MNIST) --------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
  """Reads an idx file of unsigned bytes (plain or gzipped: told by its first bytes).

  The idx format: 2 zero bytes, a type byte (0x08 = ubyte), a byte with the number of
  dimensions, that many big-endian int32 sizes, then the data, row-major.

  Args:
    path: the file.
    ndim: the expected number of dimensions (3 for images, 1 for labels).

  Returns:
    uint8 array of the stored shape, e.g. `[N, 28, 28]` or `[N]`.

  Raises:
    ValueError: a bad magic number, a type other than ubyte, another number of dimensions,
      or a data size that does not match the header.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise ValueError(f"{path}: gzip data cut short or corrupt ({type(e).__name__}: {e}); "
                       f"download the file again") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an idx file (magic bytes {raw[:4].hex()!r}, expected "
                     f"0000{_IDX_UBYTE:02x}{ndim:02x})")
  if raw[2] != _IDX_UBYTE or raw[3] != ndim:
    raise ValueError(f"{path}: idx type 0x{raw[2]:02x} with {raw[3]} dimensions; expected "
                     f"unsigned bytes (0x{_IDX_UBYTE:02x}) with {ndim} dimensions")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated idx header")
  shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
  if len(raw) - header != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but "
                     f"the file holds {len(raw) - header} bytes of data")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_file(data_dir: str, base: str) -> str | None:
  for name in (base, base.replace("-idx", ".idx")):  # MNIST mirrors use both spellings
    for suffix in ("", ".gz"):
      path = os.path.join(data_dir, name + suffix)
      if os.path.isfile(path):
        return path
  return None


def load_idx(data_dir: str, split: str, *, dataset: str = "fashion_mnist"
             ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of an MNIST-format dataset from its idx files.

  Args:
    data_dir: the folder holding `train-images-idx3-ubyte[.gz]`, `train-labels-...`,
      `t10k-images-...`, `t10k-labels-...`.
    split: "train" or "test".
    dataset: the name used in error messages ("fashion_mnist" or "mnist").

  Returns:
    `(images uint8 [N, 28, 28, 1], labels int32 [N])`.

  Raises:
    FileNotFoundError: a file is missing (the message names the folder, the files looked
      for and how to get them).
    ValueError: a corrupt file, or images and labels of different counts.
  """
  paths = [_find_idx_file(data_dir, base) for base in IDX_FILES[split]]
  if None in paths:
    looked_for = ", ".join(f"{b}[.gz]" for b in IDX_FILES[split])
    if dataset == "fashion_mnist":
      fix = ("install them with `sudo apt-get install dataset-fashion-mnist` (into "
             f"{FASHION_MNIST_DIR}), or download them from "
             "https://github.com/zalandoresearch/fashion-mnist and set config.data.data_dir")
    else:
      fix = ("download the four MNIST idx files (e.g. from "
             "https://storage.googleapis.com/cvdf-datasets/mnist/) and set "
             "config.data.data_dir to their folder")
    raise FileNotFoundError(f"{dataset} {split} split: looked for {looked_for} in "
                            f"{os.path.abspath(data_dir)!r} and did not find them all; {fix}.")
  images = read_idx(paths[0], ndim=3)
  labels = read_idx(paths[1], ndim=1)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds "
                     f"{labels.shape[0]} labels")
  return images[..., None], labels.astype(np.int32)


# ---- CIFAR-10 python tarball -----------------------------------------------------------


_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own, whatever its module


def _safe_reconstruct(subtype, shape, typecode):
  """numpy's `_reconstruct` (an empty array that the pickle's BUILD fills), plain arrays only."""
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(f"CIFAR pickle: refusing to build {subtype!r}")
  return _NUMPY_RECONSTRUCT(subtype, shape, typecode)


def _safe_dtype(spec, align=False, copy=True):
  """`numpy.dtype`, for the one dtype a CIFAR batch holds: uint8."""
  if spec not in ("u1", b"u1"):
    raise pickle.UnpicklingError(f"CIFAR pickle: refusing dtype {spec!r} (CIFAR data are u1)")
  return np.dtype("u1", align, copy)


# The globals a CIFAR-10 batch names (a dict of byte strings, lists and one uint8 array):
# numpy's array reconstructor, `numpy.ndarray` and `numpy.dtype`. Any other global
# (`os.system`, `builtins.eval`, ...) is refused by `torch_zip.RestrictedUnpickler` before it
# can be called.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,  # as in the real files
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,  # numpy >= 2 writers
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}


def _load_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  """One pickled CIFAR-10 batch -> `(images uint8 [N, 32, 32, 3], labels int32 [N])`."""
  batch = torch_zip.RestrictedUnpickler(
      io.BytesIO(raw), _CIFAR_GLOBALS, where,
      what="a CIFAR-10 batch never needs it (tampered or wrong file?)",
      error=pickle.UnpicklingError, encoding="bytes").load()
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    raise ValueError(f"{where}: not a CIFAR-10 batch (a dict with b'data' and b'labels')")
  data, labels = batch[b"data"], np.asarray(batch[b"labels"])
  if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3 * 32 * 32):
    raise ValueError(f"{where}: b'data' must be uint8 [N, 3072]")
  if labels.shape != data.shape[:1] or labels.dtype.kind not in "iu" or (
      labels.size and (labels.min() < 0 or labels.max() > 9)):
    raise ValueError(f"{where}: b'labels' must be [N] = {data.shape[:1]} ints in [0, 9]")
  # Each row is channel-major (1024 red, 1024 green, 1024 blue), each plane row-major.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar10_tarball(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of CIFAR-10 from `cifar-10-python.tar.gz` without extracting it.

  Args:
    path: the tarball, or a folder that holds `cifar-10-python.tar.gz`.
    split: "train" (data_batch_1..5, 50000 images) or "test" (test_batch, 10000).

  Returns:
    `(images uint8 [N, 32, 32, 3], labels int32 [N])`.

  Raises:
    FileNotFoundError: no tarball, or a batch missing from it.
    pickle.UnpicklingError: a pickle that names a global a CIFAR batch does not need.
    ValueError: a batch of the wrong structure.
  """
  tar_path = os.path.join(path, CIFAR10_TARBALL) if os.path.isdir(path) else path
  if not os.path.isfile(tar_path):
    raise FileNotFoundError(
        f"cifar10_tarball: no {CIFAR10_TARBALL} at {os.path.abspath(tar_path)!r}; download "
        f"it from {CIFAR10_URL} and set config.data.data_dir to its folder (or use "
        "dataset='cifar10' with a prepared TFDS copy).")
  names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
  images, labels = [], []
  try:
    with tarfile.open(tar_path, "r:gz") as tar:
      for name in names:
        member = f"cifar-10-batches-py/{name}"
        try:
          f = tar.extractfile(member)
        except KeyError:
          f = None
        if f is None:
          found = sorted(tar.getnames())
          raise FileNotFoundError(
              f"{tar_path}: no file {member} in the tarball (it holds {found[:8]}"
              f"{' ...' if len(found) > 8 else ''}); is it {CIFAR10_TARBALL} from "
              f"{CIFAR10_URL}?")
        x, y = _load_cifar_batch(f.read(), f"{tar_path}:{member}")
        images.append(x)
        labels.append(y)
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    # A download cut short, or another file under the name.
    raise ValueError(f"{tar_path}: not a readable gzipped tarball, cut short or corrupt "
                     f"({type(e).__name__}: {' '.join(str(e).split())}); download it again "
                     f"from {CIFAR10_URL}") from None
  return np.concatenate(images), np.concatenate(labels)


# ---- TFDS (random access, no TensorFlow) ------------------------------------------------

# Per dataset family: (name of the eval split, crop before resizing, PIL resampling filter),
# as the reference codebase preprocesses them. Crop: None = none, an int = central crop of
# that size, "square" = central crop to the shorter side.
_TFDS_LAYOUT = {
    "celeb_a": ("validation", 140, "bilinear"),
    "lsun": ("validation", "square", "bicubic"),
}
_TFDS_DEFAULT_LAYOUT = ("test", None, "bilinear")


def _center_crop(image: np.ndarray, size: int | str | None) -> np.ndarray:
  """Central crop of `image: [H, W, C]` to `size x size` (or the shorter side: "square")."""
  if size is None:
    return image
  h, w = image.shape[:2]
  s = min(h, w) if size == "square" else min(size, h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top:top + s, left:left + s]


def resize_image(image: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
  """Resizes `image: uint8 [H, W, C]` to `[size, size, C]` (antialiased PIL, rounded)."""
  if image.shape[:2] == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
  c = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  out = np.asarray(pil.resize((size, size), filters[resample]))
  return out.reshape(size, size, c)


@dataclasses.dataclass(frozen=True, eq=False)
class TFDSSource:
  """A TFDS split read by random access: decodes, crops and resizes only what `get` asks."""

  data_source: Any  # a tfds data source: __len__, __getitems__(list[int]) -> list[dict]
  image_size: int
  channels: int
  num_classes: int
  crop: int | str | None = None
  resample: str = "bilinear"

  @property
  def num_examples(self) -> int:
    return len(self.data_source)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = self.data_source.__getitems__([int(i) for i in indices])
    images = np.stack([
        resize_image(_center_crop(np.asarray(r["image"], np.uint8), self.crop),
                     self.image_size, self.resample) for r in records])
    labels = np.array([int(r.get("label", 0)) for r in records], np.int32)
    return images, labels


def _tfds_fix(name: str, root: str) -> str:
  fix = (f"On a machine with internet and TensorFlow, prepare it in the array_record format "
         f"(random access; the default tfrecord format cannot be read here):\n"
         f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
         f"data_dir='{root}', file_format='array_record').download_and_prepare()\"\n"
         f"then copy {root}/{name.split(':')[0]} to this machine and set "
         "config.data.tfds_data_dir to the folder that holds it.")
  if name == "cifar10":
    fix += (f" Or download {CIFAR10_URL} and use config.data.dataset='cifar10_tarball' with "
            "config.data.data_dir set to its folder.")
  return fix


def open_tfds(name: str, split: str, *, data_dir: str | None, image_size: int
              ) -> TFDSSource:
  """Opens a prepared TFDS dataset for random access, without TensorFlow or downloads.

  Args:
    name: a TFDS name, e.g. "cifar10", "celeb_a", "lsun/bedroom", "svhn_cropped".
    split: "train" or "test" ("test" reads the family's eval split: "validation" for
      celeb_a and lsun, "test" otherwise).
    data_dir: the TFDS data folder; None: TFDS's default (`$TFDS_DATA_DIR` or
      ~/tensorflow_datasets).
    image_size: the side of the returned square images.

  Returns:
    A `TFDSSource`.

  Raises:
    ValueError: an unknown TFDS name, or a split the dataset lacks.
    FileNotFoundError: the dataset is not prepared in `data_dir` in a random-access format
      (the message says where it looked and how to prepare it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"Unknown dataset {name!r}: not one of the local sources {sorted(LOCAL_SOURCES)} "
        "and not a TFDS name (see tfds.list_builders())") from None
  variant_dir = os.fspath(builder.data_dir)
  root = os.fspath(builder.data_dir_root)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under {root!r} (looked for "
        f"{variant_dir}/dataset_info.json); this code never downloads. "
        + _tfds_fix(name, root))
  family = name.split("/")[0].split(":")[0]
  eval_split, crop, resample = _TFDS_LAYOUT.get(family, _TFDS_DEFAULT_LAYOUT)
  split_name = "train" if split == "train" else eval_split
  if builder.info.splits and split_name not in builder.info.splits:
    raise ValueError(f"TFDS dataset {name!r} has no split {split_name!r}; it has "
                     f"{sorted(builder.info.splits)}")
  features = builder.info.features
  has_label = "label" in features
  try:
    data_source = builder.as_data_source(split=split_name)
  except NotImplementedError:  # prepared, but as tfrecord: no random access without TF
    raise FileNotFoundError(
        f"TFDS dataset {name!r} in {variant_dir!r} is stored in the "
        f"{builder.info.file_format.value} format, which has no random access; need "
        "array_record (or parquet). " + _tfds_fix(name, root)) from None
  return TFDSSource(
      data_source=data_source,
      image_size=image_size,
      channels=int(features["image"].shape[-1]),
      num_classes=int(features["label"].num_classes) if has_label else 0,
      crop=crop,
      resample=resample)


# ---- what to load, and the loaders -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which data, at which size, prepared how (the run's `config.data`, as plain fields).

  Attributes:
    dataset: a name of `LOCAL_SOURCES` or a TFDS dataset name.
    image_size: the side of the square images (resized / padded by the source).
    num_channels: the expected channel count (None: whatever the data have).
    data_dir: the folder of local files (None: the dataset's default, if it has one).
    tfds_data_dir: TFDS's data folder (None: TFDS's default).
    random_flip: flip train images left-right at random.
    uniform_dequantization: add U(0, 1/256) noise to the 8-bit values.
    seed: the data seed (shuffling, flips, dequantization, synthetic data).
  """
  dataset: str
  image_size: int
  num_channels: int | None = None
  data_dir: str | None = None
  tfds_data_dir: str | None = None
  random_flip: bool = False
  uniform_dequantization: bool = False
  seed: int = 0


def _load_idx_source(spec: DataSpec, split: str) -> ArraySource:
  dataset = spec.dataset
  data_dir = spec.data_dir or (FASHION_MNIST_DIR if dataset == "fashion_mnist" else None)
  if data_dir is None:
    raise FileNotFoundError(f"{dataset}: config.data.data_dir is not set; point it at the "
                            f"folder holding {', '.join(IDX_FILES[split])}[.gz]")
  size = spec.image_size
  if size not in (28, 32):
    raise ValueError(f"{dataset}: spec.image_size must be 28 (as stored) or 32 "
                     f"(zero-padded by 2 on each side); got {size!r}")
  images, labels = load_idx(data_dir, split, dataset=dataset)
  if size == 32 and images.shape[1:3] == (28, 28):
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return ArraySource(images, labels, num_classes=10)


def _load_cifar10_tarball_source(spec: DataSpec, split: str) -> ArraySource:
  data_dir = spec.data_dir
  if data_dir is None:
    raise FileNotFoundError(f"cifar10_tarball: config.data.data_dir is not set; download "
                            f"{CIFAR10_URL} and point config.data.data_dir at its folder")
  images, labels = load_cifar10_tarball(data_dir, split)
  size = spec.image_size
  if size != 32:
    images = np.stack([resize_image(x, size) for x in images])
  return ArraySource(images, labels, num_classes=10)


def _load_synthetic_source(spec: DataSpec, split: str) -> ArraySource:
  """Random uint8 images of the spec's shape: 512 train / 128 test, 10 classes."""
  n = 512 if split == "train" else 128
  rng = np.random.default_rng([spec.seed, _STREAM_SYNTHETIC, SPLITS.index(split)])
  shape = (n, spec.image_size, spec.image_size, spec.num_channels)
  images = rng.integers(0, 256, size=shape, dtype=np.uint8)
  return ArraySource(images, rng.integers(0, 10, size=n).astype(np.int32), num_classes=10)


def _load_tfds_source(spec: DataSpec, split: str) -> TFDSSource:
  data_dir = spec.tfds_data_dir or None  # "" means TFDS's default
  return open_tfds(spec.dataset, split, data_dir=data_dir,
                   image_size=spec.image_size)


# Local sources by name; any other name is looked up in TFDS.
LOCAL_SOURCES = {
    "fashion_mnist": _load_idx_source,
    "mnist": _load_idx_source,
    "cifar10_tarball": _load_cifar10_tarball_source,
    "synthetic": _load_synthetic_source,
}


# ----------------------------------------------------------------------------------------
# Dataset: deterministic batches from a source.


class Dataset:
  """Batches of one split, each a pure function of `(seed, step)`.

  The train split walks an endless stream made of one random permutation of the examples
  per epoch (`np.random.default_rng([seed, 0, epoch])`); batch `step` holds stream positions
  `[step * B, (step + 1) * B)`, so a batch may straddle two epochs and no example is ever
  dropped. Flips and dequantization noise of batch `step` come from
  `np.random.default_rng([seed, 1, step])`, drawn for the whole global batch. The test split
  is read in its stored order (cycling), never flipped.

  With several hosts, `process_index` / `process_count` select this host's contiguous slice
  of each global batch, so the union over hosts is exactly the single-host batch.

  Attributes:
    num_examples: N, examples in the split.
    image_shape: (H, W, C).
    num_classes: label classes (0 = no labels; then labels are all 0).
    batch_size: the global batch size B.
    local_batch_size: B / process_count, the rows `batch` returns.
    seed, split, start_step: as given.
  """

  def __init__(self, source: Source, *, split: str = "train", batch_size: int,
               seed: int = 0, start_step: int = 0, random_flip: bool = False,
               uniform_dequantization: bool = False, process_index: int = 0,
               process_count: int = 1):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    n = source.num_examples
    if not isinstance(batch_size, (int, np.integer)) or not 0 < batch_size <= n:
      raise ValueError(f"batch_size must be an int in [1, {n}] (the {split} split holds {n} "
                       f"examples); got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
      raise ValueError(f"start_step must be a non-negative int; got {start_step!r}")
    if not 0 <= process_index < process_count or batch_size % process_count:
      raise ValueError(f"need 0 <= process_index < process_count dividing batch_size; got "
                       f"process_index={process_index}, process_count={process_count}, "
                       f"batch_size={batch_size}")
    self.source = source
    self.split = split
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.start_step = int(start_step)
    self.shuffle = split == "train"
    self.random_flip = bool(random_flip) and split == "train"
    self.uniform_dequantization = bool(uniform_dequantization)
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = self.batch_size // process_count
    self._permutations = collections.OrderedDict()  # epoch -> permutation; a small cache

  num_examples = property(lambda self: self.source.num_examples)
  image_shape = property(lambda self: tuple(self.source.image_shape))
  num_classes = property(lambda self: self.source.num_classes)

  def __repr__(self):
    return (f"Dataset(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_shape={self.image_shape}, batch_size={self.batch_size}, "
            f"seed={self.seed})")

  def _permutation(self, epoch: int) -> np.ndarray:
    """The order of `epoch`, `[N]`; the last two are cached (safe under the prefetch thread)."""
    permutation = self._permutations.get(epoch)
    if permutation is None:
      rng = np.random.default_rng([self.seed, _STREAM_ORDER, epoch])
      permutation = self._permutations[epoch] = rng.permutation(self.num_examples)
      while len(self._permutations) > 2:
        try:
          self._permutations.popitem(last=False)
        except KeyError:  # emptied by another thread meanwhile
          break
    return permutation

  def indices(self, step: int) -> np.ndarray:
    """Example indices `[local_batch_size]` of this host's part of batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0; got {step}")
    n = self.num_examples
    start = step * self.batch_size + self.process_index * self.local_batch_size
    positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
    if not self.shuffle:
      return positions % n
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):  # at most two, since B <= N
      sel = epochs == epoch
      out[sel] = self._permutation(int(epoch))[offsets[sel]]
    return out

  def _to_float(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 -> float32 in [0, 1]: x / 255, or (x + U[0, 1)) / 256 when dequantizing."""
    if not self.uniform_dequantization:
      return images.astype(np.float32) / np.float32(255.0)
    noise = rng.random((self.batch_size,) + images.shape[1:], dtype=np.float32)
    noise = noise[self._local_slice()]
    return (images.astype(np.float32) + noise) / np.float32(256.0)

  def _local_slice(self) -> slice:
    start = self.process_index * self.local_batch_size
    return slice(start, start + self.local_batch_size)

  def batch(self, step: int) -> Batch:
    """Batch `step`: a pure function of `(seed, step)`.

    Returns:
      dict(image=float32 [b, H, W, C] in [0, 1] (flipped / dequantized as configured, not
      centered), label=int32 [b]), with b = `local_batch_size` (= `batch_size` on one host).
    """
    images, labels = self.source.get(self.indices(step))
    rng = np.random.default_rng([self.seed, _STREAM_AUGMENT, step])
    if self.random_flip:
      flip = (rng.random(self.batch_size) < 0.5)[self._local_slice()]
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return dict(image=self._to_float(images, rng), label=labels)

  def iterate(self, start_step: int | None = None, *, prefetch: int = 2
              ) -> Iterator[Batch]:
    """Yields `batch(step)` for step = start_step, start_step + 1, ... (endless).

    Args:
      start_step: the first step; None: `self.start_step`.
      prefetch: batches prepared ahead in one background thread (0: none). Batches are the
        same either way.
    """
    step = self.start_step if start_step is None else start_step
    if prefetch <= 0:
      yield from map(self.batch, itertools.count(step))
      return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
      pending = collections.deque(pool.submit(self.batch, step + i) for i in range(prefetch))
      step += prefetch
      while True:
        batch = pending.popleft().result()
        pending.append(pool.submit(self.batch, step))
        step += 1
        yield batch
    finally:
      pool.shutdown(wait=True, cancel_futures=True)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterate()

  @property
  def num_batches_once(self) -> int:
    """Batches `iterate_once` yields: ceil(num_examples / batch_size)."""
    return -(-self.num_examples // self.batch_size)

  def iterate_once(self) -> Iterator[Batch]:
    """One pass over the split in stored order: every example exactly once, no flips.

    The last batch is padded to the full batch size with examples from the start of the
    split (real images, so a masked-out row cannot put NaN or inf into a masked sum) and
    marked by `mask`. Dequantization noise, if configured, comes from
    `np.random.default_rng([seed, 2, i])` for batch i.

    Yields:
      dict(image=float32 [b, H, W, C], label=int32 [b], mask=bool [b]) (True = real
      example), with b = `local_batch_size`.
    """
    n = self.num_examples
    for i in range(self.num_batches_once):
      start = i * self.batch_size + self.process_index * self.local_batch_size
      positions = np.arange(start, start + self.local_batch_size)
      images, labels = self.source.get(positions % n)
      rng = np.random.default_rng([self.seed, _STREAM_ONCE, i])
      yield dict(image=self._to_float(images, rng), label=labels, mask=positions < n)


def get_dataset(spec: DataSpec, split: str = "train", *, batch_size: int,
                start_step: int = 0, process_index: int = 0, process_count: int = 1
                ) -> Dataset:
  """Builds the `Dataset` of one split.

  Args:
    spec: which data and how (`DataSpec`).
    split: "train" (shuffled per epoch, flipped if `spec.random_flip`) or "test" (the eval
      split in stored order, never flipped).
    batch_size: the global batch size.
    start_step: where `iter(dataset)` starts (a resumed run passes its step).
    process_index, process_count: this host and the number of hosts (multi-host runs), as
      `jax.process_index()` / `jax.process_count()`.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: a bad split, batch size, image size or channel count, or an unknown name.
    FileNotFoundError: the data are not where the spec says (the message tells how to get
      them). Nothing is ever downloaded.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  source = LOCAL_SOURCES.get(spec.dataset, _load_tfds_source)(spec, split)
  if spec.num_channels is not None and spec.num_channels != source.image_shape[-1]:
    raise ValueError(f"config.data.num_channels={spec.num_channels} but {spec.dataset!r} "
                     f"images have {source.image_shape[-1]} channels")
  if tuple(source.image_shape[:2]) != (spec.image_size, spec.image_size):
    where = f" in {spec.data_dir}" if spec.data_dir else ""
    raise ValueError(f"config.data.image_size={spec.image_size} but the {spec.dataset!r} "
                     f"{split} images{where} are {source.image_shape[0]}x"
                     f"{source.image_shape[1]}; set config.data.image_size to match the data")
  return Dataset(
      source, split=split, batch_size=batch_size, seed=spec.seed, start_step=start_step,
      random_flip=spec.random_flip, uniform_dequantization=spec.uniform_dequantization,
      process_index=process_index, process_count=process_count)
