"""Sample-quality metrics on feature arrays: FID, KID, Inception Score, precision / recall.

Everything here is numpy in float64 on the host: the feature networks (Inception-v3 in
`score_sde.models.inception`, the Fashion-MNIST classifier in
`score_sde.models.fmnist_classifier`) turn images into features on device, and these
functions turn features into numbers.

    mu, sigma = feature_statistics(features)                     # [N, d] -> [d], [d, d]
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float          # FID on Inception pool features
    kernel_inception_distance(f1, f2) -> (mean, std)             # KID (unbiased MMD^2, cubic kernel)
    inception_score(logits, splits=10) -> (mean, std)            # IS from classifier logits
    precision_recall(real, fake, k=3) -> (precision, recall)     # Kynkaanniemi et al. 2019

`frechet_distance` gives the same numbers as the implementation used for published FIDs
(pytorch-fid's `calculate_frechet_distance`): the same matrix square root (scipy's `sqrtm`
of sigma1 @ sigma2), the same `eps * I` retry when that root is not finite, and the same test
on its imaginary part. Reference statistics of a dataset (mu, sigma and the features) are
cached in an .npz that records the feature network and the dataset: `save_reference_stats` /
`load_reference_stats`.
"""

from __future__ import annotations

import logging
import os
import warnings

import jax
import numpy as np

# Pairwise-distance blocks are at most this many float64 entries (256 MiB).
_MAX_BLOCK_ENTRIES = 1 << 25


class RankDeficientCovarianceWarning(UserWarning):
  """Fewer samples than feature dimensions: the sample covariance is singular."""


def check_finite(x: np.ndarray, name: str = "samples") -> None:
  """Raises if `x` holds NaN or infinite values, naming how many samples do.

  Args:
    x: [N, ...] array (images or features).
    name: what `x` is, for the message.

  Raises:
    ValueError: some entries are not finite.
  """
  x = np.asarray(x)
  bad = ~np.isfinite(x.reshape(len(x), -1)) if x.ndim else ~np.isfinite(x[None])
  if bad.any():
    rows = int(bad.any(axis=-1).sum()) if x.ndim else 1
    raise ValueError(f"{name}: {rows} of {len(x) if x.ndim else 1} samples hold NaN or "
                     f"infinite values ({int(bad.sum())} entries); a diverged sampler or "
                     f"network? Metrics need finite inputs")


