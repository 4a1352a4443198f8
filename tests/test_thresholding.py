"""Static clipping and dynamic thresholding of the denoised estimate in the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sampling
from score_sde import sde as sde_lib

DATA_SAMPLERS = {"ddim": dict(steps=8), "dpm_solver": dict(steps=8), "heun": dict(steps=5),
                 "ddpm": dict(steps=8)}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_identity_in_range(mode, data_range):
  lo, hi = data_range
  x0 = jax.random.uniform(jax.random.key(0), (3, 4, 4, 2), minval=lo, maxval=hi)
  out = sampling.threshold_x0(x0, mode, 0.9, data_range)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x0))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_clipped_values_in_range(mode, data_range):
  x0 = 3.0 * jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  out = np.asarray(sampling.threshold_x0(x0, mode, 0.95, data_range))
  assert out.min() >= data_range[0] - 1e-6 and out.max() <= data_range[1] + 1e-6
  if mode == "static":
    np.testing.assert_array_equal(out, np.clip(np.asarray(x0), *data_range))


def test_dynamic_thresholding_formula():
  """Example 0: |y| = 0.1, 0.2, ..., 2.0 (20 values): the 90th percentile is s = 1.81 (linear
  interpolation between 1.8 and 1.9), so y -> clip(y, -s, s) / s. Example 1: all |y| <= 1,
  so s = max(1, ...) = 1 and nothing changes. Data range [0, 1]: y = 2 x - 1."""
  y0 = np.arange(1, 21) / 10.0 * np.where(np.arange(20) % 2, -1.0, 1.0)
  y1 = np.linspace(-0.9, 0.9, 20)
  x0 = (np.stack([y0, y1]) + 1.0) / 2.0
  out = np.asarray(sampling.threshold_x0(jnp.asarray(x0, jnp.float32), "dynamic", 0.9,
                                         (0.0, 1.0)))
  s = 1.8 + 0.1 * (0.9 * 19 - 17)
  expected0 = (np.clip(y0, -s, s) / s + 1.0) / 2.0
  np.testing.assert_allclose(out[0], expected0, rtol=1e-5)
  np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)


def _gaussian_score(mean, std, sde):
  """Exact score of data N(mean, std^2 I) diffused by `sde`."""
  def score_fn(x, t):
    alpha = sde.alpha(t).reshape(-1, 1)
    sigma = sde.sigma(t).reshape(-1, 1)
    return -(x - alpha * mean) / (alpha**2 * std**2 + sigma**2)
  return score_fn


@pytest.mark.parametrize("method", DATA_SAMPLERS)
def test_samplers_unchanged_when_the_estimate_is_in_range(method):
  """Data N(0, 0.01^2): the Tweedie estimate alpha v / (alpha^2 v + sigma^2) x stays well
  inside [-1, 1] from the start, so clipping / thresholding change nothing."""
  sde = sde_lib.VPSDE()
  score_fn = _gaussian_score(0.0, 0.01, sde)
  shape = (16, 3)
  x_T = jax.random.normal(jax.random.key(2), shape)
  key = jax.random.key(3)
  plain, _ = sampling.sample(key, score_fn, sde, shape, method=method, x_T=x_T,
                             **DATA_SAMPLERS[method])
  for mode in ("static", "dynamic"):
    clipped, _ = sampling.sample(key, score_fn, sde, shape, method=method, x_T=x_T,
                                 threshold=mode, **DATA_SAMPLERS[method])
    np.testing.assert_allclose(np.asarray(clipped), np.asarray(plain), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", DATA_SAMPLERS)
def test_samplers_end_in_range_with_static_clipping(method):
  """Data N(3, 0.1^2), far outside [-1, 1]: without clipping the samples are near 3; with
  static clipping every denoised estimate is clipped, and so are the denoised samples."""
  sde = sde_lib.VPSDE()
  score_fn = _gaussian_score(3.0, 0.1, sde)
  shape = (16, 3)
  x_T = jax.random.normal(jax.random.key(4), shape)
  plain, _ = sampling.sample(jax.random.key(5), score_fn, sde, shape, method=method,
                             x_T=x_T, **DATA_SAMPLERS[method])
  assert float(jnp.mean(plain)) > 2.5
  clipped, _ = sampling.sample(jax.random.key(5), score_fn, sde, shape, method=method,
                               x_T=x_T, threshold="static", **DATA_SAMPLERS[method])
  assert float(jnp.max(jnp.abs(clipped))) <= 1.0 + 1e-5


def test_bad_threshold_options():
  x0 = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="'dynamic', 'none', 'static'"):
    sampling.threshold_x0(x0, "soft")
  with pytest.raises(ValueError, match="percentile"):
    sampling.threshold_x0(x0, "dynamic", 1.5)
  with pytest.raises(ValueError, match="data_range"):
    sampling.threshold_x0(x0, "static", data_range=(1.0, 0.0))
  with pytest.raises(ValueError, match="'dynamic', 'none', 'static'"):
    sampling.sample(jax.random.key(0), lambda x, t: -x, sde_lib.VPSDE(), (2, 2),
                    method="ddim", steps=2, threshold="hard")
  # Samplers that do not predict the data take no threshold option.
  assert "threshold" not in sampling.sampler_options("pc")
  assert "threshold" in sampling.sampler_options("dpm_solver")
