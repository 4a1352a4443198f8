"""Tests of score_sde.io.datasets: file readers, missing-data errors, deterministic batches."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import pickle
import pickletools
import struct
import sys
import tarfile
import time

import dataclasses

import ml_collections
import numpy as np
import pytest

from score_sde.io import datasets

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


BATCH = 4  # the batch size of the tests that do not choose one


def make_spec(dataset="synthetic", **fields) -> datasets.DataSpec:
  """A `DataSpec` of `dataset`: 8x8x3 images, no flips or dequantization, seed 0, no data
  folders, unless `fields` say otherwise."""
  return datasets.DataSpec(**{**dict(dataset=dataset, image_size=8, num_channels=3),
                              **fields})


# ---- scalers ----------------------------------------------------------------------------


def test_scalers_map_unit_interval_and_invert():
  x = np.array([0.0, 0.25, 1.0], np.float32)
  np.testing.assert_allclose(datasets.get_data_scaler(True)(x), [-1.0, -0.5, 1.0])
  np.testing.assert_allclose(datasets.get_data_scaler(False)(x), x)
  for centered in (True, False):
    y = datasets.get_data_inverse_scaler(centered)(datasets.get_data_scaler(centered)(x))
    np.testing.assert_allclose(y, x, atol=1e-7)


# ---- idx files ----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
  """The idx format: 0, 0, type 0x08 (ubyte), ndim, big-endian int32 sizes, data."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}i", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_idx_dir(path, n_train=6, n_test=3, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    arrays[split] = (images, labels)
    for base, array in zip(datasets.IDX_FILES[split], (images, labels)):
      if gz:
        with gzip.open(os.path.join(path, base + ".gz"), "wb") as f:
          f.write(idx_bytes(array))
      else:
        with open(os.path.join(path, base), "wb") as f:
          f.write(idx_bytes(array))
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  arrays = write_idx_dir(tmp_path, gz=gz)
  for split in ("train", "test"):
    images, labels = datasets.load_idx(str(tmp_path), split)
    assert images.shape == arrays[split][0].shape + (1,) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays[split][0])
    np.testing.assert_array_equal(labels, arrays[split][1])
    assert labels.dtype == np.int32


def test_idx_dataset_pads_to_32_or_keeps_28(tmp_path):
  arrays = write_idx_dir(tmp_path)
  spec = make_spec("fashion_mnist", data_dir=str(tmp_path), image_size=32,
                       num_channels=1)
  ds = datasets.get_dataset(spec, "test", batch_size=3)
  assert ds.image_shape == (32, 32, 1) and ds.num_examples == 3 and ds.num_classes == 10
  batch = ds.batch(0)  # test split: stored order, no flips
  image = batch["image"][..., 0]
  np.testing.assert_array_equal(image[:, 2:30, 2:30] * 255, arrays["test"][0])
  image[:, 2:30, 2:30] = 0
  assert not image.any()  # the 2-pixel border is zeros
  np.testing.assert_array_equal(batch["label"], arrays["test"][1])

  spec = dataclasses.replace(spec, image_size=28)
  assert datasets.get_dataset(spec, "test", batch_size=3).image_shape == (28, 28, 1)
  spec = dataclasses.replace(spec, image_size=30)
  with pytest.raises(ValueError, match="image_size"):
    datasets.get_dataset(spec, "test", batch_size=3)


def test_idx_corrupt_files_raise(tmp_path):
  labels = np.arange(5, dtype=np.uint8)
  good = idx_bytes(labels)
  cases = {
      "magic": b"\x12\x34" + good[2:],  # not starting with two zero bytes
      "type": good[:2] + b"\x0d" + good[3:],  # float type code
      "ndim": good[:3] + b"\x03" + good[4:],  # 3 dimensions declared for labels
      "size": good[:-1],  # one byte of data missing
  }
  path = tmp_path / "f"
  path.write_bytes(good)
  np.testing.assert_array_equal(datasets.read_idx(path, ndim=1), labels)
  for name, raw in cases.items():
    path.write_bytes(raw)
    with pytest.raises(ValueError):
      datasets.read_idx(path, ndim=1)
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError):
      datasets.read_idx(path, ndim=1)


