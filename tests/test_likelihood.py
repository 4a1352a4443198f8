"""Tests of score_sde.likelihood against exact Gaussian-mixture densities and hand computations.

With the exact score of a Gaussian mixture, the probability-flow ODE transports p_eps to the
exact diffused mixture p_T, so

    log_likelihood(x) - prior_logp(z) + log p_T(z) = log p_eps(x)

holds up to the ODE solver's error alone; the raw `log_likelihood` differs from log p_eps(x)
also by log N(z; 0, prior) - log p_T(z), the (small) prior mismatch of the SDE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import likelihood, mixtures
from score_sde import sde as sde_lib

EPS = 1e-5


@pytest.mark.parametrize("sde_name", ["vpsde", "subvpsde", "vesde"])
@pytest.mark.parametrize("mixture_name", ["three_gaussians", "image"])
def test_exact_divergence_matches_mixture_log_density(sde_name, mixture_name):
  if mixture_name == "three_gaussians":
    mixture = mixtures.three_gaussians_mixture()
  else:
    mixture = mixtures.image_mixture(event_shape=(3, 3, 1))
  sde = sde_lib.get_sde(sde_name)
  with jax.enable_x64(True):

    @jax.jit  # the draws, the solve and the exact densities, one program
    def solve_and_exact(key):
      x, _ = mixture.sample(jax.random.PRNGKey(1), 6)
      x = x.astype(jnp.float64)
      logp, z, nfe = likelihood.log_likelihood(key, mixture.score_fn(sde), sde, x,
                                               divergence="exact", eps=EPS, rtol=1e-7,
                                               atol=1e-7)
      transported = logp - sde.prior_logp(z) + mixture.log_prob(z, sde.T, sde)
      return x, logp, z, nfe, mixture.log_prob(x, EPS, sde), transported

    x, logp, z, nfe, exact, transported = solve_and_exact(jax.random.PRNGKey(0))
    assert logp.shape == (6,) and logp.dtype == jnp.float64 and z.shape == x.shape
    per_dim = np.abs(np.asarray(logp) - np.asarray(exact)) / mixture.dim
    # Raw result: ODE error plus the prior mismatch of the SDE, well below 0.01 nats/dim.
    assert per_dim.max() < 0.01, per_dim
    # Prior mismatch removed: only the ODE solver's error remains.
    err = np.abs(np.asarray(transported) - np.asarray(exact)) / mixture.dim
    assert err.max() < 1e-4, err
    assert int(nfe) > 6


_HUTCHINSON_POINTS = ((-0.3, 0.5), (1.0, 0.0), (0.2, -0.7))
_HUTCHINSON_OPTIONS = dict(eps=EPS, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def exact_logp_between_modes():
  """log_likelihood with the exact divergence (VP, three Gaussians) at points between the modes,
  where the score's Jacobian has large off-diagonal entries (so Hutchinson is really random)."""
  mixture = mixtures.three_gaussians_mixture()
  sde = sde_lib.VPSDE()
  with jax.enable_x64(True):
    x = jnp.array(_HUTCHINSON_POINTS, jnp.float64)
    logp, _, _ = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.PRNGKey(0), mixture.score_fn(sde), sde, x, divergence="exact",
        **_HUTCHINSON_OPTIONS))(x)
  return np.asarray(logp)


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(divergence, exact_logp_between_modes):
  mixture = mixtures.three_gaussians_mixture()
  sde = sde_lib.VPSDE()
  score_fn = mixture.score_fn(sde)
  exact = exact_logp_between_modes
  n_probes = 1024
  with jax.enable_x64(True):
    x = jnp.array(_HUTCHINSON_POINTS, jnp.float64)
    opts = _HUTCHINSON_OPTIONS
    # Each of the n_probes copies of a point gets its own probe (one draw per example), so
    # one solve gives n_probes independent estimates per point (cheaper to compile than vmap).
    tiled = jnp.tile(x, (n_probes, 1))
    est, _, _ = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.PRNGKey(2), score_fn, sde, x, divergence=divergence, **opts))(tiled)
  est = np.asarray(est).reshape(n_probes, 3)
  mean = est.mean(axis=0)
  stderr = est.std(axis=0, ddof=1) / math.sqrt(n_probes)
  assert np.all(stderr > 1e-3), stderr  # the estimator is really random here
  assert np.all(np.abs(mean - exact) < 4 * stderr + 1e-5), (mean, exact, stderr)


