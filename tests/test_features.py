"""Feature networks (input checks, shipped weights), reference statistics and the eval hook."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_vp
from score_sde.io import datasets
from score_sde.run import experiment, quality
from score_sde.models import features, fmnist_classifier

FMNIST_AVAILABLE = os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR,
                                               "t10k-images-idx3-ubyte.gz"))


_FMNIST_NET = fmnist_classifier.FashionMNISTClassifier()
# One compiled forward pass for every test's random network (the weights are an argument).
_FMNIST_APPLY = jax.jit(lambda v, x: _FMNIST_NET.apply(v, x)[::-1])


def _random_fmnist_net(seed: int = 0) -> features.FeatureNet:
  """The Fashion-MNIST feature network with random weights (no shipped file needed)."""
  variables = _FMNIST_NET.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))
  return features.FeatureNet(
      "fmnist", f"random-{seed}", fmnist_classifier.FEATURE_DIM, fmnist_classifier.NUM_CLASSES,
      _FMNIST_APPLY, variables, features._prepare_fmnist, batch_size=64)


def _config(tmp_path, **eval_fields):
  config = fashion_mnist_vp.get_config("tiny")
  config.data.dataset = "synthetic"  # 512 train / 128 test random 28x28x1 images
  config.eval.fid_feature_net = "fmnist"
  config.eval.fid_stats = str(tmp_path / "stats.npz")
  for k, v in eval_fields.items():
    config.eval[k] = v
  return config


def test_feature_net_checks_images():
  net = _random_fmnist_net()
  x = np.random.default_rng(0).random((5, 28, 28, 1)).astype(np.float32)
  f, logits = net(x)
  assert f.shape == (5, 128) and logits.shape == (5, 10) and f.dtype == np.float32
  # Zero-padded 32x32 images (config.data.image_size = 32) give the same features.
  f32, _ = net(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))))
  np.testing.assert_allclose(f32, f, rtol=1e-6)
  # Batches, padded to one compiled shape, agree with one big batch.
  np.testing.assert_allclose(net(x, batch_size=2)[0], f, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"expected Fashion-MNIST images \[N, 28, 28, 1\]"):
    net(np.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"images \[N, H, W, C\], got shape \(28, 28\)"):
    net(np.zeros((28, 28)))
  with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\[-1, 1\]"):
    net(x * 2 - 1)
  with pytest.raises(ValueError, match="must be in"):
    net(x * 255)
  x[1, 3, 3, 0] = np.nan
  x[4, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match="2 of 5 samples hold NaN or infinite"):
    net(x)
  with pytest.raises(ValueError, match=r"Unknown feature network 'vgg'.*\['fmnist', "
                                        r"'inception'\]"):
    features.get_feature_net("vgg")


def test_classifier_weights_round_trip_and_checksum(tmp_path):
  net = fmnist_classifier.FashionMNISTClassifier()
  variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  path = tmp_path / "w.npz"
  digest = fmnist_classifier.save_variables(path, variables)
  loaded = fmnist_classifier.load_variables(path, sha256=digest)
  x = jnp.asarray(np.random.default_rng(1).random((3, 28, 28, 1)), jnp.float32)
  np.testing.assert_array_equal(net.apply(loaded, x)[0], net.apply(variables, x)[0])
  with pytest.raises(ValueError, match="differs from the expected"):
    fmnist_classifier.load_variables(path, sha256="0" * 64)
  with pytest.raises(FileNotFoundError, match="not found"):
    fmnist_classifier.load_variables(tmp_path / "missing.npz")


@pytest.mark.skipif(not os.path.exists(fmnist_classifier.WEIGHTS_PATH),
                    reason="shipped classifier weights missing")
def test_shipped_classifier_is_verified_and_accurate():
  assert fmnist_classifier.sha256_of_file(
      fmnist_classifier.WEIGHTS_PATH) == fmnist_classifier.WEIGHTS_SHA256
  net = features.get_feature_net("fmnist")
  assert net.weights_sha256 == fmnist_classifier.WEIGHTS_SHA256
  if not FMNIST_AVAILABLE:
    pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
  images, labels = datasets.load_idx(datasets.FASHION_MNIST_DIR, "test")
  _, logits = net(images[:2000].astype(np.float32) / 255.0)
  assert np.mean(logits.argmax(1) == labels[:2000]) >= 0.9  # 92% on all 10,000 (see docs)


def test_reference_stats_cached_and_checked(tmp_path):
  net = _random_fmnist_net()
  config = _config(tmp_path)
  stats = quality.reference_stats(config, net)  # computed on first use
  assert stats["features"].shape == (512, 128) and stats["meta"]["split"] == "train"
  assert stats["meta"]["dataset"] == "synthetic" and stats["meta"]["image_size"] == "28"
  data = experiment.make_dataset(config, "train", batch_size=512)
  x = next(data.iterate_once())["image"]
  np.testing.assert_allclose(stats["mu"], net(x)[0].astype(np.float64).mean(0), rtol=1e-5,
                             atol=1e-6)
  # The data against their own statistics: FD 0 (up to the sqrtm's rounding), precision and
  # recall 1.
  result = quality.sample_quality(config, x, net=net)
  assert result["fmnist_fd"] == pytest.approx(0.0, abs=1e-6)
  assert result["fmnist_precision"] == 1.0 and result["fmnist_recall"] == 1.0
  assert 1.0 <= result["fmnist_inception_score"] <= 10.0
  # Statistics of another network, dataset or image size are refused.
  with pytest.raises(ValueError, match="weights_sha256="):
    quality.reference_stats(config, _random_fmnist_net(seed=1))
  other = _config(tmp_path)
  other.data.image_size = 32
  with pytest.raises(ValueError, match="image_size='28', not '32'"):
    quality.reference_stats(other, net)


@pytest.mark.slow
def test_eval_mode_writes_sample_quality(tmp_path, monkeypatch):
  from score_sde import main as main_lib
  from score_sde.run import train

  monkeypatch.setitem(features.FEATURE_NETS, "fmnist", lambda **kw: _random_fmnist_net())
  config = _config(tmp_path, enable_fid=True, enable_loss=False, num_samples=40,
                   kid_subset_size=20, kid_subsets=5, pr_num_real=40)
  # One resolution (the middle block only): the claim is the metrics, not the network.
  config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 8, (1,), ()
  config.training.n_iters, config.training.snapshot_freq = 2, 2
  config.training.snapshot_sampling = False
  config.sampling.batch_size, config.sampling.steps = 20, 3
  workdir = str(tmp_path / "run")
  train.train(config, workdir, progress=False)
  result = main_lib.run(config, workdir, "eval")
  saved = json.load(open(os.path.join(workdir, "eval", "step_2", "metrics.json")))
  for key in ("fmnist_fd", "fmnist_kid", "fmnist_inception_score", "fmnist_precision",
              "fmnist_recall"):
    assert np.isfinite(saved[key]) and saved[key] == pytest.approx(result[key])
  assert saved["fmnist_fd"] > 0 and len(saved["fmnist_class_histogram"]) == 10
  assert sum(saved["fmnist_class_histogram"]) == pytest.approx(1.0)
  assert os.listdir(os.path.join(workdir, "tensorboard"))