def test_idx_images_and_labels_of_different_counts_raise(tmp_path):
  write_idx_dir(tmp_path, gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
  with pytest.raises(ValueError, match="labels"):
    datasets.load_idx(str(tmp_path), "test")


# ---- CIFAR-10 tarball ---------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes pickles as the real CIFAR-10 files are (Python 2 cPickle, protocol 2).

  Byte strings become Python 2 `str` opcodes (SHORT_BINSTRING / BINSTRING) rather than
  Python 3's `_codecs.encode` calls, and numpy's array reconstructor is named
  `numpy.core.multiarray._reconstruct`, its name when the files were written.
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_py2_str

  def save_global(self, obj, name=None):
    if obj is np.empty(0).__reduce__()[0]:
      self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
      self.memoize(obj)
    else:
      super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  Py2StylePickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def cifar_batch(rng, n, name):
  return {
      b"batch_label": name.encode(),
      b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
      b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
      b"filenames": [f"img_{i}.png".encode() for i in range(n)],
  }


def write_cifar_tarball(path, n=3, replace=None, seed=0):
  """A small cifar-10-python.tar.gz in the real layout; `replace`: {member: raw bytes}."""
  rng = np.random.default_rng(seed)
  members, batches = {}, {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batches[name] = cifar_batch(rng, n, name)
    members[name] = py2_pickle(batches[name])
  members["batches.meta"] = py2_pickle({
      b"num_cases_per_batch": n, b"num_vis": 3072,
      b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                       b"frog", b"horse", b"ship", b"truck"]})
  members.update(replace or {})
  tar_path = os.path.join(path, datasets.CIFAR10_TARBALL)
  with tarfile.open(tar_path, "w:gz") as tar:
    for name, raw in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return batches


def test_fixture_pickles_look_like_the_real_files():
  raw = py2_pickle(cifar_batch(np.random.default_rng(0), 2, "b"))
  globals_named = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
  assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                           "numpy dtype"}
  assert raw[:2] == b"\x80\x02"  # protocol 2


def test_cifar_tarball_reads_chw_rows_as_hwc(tmp_path):
  batches = write_cifar_tarball(tmp_path)
  images, labels = datasets.load_cifar10_tarball(str(tmp_path), "train")
  assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
  data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
  # Row layout: 1024 red values (32 rows of 32), then 1024 green, then 1024 blue.
  for k, (row, col, channel) in enumerate([(0, 0, 0), (0, 1, 0), (1, 0, 0), (5, 7, 1),
                                           (31, 31, 2)]):
    np.testing.assert_array_equal(images[:, row, col, channel],
                                  data[:, channel * 1024 + row * 32 + col], err_msg=str(k))
  np.testing.assert_array_equal(
      labels, np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)]))

  spec = make_spec("cifar10_tarball", data_dir=str(tmp_path), image_size=32)
  ds = datasets.get_dataset(spec, "test", batch_size=3)
  assert (ds.num_examples, ds.image_shape, ds.num_classes) == (3, (32, 32, 3), 10)
  np.testing.assert_array_equal(ds.batch(0)["image"][0, 0, 1, 0] * 255,
                                batches["test_batch"][b"data"][0, 1])


