"""score_sde.metrics against closed forms and brute force (float64 numpy, no JAX)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from score_sde import metrics


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---- Frechet distance -----------------------------------------------------------------


def test_frechet_distance_commuting_covariances_closed_form():
  # Shared eigenvectors: sqrt(S1 S2) = Q diag(sqrt(a b)) Q^T, so
  # FD = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(a b)) = |mu1 - mu2|^2 + sum((sqrt a - sqrt b)^2).
  rng = np.random.default_rng(0)
  d = 12
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_symmetric_sqrtm_formula():
  # An independent form of the trace term: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2).
  rng = np.random.default_rng(1)
  d = 20
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  r1 = scipy.linalg.sqrtm(s1).real
  direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_of_gaussian_samples_approaches_truth():
  rng = np.random.default_rng(2)
  d, n = 4, 200_000
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  mu2 = np.full(d, 0.5)
  x = rng.multivariate_normal(np.zeros(d), s1, size=n)
  y = rng.multivariate_normal(mu2, s2, size=n)
  truth = metrics.frechet_distance(np.zeros(d), s1, mu2, s2)
  estimate = metrics.frechet_distance(*metrics.feature_statistics(x),
                                      *metrics.feature_statistics(y))
  assert estimate == pytest.approx(truth, rel=0.03)


def test_frechet_distance_retries_a_singular_product_with_eps_offset(monkeypatch):
  # pytorch-fid's rule: a non-finite sqrtm(S1 S2) is retried as sqrtm((S1 + eps I)(S2 + eps I)).
  rng = np.random.default_rng(14)
  d, eps = 5, 1e-3
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def flaky_sqrtm(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)  # the module metrics imports
  fd = metrics.frechet_distance(np.zeros(d), s1, np.zeros(d), s2, eps=eps)
  assert len(calls) == 2
  # Traces of the unshifted covariances, the root of the shifted product.
  expected = np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps)))
  assert fd == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_bad_inputs():
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
  with pytest.raises(ValueError, match="shapes"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="mu2 holds 1 NaN"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.array([0, np.nan, 0]), np.eye(3))


def test_fewer_samples_than_dimensions_warns_and_still_computes():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
  with pytest.warns(metrics.RankDeficientCovarianceWarning, match="rank at most 9 < 32"):
    stats_x = metrics.feature_statistics(x)
  with pytest.warns(metrics.RankDeficientCovarianceWarning):
    stats_y = metrics.feature_statistics(y)
  fd = metrics.frechet_distance(*stats_x, *stats_y)
  assert np.isfinite(fd) and fd > 32 * 0.5  # the mean shift alone gives ~32


def test_feature_statistics_matches_numpy():
  x = np.random.default_rng(4).normal(size=(50, 6))
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)


def test_non_finite_features_are_an_error_naming_how_many():
  x = np.random.default_rng(5).normal(size=(20, 3))
  x[3, 0], x[7, 2], x[7, 1] = np.nan, np.inf, -np.inf
  with pytest.raises(ValueError, match="2 of 20 samples hold NaN or infinite"):
    metrics.feature_statistics(x)
  with pytest.raises(ValueError, match="2 of 20 samples"):
    metrics.kernel_inception_distance(x, np.zeros((20, 3)))
  with pytest.raises(ValueError, match="2 of 20 samples"):
    metrics.precision_recall(np.zeros((20, 3)), x)
  with pytest.raises(ValueError, match="1 of 4 samples"):
    metrics.check_finite(np.array([[[0.0]], [[np.nan]], [[1.0]], [[0.5]]]), "images")


# ---- KID ------------------------------------------------------------------------------


def _brute_force_mmd2(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_kid_equals_brute_force_unbiased_mmd_on_a_small_case():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(15, 5)), rng.normal(size=(15, 5)) * 1.5 + 0.3
  # One subset as large as the sets: a permutation of each, and MMD^2 is permutation invariant.
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
  assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10)
  assert std == 0.0


def test_kid_subset_size_is_capped_and_seeded():
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
  a = metrics.kernel_inception_distance(x, y, num_subsets=5, subset_size=1000, seed=1)
  b = metrics.kernel_inception_distance(x, y, num_subsets=5, subset_size=30, seed=1)
  assert a == b  # min(1000, 40, 30) = 30
  c = metrics.kernel_inception_distance(x, y, num_subsets=5, subset_size=30, seed=2)
  assert c != a


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(8)
  x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=500)
  shifted = metrics.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=500)
  assert abs(mean) < 3 * std + 1e-3
  assert shifted[0] > 10 * abs(mean) and shifted[0] > 10 * shifted[1]


# ---- Inception Score ------------------------------------------------------------------


def test_inception_score_closed_forms():
  n, c = 1000, 10
  # Every sample with the same class distribution: p(y|x) = p(y), KL = 0, IS = 1.
  mean, std = metrics.inception_score(np.random.default_rng(9).normal(size=(1, c)).repeat(n, 0))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  # Confident, evenly spread: KL = log C, IS = C.
  one_hot = 1e3 * np.eye(c)[np.arange(n) % c]
  mean, std = metrics.inception_score(one_hot, splits=10)
  assert mean == pytest.approx(c, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Confident on only 4 classes: IS = 4.
  assert metrics.inception_score(1e3 * np.eye(c)[np.arange(n) % 4])[0] == pytest.approx(4.0)


def test_inception_score_matches_scipy_entropy_form():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(300, 7)) * 2
  p = scipy.special.softmax(logits, axis=1)
  per_split = [np.exp(np.mean([scipy.stats.entropy(q, part.mean(0)) for q in part]))
               for part in np.split(p, 3)]
  mean, std = metrics.inception_score(logits, splits=3)
  assert mean == pytest.approx(np.mean(per_split), rel=1e-10)
  assert std == pytest.approx(np.std(per_split), rel=1e-8)
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(logits[:5], splits=10)


# ---- Precision / recall ---------------------------------------------------------------


def _brute_force_pr(real, fake, k):
  def radii(a):
    return np.array([np.sort([np.sum((p - q) ** 2) for q in a])[k] for p in a])

  def inside(points, centres, r):
    return np.mean([any(np.sum((p - c) ** 2) <= rc for c, rc in zip(centres, r))
                    for p in points])

  return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force(monkeypatch):
  rng = np.random.default_rng(11)
  real, fake = rng.normal(size=(60, 4)), rng.normal(size=(50, 4)) * 1.3 + 0.4
  expected = _brute_force_pr(real, fake, 3)
  assert metrics.precision_recall(real, fake, k=3) == pytest.approx(expected)
  monkeypatch.setattr(metrics, "_MAX_BLOCK_ENTRIES", 7)  # force many small row blocks
  assert metrics.precision_recall(real, fake, k=3) == pytest.approx(expected)
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_precision_recall_on_constructed_point_sets():
  grid = np.array(list(itertools.product(range(6), range(6))), dtype=float)  # unit grid
  # k = 3 radius of an interior grid point is 1 (four neighbours at distance 1).
  assert metrics.knn_radii(grid, 3)[14] == pytest.approx(1.0)
  # Samples on the data: precision 1; covering only the left half: recall about half.
  left = grid[grid[:, 0] < 3]
  p, r = metrics.precision_recall(grid, left, k=3)
  assert p == 1.0 and 0.5 <= r < 0.75
  # Samples far away: neither precise nor covering.
  assert metrics.precision_recall(grid, grid + 100.0, k=3) == (0.0, 0.0)
  # Mode collapse onto one point's neighbourhood: precise but no recall beyond it.
  collapsed = grid[14] + 0.01 * np.random.default_rng(12).normal(size=(20, 2))
  p, r = metrics.precision_recall(grid, collapsed, k=3)
  assert p == 1.0 and r == pytest.approx(1 / 36)


# ---- Reference statistics files -------------------------------------------------------


def test_reference_stats_round_trip_and_provenance_checks(tmp_path):
  x = np.random.default_rng(13).normal(size=(40, 5))
  path = tmp_path / "stats.npz"
  metrics.save_reference_stats(path, x, feature_net="fmnist", weights_sha256="abc",
                               dataset="fashion_mnist", split="train", extra=dict(image_size=28))
  s = metrics.load_reference_stats(path, feature_net="fmnist", weights_sha256="abc",
                                   dataset="fashion_mnist", split="train")
  np.testing.assert_allclose(s["mu"], x.mean(0), rtol=1e-12)
  assert s["features"].shape == (40, 5) and s["meta"]["num_examples"] == "40"
  with pytest.raises(ValueError, match="feature_net='fmnist', not 'inception'"):
    metrics.load_reference_stats(path, feature_net="inception")
  with pytest.raises(ValueError, match="weights_sha256"):
    metrics.load_reference_stats(path, feature_net="fmnist", weights_sha256="def")
  with pytest.raises(ValueError, match="dataset='fashion_mnist', not 'cifar10'"):
    metrics.load_reference_stats(path, dataset="cifar10")
  with pytest.raises(ValueError, match="image_size='28', not '32'"):
    metrics.load_reference_stats(path, extra=dict(image_size=32))
  with pytest.raises(FileNotFoundError, match="reference_stats.py"):
    metrics.load_reference_stats(tmp_path / "missing.npz")
