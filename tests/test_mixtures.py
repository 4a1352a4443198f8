"""Tests of the Gaussian-mixture oracle (score_sde/mixtures.py), in float64: the score is the
gradient of the log-density, the (diffused) density integrates to one with the moments of
the diffused data, and samples have the mixture's moments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import mixtures
from score_sde import sde as sde_lib

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(),
        "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0)}
TIMES = (0.0, 0.05, 0.3, 0.7, 1.0)

# 1-D: two unequal components; 2-D: the default toy problem.
LINE = mixtures.GaussianMixture(weights=(0.7, 0.3), means=((-1.0,), (2.0,)), stds=(0.3, 0.5),
                                event_shape=(1,))
PLANE = mixtures.three_gaussians_mixture()


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _moments(mixture):
  """Mean `[D]` and covariance `[D, D]` of the data: sum_k w_k (s_k^2 I + mu_k mu_k^T) - m m^T."""
  w, mu, s = (np.asarray(mixture.weights), np.asarray(mixture.means),
              np.asarray(mixture.stds))
  mean = w @ mu
  second = np.einsum("k,ki,kj->ij", w, mu, mu) + np.sum(w * s**2) * np.eye(mixture.dim)
  return mean, second - np.outer(mean, mean)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("mixture", [PLANE, mixtures.image_mixture((2, 2, 1))],
                         ids=["plane", "image"])
def test_score_is_gradient_of_log_prob(sde_name, mixture):
  sde = SDES[sde_name]

  @jax.jit  # one program (eager, every operation compiles its own)
  def scores_and_gradients():
    x = 1.5 * jax.random.normal(jax.random.key(0), (len(TIMES),) + mixture.event_shape,
                                jnp.float64)
    t = jnp.asarray(TIMES, jnp.float64)
    grad = jax.grad(lambda x: jnp.sum(mixture.log_prob(x, t, sde)))(x)
    grad0 = jax.grad(lambda x: jnp.sum(mixture.log_prob(x)))(x)
    return mixture.score_fn(sde)(x, t), grad, mixture.score(x), grad0

  score, grad, score0, grad0 = scores_and_gradients()
  assert score.dtype == jnp.float64
  np.testing.assert_allclose(score, grad, rtol=1e-10, atol=1e-10)
  # The data density (t = None) too.
  np.testing.assert_allclose(score0, grad0, rtol=1e-10, atol=1e-10)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _log_prob(mixture, sde, t, x):
  """log p_t(x) as one compiled program per (mixture, SDE, t, shape)."""
  return mixture.log_prob(x, t, sde)


def _grid_integrals(mixture, sde, t, lim, n):
  """Riemann sums of p_t, x p_t and x x^T p_t over [-lim, lim]^D with n points per axis (the
  tails beyond lim are negligible; the integrands are smooth, so the sums converge fast)."""
  axis = np.linspace(-lim, lim, n)
  cell = (axis[1] - axis[0]) ** mixture.dim
  points = np.stack(np.meshgrid(*[axis] * mixture.dim, indexing="ij"), -1)
  points = points.reshape(-1, mixture.dim)
  p = np.exp(np.asarray(_log_prob(mixture, sde, t, jnp.asarray(points)))) * cell
  return p.sum(), p @ points, np.einsum("n,ni,nj->ij", p, points, points)


@pytest.mark.parametrize("sde_name,t", [("vp", None)] + [
    (name, t) for name in sorted(SDES) for t in (0.1, 0.5, 1.0)])
@pytest.mark.parametrize("mixture,n", [(LINE, 4001), (PLANE, 401)], ids=["line", "plane"])
def test_diffused_density_normalizes_with_diffused_moments(sde_name, t, mixture, n):
  """p_t is the law of alpha(t) x_0 + sigma(t) z: total mass 1, mean alpha m, covariance
  alpha^2 C + sigma^2 I."""
  sde = SDES[sde_name]
  if t is None:
    alpha, sigma = 1.0, 0.0
  else:
    alpha = float(sde.alpha(jnp.float64(t)))
    sigma = float(sde.sigma(jnp.float64(t)))
  lim = 3.0 + 9.0 * max(sigma, alpha * 0.5)
  mass, first, second = _grid_integrals(mixture, sde, t, lim, n)
  mean, cov = _moments(mixture)
  np.testing.assert_allclose(mass, 1.0, rtol=1e-8)
  np.testing.assert_allclose(first, alpha * mean, atol=1e-7)
  np.testing.assert_allclose(second - np.outer(first, first),
                             alpha**2 * cov + sigma**2 * np.eye(mixture.dim), rtol=1e-7,
                             atol=1e-7)


def test_samples_have_the_mixture_moments():
  n = 200_000
  x, comp = jax.jit(PLANE.sample, static_argnums=1)(jax.random.key(1), n)  # one program
  x, comp = np.asarray(x, np.float64), np.asarray(comp)
  assert x.shape == (n, 2)
  mean, cov = _moments(PLANE)
  # Component frequencies within 5 standard errors of the weights.
  w = np.asarray(PLANE.weights)
  freq = np.bincount(comp, minlength=3) / n
  np.testing.assert_array_less(np.abs(freq - w), 5 * np.sqrt(w * (1 - w) / n))
  # Mean within 5 standard errors; covariance within 5 standard errors of its entries
  # (estimated from the samples: se of mean of (x_i - m)(x_j - m)).
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(cov) / n))
  centred = x - mean
  products = centred[:, :, None] * centred[:, None, :]
  se = products.std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(products.mean(0) - cov), 5 * se)
  # Each component's samples have its own mean and std.
  for k in range(3):
    xk = x[comp == k]
    np.testing.assert_allclose(xk.mean(0), PLANE.means[k],
                               atol=5 * PLANE.stds[k] / np.sqrt(len(xk)))
    np.testing.assert_allclose(xk.std(0), PLANE.stds[k], rtol=0.02)
