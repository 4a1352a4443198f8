"""Denoising score matching: closed forms for Gaussian data, and training recovers the score."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_problem
from scipy import integrate

from score_sde import losses
from score_sde import sde as sde_lib

MU, S = gaussian_problem.MU, gaussian_problem.S  # data ~ N(MU, S^2 I) in 2 dimensions


def gaussian_score(sde):
  """Score of the diffused Gaussian with mean m and variance exp(log_v): a model linear in x
  whose optimum (m, log_v) = (MU, log S^2) is the exact score at every t."""
  def score_fn(params, x, t):
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    var = alpha**2 * jnp.exp(params["log_v"]) + sigma**2
    return -(x - alpha * params["m"]) / var
  return score_fn


TRUE_PARAMS = {"m": jnp.asarray(MU, jnp.float32), "log_v": jnp.asarray(math.log(S**2))}



def _expected_loss_at_optimum(sde, weighting, eps, sigma_data):
  """1/(T-eps) int w(t) E||sigma s* + z||^2 / D dt, where for Gaussian data the inner
  expectation is alpha^2 S^2 / (alpha^2 S^2 + sigma^2) per dimension (closed form), and
  w = 1 for sigma2, g^2 / sigma^2 for the likelihood weighting; `sigma_data` is edm's."""
  # alpha, sigma and g at t as one compiled program: quad calls it hundreds of times (eager,
  # every call ran a dozen operations one by one).
  coefficients = jax.jit(lambda tt: (sde.alpha(tt)[0], sde.sigma(tt)[0],
                                     sde.sde(jnp.zeros((1, 1), tt.dtype), tt)[1][0]))

  def integrand(t):
    a, s, g = (float(v) for v in coefficients(jnp.asarray([t], jnp.float64)))
    w = {"sigma2": 1.0, "likelihood": g**2 / s**2, "x0": (s / a) ** 2, "v": 1 + (s / a) ** 2,
         "edm": 1 + (s / a) ** 2 / sigma_data**2}[weighting]
    return w * a**2 * S**2 / (a**2 * S**2 + s**2)
  # Integrate in log t (the likelihood weight grows like 1/t near 0), in float64.
  with jax.enable_x64(True):
    val, _ = integrate.quad(lambda u: integrand(math.exp(u)) * math.exp(u), math.log(eps),
                            0.0, limit=200)
  return val / (sde.T - eps)


def _loss_draws(loss_fn, score_fn, n_keys, batch):
  @jax.jit
  def per_example(key):
    k_x, k_l = jax.random.split(key)
    x0 = gaussian_problem.data(k_x, batch)
    return loss_fn(k_l, score_fn, TRUE_PARAMS, x0)[1]["per_example_loss"]
  keys = jax.random.split(jax.random.key(0), n_keys)
  return np.concatenate([np.asarray(per_example(k)) for k in keys])


@pytest.mark.parametrize("weighting,importance_sampling", [
    ("sigma2", False), ("likelihood", False), ("likelihood", True), ("x0", False),
    ("v", False), ("edm", False)])
def test_loss_at_exact_score_matches_closed_form(weighting, importance_sampling):
  sde, eps, sigma_data = sde_lib.VPSDE(), 1e-3, 0.5
  loss_fn = losses.get_loss_fn(sde, weighting=weighting, eps=eps,
                               importance_sampling=importance_sampling, sigma_data=sigma_data)
  draws = _loss_draws(loss_fn, gaussian_score(sde), n_keys=8, batch=8192)
  expected = _expected_loss_at_optimum(sde, weighting, eps, sigma_data)
  se = draws.std() / math.sqrt(draws.size)
  assert abs(draws.mean() - expected) < 4 * se + 1e-3 * expected, (draws.mean(), expected, se)


def test_importance_sampling_reduces_variance():
  sde, eps = sde_lib.VPSDE(), 1e-3
  score_fn = gaussian_score(sde)
  plain = _loss_draws(losses.get_loss_fn(sde, weighting="likelihood", eps=eps), score_fn, 2,
                      8192)
  weighted = _loss_draws(losses.get_loss_fn(sde, weighting="likelihood", eps=eps,
                                            importance_sampling=True), score_fn, 2, 8192)
  assert weighted.std() < 0.5 * plain.std()