def _features(x, name: str) -> np.ndarray:
  """`x` as a float64 [N, d] array, checked finite."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a [num_samples, num_features] array, got shape "
                     f"{x.shape}")
  if len(x) == 0:
    raise ValueError(f"{name}: no samples")
  check_finite(x, name)
  return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (ddof = 1, as np.cov) of features, in float64.

  Args:
    features: [N, d] features.

  Returns:
    `(mu [d], sigma [d, d])`.

  Raises:
    ValueError: not 2-D, fewer than 2 samples, or non-finite values (naming how many).

  Warns:
    RankDeficientCovarianceWarning: N <= d, so sigma has rank at most N - 1 < d (the FID is
      still computed, as the standard implementation does, but is biased and noisy).
  """
  f = _features(features, "features")
  n, d = f.shape
  if n < 2:
    raise ValueError(f"features: need at least 2 samples for a covariance, got {n}")
  if n <= d:
    warnings.warn(f"{n} samples of {d}-dimensional features: the covariance has rank at most "
                  f"{n - 1} < {d} (rank-deficient); the Frechet distance is still computed "
                  f"but is strongly biased; use more than {d} samples",
                  RankDeficientCovarianceWarning, stacklevel=2)
  mu = f.mean(axis=0)
  centred = f - mu
  sigma = centred.T @ centred / (n - 1)
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed as
  pytorch-fid does: if the square root of the product is not finite (a singular product),
  `eps` is added to both diagonals and the root taken again; a complex root whose diagonal
  has an imaginary part within 1e-3 of zero keeps its real part.

  Args:
    mu1, mu2: [d] means.
    sigma1, sigma2: [d, d] covariances.
    eps: the diagonal offset of the retry.

  Returns:
    The squared Frechet distance (what papers call FID when the features are Inception-v3
    pool features), a Python float.

  Raises:
    ValueError: shapes disagree, inputs are not finite, or the root of the product has an
      imaginary part on its diagonal larger than 1e-3 (numerically unusable covariances).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"frechet_distance: means of shapes {mu1.shape} and {mu2.shape}; expected "
                     f"two [d] vectors")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"frechet_distance: covariances of shapes {sigma1.shape} and "
                     f"{sigma2.shape}; expected ({d}, {d}) for means of length {d}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(a).all():
      raise ValueError(f"frechet_distance: {name} holds {int((~np.isfinite(a)).sum())} NaN or "
                       f"infinite entries")
  import scipy.linalg  # here: 0.1 s that a command computing no distance does not pay

  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("frechet_distance: the product of the covariances is singular; adding "
                    "%g to their diagonals", eps)
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: the square root of sigma1 @ sigma2 has an imaginary "
                       f"part of up to {np.max(np.abs(covmean.imag)):.3g} on its diagonal "
                       f"(> 1e-3): the covariances are numerically unusable (too few samples, "
                       f"or features of very different scales?)")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The KID kernel k(x, y) = (x . y / d + 1)^3 between rows of x [n, d] and y [m, d]."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased estimate of MMD^2 with `polynomial_kernel` between samples x [m, d], y [n, d].

  Mean of k(x_i, x_j) over i != j, plus that of k(y_i, y_j), minus twice the mean of
  k(x_i, y_j) over all pairs.
  """
  m, n = len(x), len(y)
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2.0 * k_xy.mean())


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0
                              ) -> tuple[float, float]:
  """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic
  polynomial kernel, averaged over random subsets.

  Each of `num_subsets` rounds draws `m = min(subset_size, N1, N2)` rows of each feature set
  without replacement (as clean-fid does; torch-fidelity requires m <= N instead) and
  computes `mmd2_unbiased` on them. Draws come from `np.random.default_rng(seed)`: the same
  seed gives the same subsets.

  Args:
    features1, features2: [N1, d] and [N2, d] features.
    num_subsets: number of random subsets.
    subset_size: rows per subset (capped at the smaller N).
    seed: seed of the subset draws.

  Returns:
    `(mean, std)` over the subsets (std with ddof = 0, as torch-fidelity reports it). Can be
    slightly negative for equal distributions: the estimate is unbiased.

  Raises:
    ValueError: shapes disagree, fewer than 2 samples, non-finite values.
  """
  f1, f2 = _features(features1, "features1"), _features(features2, "features2")
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f"kernel_inception_distance: features of dimensions {f1.shape[1]} and "
                     f"{f2.shape[1]}")
  m = min(int(subset_size), len(f1), len(f2))
  if m < 2:
    raise ValueError(f"kernel_inception_distance: subsets need at least 2 samples; got "
                     f"subset_size={subset_size}, N1={len(f1)}, N2={len(f2)}")
  if num_subsets < 1:
    raise ValueError(f"kernel_inception_distance: num_subsets must be >= 1, got {num_subsets}")
  rng = np.random.default_rng(seed)
  values = np.array([
      mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)],
                    f2[rng.choice(len(f2), m, replace=False)])
      for _ in range(int(num_subsets))])
  return float(values.mean()), float(values.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016) from classifier logits.

  IS = exp(E_x KL(p(y | x) || p(y))) on each of `splits` consecutive chunks of N // splits
  samples (the remainder is left out, as in the original code), p(y) being the chunk's mean
  of p(y | x) = softmax(logits).

  Args:
    logits: [N, num_classes] unnormalized log-probabilities.
    splits: number of chunks.

  Returns:
    `(mean, std)` of the per-chunk scores (std with ddof = 0). Between 1 (every sample has
    the same class distribution) and num_classes (confident and evenly spread).

  Raises:
    ValueError: not 2-D, non-finite, or fewer samples than splits.
  """
  z = _features(logits, "logits")
  n = len(z)
  if splits < 1 or n < splits:
    raise ValueError(f"inception_score: need 1 <= splits <= N; got splits={splits}, N={n}")
  log_p = z - z.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  size = n // splits
  scores = []
  for i in range(splits):
    lp = log_p[i * size:(i + 1) * size]
    p = np.exp(lp)
    with np.errstate(divide="ignore", invalid="ignore"):
      log_marginal = np.log(p.mean(axis=0))
      # 0 * log 0 = 0: classes with p(y|x) = 0 exactly contribute nothing.
      kl = np.sum(np.where(p > 0, p * (lp - log_marginal), 0.0), axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.array(scores)
  return float(scores.mean()), float(scores.std())


def _block_rows(n_cols: int) -> int:
  return max(1, _MAX_BLOCK_ENTRIES // max(1, n_cols))


def _squared_distances(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray
                       ) -> np.ndarray:
  return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def knn_radii(features, k: int = 3) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row (itself excluded).

  Args:
    features: [N, d] with N > k.
    k: the neighbour rank.

  Returns:
    [N] float64 squared radii. Pairwise distances are computed in row blocks of at most
    2^25 entries, so memory stays bounded for any N.
  """
  f = _features(features, "features")
  n = len(f)
  if not 1 <= k < n:
    raise ValueError(f"knn_radii: need 1 <= k < N; got k={k}, N={n}")
  sq = np.einsum("ij,ij->i", f, f)
  radii = np.empty(n)
  step = _block_rows(n)
  for start in range(0, n, step):
    d2 = _squared_distances(f[start:start + step], f, sq[start:start + step], sq)
    d2[np.arange(len(d2)), np.arange(start, start + len(d2))] = -np.inf  # itself: rank 0
    radii[start:start + step] = np.partition(d2, k, axis=1)[:, k]
  return radii


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  """Fraction of `points` within (<=) radius of at least one centre (squared units)."""
  p_sq = np.einsum("ij,ij->i", points, points)
  c_sq = np.einsum("ij,ij->i", centres, centres)
  inside = np.zeros(len(points), dtype=bool)
  step = _block_rows(len(centres))
  for start in range(0, len(points), step):
    d2 = _squared_distances(points[start:start + step], centres, p_sq[start:start + step], c_sq)
    inside[start:start + step] = (d2 <= radii[None, :]).any(axis=1)
  return float(inside.mean())


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its points, each ball's radius the
  distance to that point's k-th nearest neighbour in its own set. Precision is the fraction
  of fake samples inside the real manifold (fidelity); recall the fraction of real samples
  inside the fake manifold (coverage).

  Args:
    real_features: [N1, d] features of data.
    fake_features: [N2, d] features of samples.
    k: the neighbour rank of the radii (3 in the paper).

  Returns:
    `(precision, recall)`, each in [0, 1].

  Raises:
    ValueError: shapes disagree, a set has k samples or fewer, non-finite values.
  """
  real = _features(real_features, "real_features")
  fake = _features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: features of dimensions {real.shape[1]} (real) and "
                     f"{fake.shape[1]} (fake)")
  precision = _fraction_inside(fake, real, knn_radii(real, k))
  recall = _fraction_inside(real, fake, knn_radii(fake, k))
  return precision, recall


# ---- Cached reference statistics ------------------------------------------------------

STATS_FORMAT = 1


def save_reference_stats(path: str | os.PathLike, features, *, feature_net: str,
                         weights_sha256: str, dataset: str, split: str,
                         logits=None, extra: dict | None = None) -> dict:
  """Writes mu, sigma and the features of a dataset split to an .npz.

  Args:
    path: the .npz to write (folders are created).
    features: [N, d] features of the split.
    feature_net: the feature network's name ("fmnist", "inception", ...).
    weights_sha256: SHA-256 of its weights, so stats of another network are refused.
    dataset: the dataset's name; split: its split.
    logits: optional [N, C] classifier logits (for IS / class histograms of the data).
    extra: more string-valued metadata (image size, ...), also checked at load.

  Returns:
    The metadata written.
  """
  mu, sigma = feature_statistics(features)
  meta = dict(format=str(STATS_FORMAT), feature_net=feature_net, weights_sha256=weights_sha256,
              dataset=dataset, split=split, num_examples=str(len(np.asarray(features))))
  meta.update({k: str(v) for k, v in (extra or {}).items()})
  arrays = dict(mu=mu, sigma=sigma, features=np.asarray(features, np.float32))
  if logits is not None:
    arrays["logits"] = np.asarray(logits, np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays, **{f"meta_{k}": np.array(v) for k, v in meta.items()})
  return meta


def load_reference_stats(path: str | os.PathLike, *, feature_net: str | None = None,
                         weights_sha256: str | None = None, dataset: str | None = None,
                         split: str | None = None, extra: dict | None = None) -> dict:
  """Reads a file of `save_reference_stats` and checks where it came from.

  Every keyword given must equal the value recorded in the file.

  Returns:
    dict(mu, sigma, features, logits (or None), meta=dict of the recorded strings).

  Raises:
    FileNotFoundError: no such file (the message says how to make one).
    ValueError: the file records another feature network, weights, dataset, split or extra
      value than asked for (naming both).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No reference statistics at {os.path.abspath(path)!r}; compute "
                            f"them with `python scripts/reference_stats.py --out={path} ...`")
  with np.load(path, allow_pickle=False) as f:
    meta = {k[len("meta_"):]: str(f[k]) for k in f.files if k.startswith("meta_")}
    out = dict(mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64),
               features=f["features"], logits=f["logits"] if "logits" in f.files else None,
               meta=meta)
  wanted = dict(feature_net=feature_net, weights_sha256=weights_sha256, dataset=dataset,
                split=split, **{k: str(v) for k, v in (extra or {}).items()})
  for key, value in wanted.items():
    if value is not None and meta.get(key) != str(value):
      raise ValueError(f"Reference statistics {path!r} were computed with {key}="
                       f"{meta.get(key)!r}, not {value!r}; recompute them with "
                       f"scripts/reference_stats.py for this {key}")
  return out


# ---- All metrics of a set of samples ----------------------------------------------------


def class_histogram(logits, num_classes: int | None = None) -> np.ndarray:
  """Fraction of samples whose argmax class is c, for each class c: [num_classes]."""
  z = np.asarray(logits)
  num_classes = z.shape[1] if num_classes is None else num_classes
  return np.bincount(z.argmax(axis=1), minlength=num_classes) / len(z)


def feature_metrics(features, logits, reference: dict, *, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, pr_k: int = 3, pr_num_real: int = 10_000,
                    is_splits: int = 10, seed: int = 0) -> dict:
  """FID, KID, IS, precision / recall and class histogram of samples against reference stats.

  Args:
    features: [N, d] features of the samples; logits: [N, C] their classifier logits.
    reference: dict with `mu`, `sigma`, `features` (and optionally `logits`) of the data, as
      `load_reference_stats` returns.
    kid_subsets, kid_subset_size: KID's subsets.
    pr_k: precision / recall neighbour rank.
    pr_num_real: precision / recall use at most this many data features (a random subset
      drawn with `seed`; the k-NN radii cost O(N^2)) and at most as many samples.
    is_splits: Inception Score splits (fewer if N < is_splits).
    seed: seed of the KID subsets and the precision / recall subsets.

  Returns:
    dict(fid, kid, kid_std, inception_score, inception_score_std, precision, recall,
    class_histogram (list), num_samples[, data_class_histogram]).
  """
  feats = _features(features, "sample features")
  mu, sigma = feature_statistics(feats)
  out = dict(num_samples=int(len(feats)))
  out["fid"] = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
  out["kid"], out["kid_std"] = kernel_inception_distance(
      feats, reference["features"], num_subsets=kid_subsets, subset_size=kid_subset_size,
      seed=seed)
  out["inception_score"], out["inception_score_std"] = inception_score(
      logits, splits=min(is_splits, len(feats)))
  rng = np.random.default_rng([seed, 1])
  real = np.asarray(reference["features"])
  n_pr = min(pr_num_real, len(real), len(feats))
  if n_pr > pr_k:
    out["precision"], out["recall"] = precision_recall(
        real[rng.choice(len(real), n_pr, replace=False)],
        feats[rng.choice(len(feats), n_pr, replace=False)], k=pr_k)
  out["class_histogram"] = class_histogram(logits).round(5).tolist()
  if reference.get("logits") is not None:
    out["data_class_histogram"] = class_histogram(reference["logits"]).round(5).tolist()
  return out


def sliced_wasserstein1(key: jax.Array, a, b, projections: int = 256) -> float:
  """Sliced Wasserstein-1 distance between two equal-size samples.

  The mean over `projections` random unit directions theta (uniform on the sphere, drawn
  from `key`) of the 1-D W1 distance between the projections theta . a_i and theta . b_i,
  i.e. the mean absolute difference of the sorted projections. In float64 on the host.

  Args:
    key: a JAX PRNG key (the directions).
    a, b: samples `[N, *D]` (flattened to `[N, prod(D)]`), in the data's units.
    projections: number of directions, >= 1.

  Returns:
    The distance, in the data's units (0 for identical samples).

  Raises:
    ValueError: samples of different shapes, or `projections < 1`.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  if a.shape != b.shape:
    raise ValueError(f"sliced W1 needs equal-size samples, got {a.shape} and {b.shape}")
  if projections < 1:
    raise ValueError(f"projections must be >= 1, got {projections}")
  dirs = np.asarray(jax.random.normal(key, (a.shape[1], projections)), np.float64)
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  return float(np.mean(np.abs(np.sort(a @ dirs, axis=0) - np.sort(b @ dirs, axis=0))))