class SystemCall:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class MakeDir:

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def test_cifar_tampered_pickle_raises_and_runs_nothing(tmp_path):
  marker = tmp_path / "marker"
  # The payload is live: an unrestricted unpickler runs it.
  control = tmp_path / "control"
  pickle.loads(pickle.dumps({b"labels": MakeDir(str(control))}))
  assert control.is_dir()

  rng = np.random.default_rng(1)
  tampered = cifar_batch(rng, 3, "data_batch_3")
  tampered[b"labels"] = SystemCall(f"touch {marker}")
  nested = cifar_batch(rng, 3, "test_batch")
  nested[b"filenames"] = [MakeDir(str(marker))]
  first = {b"x": MakeDir(str(marker)), **cifar_batch(rng, 3, "test_batch")}
  for member, raw in (("data_batch_3", py2_pickle(tampered)),
                      ("test_batch", py2_pickle(nested)),
                      ("test_batch", pickle.dumps(first, protocol=pickle.HIGHEST_PROTOCOL))):
    write_cifar_tarball(tmp_path, replace={member: raw})
    split = "train" if member.startswith("data") else "test"
    with pytest.raises(pickle.UnpicklingError, match="posix.(system|mkdir)"):
      datasets.load_cifar10_tarball(str(tmp_path), split)
    assert not marker.exists()


def test_cifar_wrong_structure_raises(tmp_path):
  bad = {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}
  write_cifar_tarball(tmp_path, replace={"test_batch": py2_pickle(bad)})
  with pytest.raises(ValueError, match="3072"):
    datasets.load_cifar10_tarball(str(tmp_path), "test")


# ---- missing data: fail at once, say where and how ---------------------------------------


def test_missing_tfds_dataset_fails_fast_with_path_and_fix(tmp_path):
  spec = make_spec("cifar10", tfds_data_dir=str(tmp_path), image_size=32)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    datasets.get_dataset(spec, "train", batch_size=BATCH)
  assert time.monotonic() - start < 10.0
  message = str(info.value)
  assert str(tmp_path) in message
  assert "download_and_prepare" in message and "array_record" in message
  assert "cifar10_tarball" in message
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or written
  assert "tensorflow" not in sys.modules


def test_unknown_dataset_name_raises_value_error(tmp_path):
  spec = make_spec("no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no_such_dataset_xyz.*fashion_mnist"):
    datasets.get_dataset(spec, "train", batch_size=BATCH)


def test_missing_idx_dir_names_dir_files_and_package(tmp_path):
  missing = tmp_path / "nowhere"
  spec = make_spec("fashion_mnist", data_dir=str(missing), image_size=28,
                       num_channels=1)
  with pytest.raises(FileNotFoundError) as info:
    datasets.get_dataset(spec, "train", batch_size=BATCH)
  message = str(info.value)
  assert str(missing) in message and "train-images-idx3-ubyte" in message
  assert "sudo apt-get install dataset-fashion-mnist" in message


def test_missing_cifar_tarball_names_path_and_url(tmp_path):
  spec = make_spec("cifar10_tarball", data_dir=str(tmp_path), image_size=32)
  with pytest.raises(FileNotFoundError) as info:
    datasets.get_dataset(spec, "train", batch_size=BATCH)
  assert str(tmp_path) in str(info.value) and datasets.CIFAR10_URL in str(info.value)


# ---- TFDS reading path (through tfds's own mock, still without TensorFlow) ----------------


def test_tfds_crops_and_resizes_like_the_reference():
  # celeb_a: central 140x140 crop of 218x178, then resize; lsun: central square crop.
  celeb = np.zeros((218, 178, 3), np.uint8)
  celeb[39:179, 19:159] = 200
  lsun = np.zeros((40, 60, 3), np.uint8)
  lsun[:, 10:50] = 77
  for image, crop, value in ((celeb, 140, 200), (lsun, "square", 77)):
    source = datasets.TFDSSource(data_source=FakeTFDS([dict(image=image)]), image_size=16,
                                 channels=3, num_classes=0, crop=crop)
    images, labels = source.get(np.array([0, 0]))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.all(images == value) and np.all(labels == 0)