@pytest.mark.parametrize("solver,rtol", [("tsit5", 1e-5), ("heun", 1e-3)])
def test_nfe_counts_every_ode_function_evaluation(solver, rtol):
  mixture = mixtures.three_gaussians_mixture()
  sde = sde_lib.VPSDE()
  calls = []

  def counting_score(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return mixture.score(x, t, sde)

  x, _ = mixture.sample(jax.random.PRNGKey(3), 4)
  _, _, nfe = jax.jit(lambda x: likelihood.log_likelihood(
      jax.random.PRNGKey(0), counting_score, sde, x, solver=solver, rtol=rtol, atol=rtol))(x)
  jax.block_until_ready(nfe)
  jax.effects_barrier()
  assert int(nfe) == len(calls) > 0


def test_unknown_names_raise():
  mixture = mixtures.three_gaussians_mixture()
  sde = sde_lib.VPSDE()
  x = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match="rademacher.*gaussian.*exact"):
    likelihood.log_likelihood(jax.random.PRNGKey(0), mixture.score_fn(sde), sde, x,
                              divergence="hutch")
  with pytest.raises(ValueError, match="tsit5"):
    likelihood.log_likelihood(jax.random.PRNGKey(0), mixture.score_fn(sde), sde, x,
                              solver="rk45")


def test_bits_per_dim_hand_computations():
  d = 12
  # Uniform density on [0, 1]^D: log p = 0, 8 bits/dim (uniform 8-bit pixels).
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.zeros(3), (2, 2, 3)), 8.0)
  # Uniform density on [-1, 1]^D: log p = -D ln 2; centered offset 7 -> again 8 bits/dim.
  np.testing.assert_allclose(
      likelihood.bits_per_dim(jnp.full((3,), -d * math.log(2.0)), (d,), offset=7.0), 8.0)
  # Pixels equal to 0 or 255 with probability 1/2: after dequantization the density on [0, 1)
  # is 128 on two bins of width 1/256, so log p = D ln 128 and bpd = -7 + 8 = 1 bit (entropy).
  np.testing.assert_allclose(
      likelihood.bits_per_dim(jnp.array([d * math.log(128.0)]), (d,), offset=8.0), 1.0)
  # Standard normal at its mode, no offset: log2(2 pi) / 2 bits/dim.
  logp = -0.5 * d * math.log(2 * math.pi)
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.array(logp), (d,), offset=0.0),
                             0.5 * math.log2(2 * math.pi), rtol=1e-6)


def test_dequantize_uint8_and_unit_interval_agree():
  k = jnp.array([[0, 1, 127, 255]], jnp.uint8)
  key = jax.random.PRNGKey(4)
  from_int = likelihood.dequantize(key, k)
  from_float = likelihood.dequantize(key, k.astype(jnp.float32) / 255.0)
  np.testing.assert_array_equal(from_int, from_float)
  kf = np.asarray(k, np.float64)
  assert np.all(from_int >= kf / 256) and np.all(from_int < (kf + 1) / 256)
  many = likelihood.dequantize(key, jnp.full((4000,), 10, jnp.uint8))
  np.testing.assert_allclose(np.mean(many) * 256, 10.5, atol=0.02)


def test_bits_per_dim_of_batch_matches_density_of_dequantized_data():
  # Data model: one Gaussian in [-1, 1]^2 (centered scaling); bpd through the full pipeline
  # equals the hand-computed -log2 p_eps(x) / D + 7 at the same dequantized, centered points.
  # (Zero mean keeps the VP prior mismatch, log N(z; 0, I) - log p_T(z), below 1e-4 nats.)
  mixture = mixtures.GaussianMixture(weights=(1.0,), means=((0.0, 0.0),), stds=(0.3,),
                                     event_shape=(2,))
  sde = sde_lib.VPSDE()
  pixels = jnp.array([[100, 160], [130, 90], [128, 128]], jnp.uint8)
  key = jax.random.PRNGKey(5)
  bpd, _ = jax.jit(lambda k, p: likelihood.bits_per_dim_of_batch(
      k, mixture.score_fn(sde), sde, p, centered=True, divergence="exact", eps=EPS,
      rtol=1e-6, atol=1e-6))(key, pixels)
  x = 2.0 * likelihood.dequantize(jax.random.split(key)[0], pixels) - 1.0
  expected = -mixture.log_prob(x, EPS, sde) / (2 * math.log(2.0)) + 7.0
  np.testing.assert_allclose(bpd, expected, atol=2e-4)