def test_log_normal_times():
  """EDM's training noise levels: log(sigma / alpha) at the drawn t is N(p_mean, p_std^2)
  (clipping to [sigma_hat(eps), sigma_hat(T)] is negligible here: VP log sigma_hat spans
  about [-6.9, 5.0])."""
  sde = sde_lib.VPSDE()
  sampler = losses.LogNormalSampler(sde, 1e-5, -1.2, 1.2)
  t = sampler.sample(jax.random.key(0), 100_000)
  log_sigma_hat = -np.asarray(sde.log_snr(t), np.float64)
  assert abs(log_sigma_hat.mean() + 1.2) < 0.02 and abs(log_sigma_hat.std() - 1.2) < 0.02
  assert float(t.min()) >= 1e-5 and float(t.max()) <= 1.0


def test_importance_sampler_density():
  """The sampled t follow q(t) ~ g^2/sigma^2: compare the CDF at a few points to quadrature."""
  sde, eps = sde_lib.SubVPSDE(), 1e-3
  sampler = losses.ImportanceSampler(sde, eps)
  t = np.asarray(sampler.sample(jax.random.key(3), 200_000))
  # q(u) = g(u)^2 / sigma(u)^2 as one compiled program, called by quad hundreds of times
  # (eager, every call ran a dozen operations one by one).
  q_program = jax.jit(lambda u: sde.sde(jnp.zeros((1, 1), u.dtype), u[None])[1][0] ** 2
                      / sde.sigma(u[None])[0] ** 2)
  q = lambda u: float(q_program(jnp.asarray(u, jnp.float64)))
  with jax.enable_x64(True):
    z = integrate.quad(q, eps, 1.0, points=[0.01, 0.1], limit=200)[0]
    cdfs = [integrate.quad(q, eps, c, limit=200)[0] / z for c in (0.01, 0.1, 0.5)]
  assert sampler.normalizer == pytest.approx(z, rel=1e-3)
  for c, cdf in zip((0.01, 0.1, 0.5), cdfs):
    assert abs(np.mean(t < c) - cdf) < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("sde_name,weighting,importance_sampling", [
    ("vpsde", "sigma2", False), ("vpsde", "likelihood", False), ("vpsde", "likelihood", True),
    ("subvpsde", "sigma2", False), ("vesde", "sigma2", False), ("vpsde", "ddpm", False),
    ("vesde", "smld", False)])
def test_training_recovers_the_gaussian_score(sde_name, weighting, importance_sampling):
  sde = sde_lib.get_sde(sde_name)
  loss_fn = losses.get_loss_fn(sde, weighting=weighting, eps=1e-3,
                               importance_sampling=importance_sampling)
  score_fn = gaussian_score(sde)
  gaussian_problem.assert_recovers_the_data(gaussian_problem.fit(loss_fn, score_fn))


def test_bad_arguments():
  with pytest.raises(ValueError, match="sigma2"):
    losses.get_loss_fn(sde_lib.VPSDE(), weighting="l2")
  with pytest.raises(ValueError, match="importance_sampling"):
    losses.get_loss_fn(sde_lib.VPSDE(), weighting="sigma2", importance_sampling=True)
  with pytest.raises(ValueError, match="no discrete chain"):
    losses.get_loss_fn(sde_lib.SubVPSDE(), weighting="ddpm")
  with pytest.raises(ValueError, match="eps"):
    losses.get_loss_fn(sde_lib.VPSDE(), eps=0.0)
  with pytest.raises(ValueError, match="log_normal"):
    losses.get_loss_fn(sde_lib.VPSDE(), time_sampling="beta")
  with pytest.raises(ValueError, match="continuous weighting"):
    losses.get_loss_fn(sde_lib.VPSDE(), weighting="ddpm", time_sampling="log_normal")