class FakeTFDS(list):

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def test_tfds_open_with_mocked_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from unittest import mock  # pylint: disable=g-import-not-at-top
  spec = make_spec("celeb_a", tfds_data_dir=str(tmp_path), image_size=16)
  with tfds.testing.mock_data(num_examples=5), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    ds = datasets.get_dataset(spec, "test", batch_size=2)
    # tfds's mock lacks a working __getitems__; give it one with the real semantics.
    inner = ds.source.data_source.data_source
    inner.__getitems__ = lambda keys: [inner[k] for k in keys]
    batch = ds.batch(0)
  assert (ds.num_examples, ds.image_shape, ds.num_classes) == (5, (16, 16, 3), 0)
  assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].tolist() == [0, 0]
  assert "tensorflow" not in sys.modules


# ---- deterministic batches, resume, flips -------------------------------------------------


def array_dataset(n=10, batch_size=4, seed=0, split="train", **kwargs):
  rng = np.random.default_rng(123)
  images = rng.integers(0, 256, size=(n, 4, 5, 2), dtype=np.uint8)
  source = datasets.ArraySource(images, np.arange(n, dtype=np.int32), num_classes=n)
  return datasets.Dataset(source, split=split, batch_size=batch_size, seed=seed, **kwargs)


def test_batches_are_a_pure_function_of_seed_and_step():
  spec = make_spec(random_flip=True, uniform_dequantization=True)
  a, b = (datasets.get_dataset(spec, batch_size=BATCH) for _ in range(2))
  for step in (7, 0, 200, 7):  # any order
    for key in ("image", "label"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  other = datasets.get_dataset(dataclasses.replace(spec, seed=1), batch_size=BATCH)
  assert not np.array_equal(a.batch(0)["image"], other.batch(0)["image"])
  assert not np.array_equal(a.batch(0)["image"], a.batch(1)["image"])


def test_config_reads_into_the_spec_and_the_batch_sizes():
  # The config edge (run.experiment): config.data and config.seed -> DataSpec; the batch size
  # defaults to training.batch_size for train and eval.batch_size for test.
  from score_sde.run import experiment  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      seed=3, training=dict(batch_size=4), eval=dict(batch_size=2),
      data=dict(dataset="synthetic", image_size=8, num_channels=3, random_flip=True,
                uniform_dequantization=True, centered=False, tfds_data_dir="", data_dir="")))
  spec = experiment.data_spec(config)
  assert spec == datasets.DataSpec(dataset="synthetic", image_size=8, num_channels=3,
                                   data_dir=None, tfds_data_dir="", random_flip=True,
                                   uniform_dequantization=True, seed=3)
  train, test = experiment.make_dataset(config, "train"), experiment.make_dataset(config, "test")
  assert (train.batch_size, test.batch_size) == (4, 2)
  np.testing.assert_array_equal(
      train.batch(5)["image"], datasets.get_dataset(spec, batch_size=4).batch(5)["image"])


def test_resumed_iteration_sees_the_same_batches():
  ds = array_dataset(random_flip=True, uniform_dequantization=True)
  full = list(itertools.islice(ds.iterate(0, prefetch=0), 6))
  resumed = array_dataset(random_flip=True, uniform_dequantization=True, start_step=3)
  for prefetch in (0, 2):
    tail = list(itertools.islice(resumed.iterate(prefetch=prefetch), 3))
    for x, y in zip(full[3:], tail):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  np.testing.assert_array_equal(next(iter(resumed))["label"], ds.batch(3)["label"])


def test_every_epoch_is_a_permutation_and_batches_straddle_epochs():
  ds = array_dataset(n=10, batch_size=4)
  stream = np.concatenate([ds.batch(step)["label"] for step in range(5)])  # 2 epochs
  assert sorted(stream[:10]) == list(range(10))
  assert sorted(stream[10:]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:])  # reshuffled per epoch
  assert not np.array_equal(stream[:10], np.arange(10))


def test_flips_only_on_train_and_only_when_asked():
  source_images = array_dataset().source.images.astype(np.float32) / 255
  flipped_any = unflipped_any = False
  ds = array_dataset(n=10, batch_size=10, random_flip=True)
  for step in range(3):
    batch = ds.batch(step)
    for image, label in zip(batch["image"], batch["label"]):
      same = np.array_equal(image, source_images[label])
      mirrored = np.array_equal(image, source_images[label][:, ::-1])
      assert same or mirrored
      flipped_any |= mirrored and not same
      unflipped_any |= same
  assert flipped_any and unflipped_any
  for kwargs in (dict(split="test", random_flip=True), dict(random_flip=False)):
    ds = array_dataset(n=10, batch_size=10, **kwargs)
    for step in range(3):
      batch = ds.batch(step)
      np.testing.assert_array_equal(batch["image"], source_images[batch["label"]])
  np.testing.assert_array_equal(array_dataset(split="test").batch(2)["label"],
                                [8, 9, 0, 1])  # test split: stored order, cycling


def test_uniform_dequantization_stays_in_its_bin():
  ds = array_dataset(uniform_dequantization=True)
  batch = ds.batch(0)
  x = batch["image"]
  u8 = ds.source.images[batch["label"]].astype(np.float32)
  assert x.dtype == np.float32 and x.min() >= 0 and x.max() < 1
  np.testing.assert_array_equal(np.floor(x * 256), u8)
  assert np.std(x * 256 - u8) > 0.2  # noise is there (std of U[0,1) is 0.29)


def test_iterate_once_covers_the_split_exactly_once_with_mask():
  ds = array_dataset(n=10, batch_size=4, split="test")
  batches = list(ds.iterate_once())
  assert len(batches) == ds.num_batches_once == 3
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(labels[mask], np.arange(10))
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  assert all(b["image"].shape == (4, 4, 5, 2) for b in batches)


def test_hosts_split_each_global_batch():
  whole = array_dataset(n=10, batch_size=4, random_flip=True, uniform_dequantization=True)
  parts = [array_dataset(n=10, batch_size=4, random_flip=True, uniform_dequantization=True,
                         process_index=i, process_count=2) for i in range(2)]
  for step in range(4):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([p.batch(step)[key] for p in parts]), whole.batch(step)[key])


@pytest.mark.parametrize("batch_size", [0, -1, 11, 2.0])
def test_bad_batch_size_raises(batch_size):
  with pytest.raises(ValueError, match="batch_size"):
    array_dataset(n=10, batch_size=batch_size)


def test_bad_split_channel_count_and_host_count_raise(tmp_path):
  with pytest.raises(ValueError, match="split"):
    datasets.get_dataset(make_spec(), "validation", batch_size=BATCH)
  write_idx_dir(tmp_path)
  spec = make_spec("fashion_mnist", data_dir=str(tmp_path), image_size=28,
                       num_channels=3)
  with pytest.raises(ValueError, match="num_channels=3"):
    datasets.get_dataset(spec, "test", batch_size=2)
  with pytest.raises(ValueError, match="process_count"):
    array_dataset(batch_size=3, process_count=2)


# ---- the real Fashion-MNIST, when installed ----------------------------------------------


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
  spec = make_spec("fashion_mnist", image_size=28, num_channels=1)
  train = datasets.get_dataset(spec, "train", batch_size=64)
  test = datasets.get_dataset(spec, "test", batch_size=64)
  assert (train.num_examples, test.num_examples) == (60000, 10000)
  assert train.image_shape == test.image_shape == (28, 28, 1)
  assert train.num_classes == 10
  # Fashion-MNIST is balanced: 6000 / 1000 images per class.
  assert np.bincount(train.source.labels).tolist() == [6000] * 10
  assert np.bincount(test.source.labels).tolist() == [1000] * 10
  batch = train.batch(0)
  assert batch["image"].shape == (64, 28, 28, 1) and 0 <= batch["image"].min()
  assert batch["image"].max() <= 1
