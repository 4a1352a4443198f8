"""The forward SDEs against the formulas of Song et al. (ICLR 2021, appendix), in float64."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sde as sde_lib
from score_sde.mixtures import three_gaussians_mixture
from tests.compiled import compiled

TIMES = np.array([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0])
B0, B1 = 0.1, 20.0
SMIN, SMAX = 0.01, 50.0


def _int_beta(t):
  return B0 * t + 0.5 * (B1 - B0) * t**2


def _reference(name, t):
  """(drift coefficient f(t) in f(x,t) = f x, g(t), mean coefficient, std), float64."""
  beta = B0 + t * (B1 - B0)
  if name == "vp":
    return (-0.5 * beta, np.sqrt(beta), np.exp(-0.5 * _int_beta(t)),
            np.sqrt(1 - np.exp(-_int_beta(t))))
  if name == "subvp":
    return (-0.5 * beta, np.sqrt(beta * (1 - np.exp(-2 * _int_beta(t)))),
            np.exp(-0.5 * _int_beta(t)), 1 - np.exp(-_int_beta(t)))
  sigma = SMIN * (SMAX / SMIN) ** t
  return (0.0 * t, sigma * np.sqrt(2 * np.log(SMAX / SMIN)), np.ones_like(t), sigma)


SDES = {"vp": sde_lib.VPSDE(B0, B1, 1000), "subvp": sde_lib.SubVPSDE(B0, B1, 1000),
        "ve": sde_lib.VESDE(SMIN, SMAX, 1000)}


def _rel_close(actual, expected, rtol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", SDES)
def test_coefficients_match_closed_forms(name):
  sde = SDES[name]
  x = jnp.asarray(np.linspace(-2, 2, len(TIMES) * 3).reshape(len(TIMES), 3), jnp.float32)
  t = jnp.asarray(TIMES, jnp.float32)
  f_coef, g, mean_coef, std = _reference(name, TIMES.astype(np.float32).astype(np.float64))
  drift, diffusion = sde.sde(x, t)
  mean, marg_std = sde.marginal_prob(x, t)
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(np.asarray(drift), f_coef[:, None] * xs, rtol=2e-6, atol=1e-12)
  _rel_close(diffusion, g, 2e-5)
  np.testing.assert_allclose(np.asarray(mean), mean_coef[:, None] * xs, rtol=2e-6, atol=1e-12)
  # Includes t = 1e-5, where 1 - exp(-x) in float32 would be off by ~10%.
  _rel_close(marg_std, std, 2e-5)
  _rel_close(sde.sigma(t), std, 2e-5)
  _rel_close(sde.alpha(t), mean_coef, 2e-6)


@pytest.mark.parametrize("name", SDES)
def test_prior(name):
  sde = SDES[name]
  prior_std = SMAX if name == "ve" else 1.0
  z = sde.prior_sampling(jax.random.key(0), (4000, 8))
  assert abs(float(jnp.std(z)) / prior_std - 1) < 0.02
  d = 8
  z64 = np.asarray(z[:5], np.float64)
  expected = (-0.5 * d * np.log(2 * np.pi * prior_std**2)
              - 0.5 * np.sum(z64**2, axis=1) / prior_std**2)
  np.testing.assert_allclose(np.asarray(sde.prior_logp(z[:5])), expected, rtol=1e-5)
  # The prior is the marginal at T for zero data (up to alpha(T) x_0 ~ 0 for VP).
  assert abs(float(sde.sigma(1.0)) / prior_std - 1) < 1e-3


@pytest.mark.parametrize("name", [*SDES, "cosine", "quadratic", "sigmoid"])
def test_log_snr_inverse_roundtrip(name):
  sde = SDES.get(name) or sde_lib.VPSDE(schedule=name)
  t = jnp.asarray(TIMES, jnp.float32)
  lam = sde.log_snr(t)
  np.testing.assert_allclose(np.asarray(lam), np.log(sde.alpha(t) / sde.sigma(t)), rtol=1e-4,
                             atol=1e-4)
  assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease in t"
  np.testing.assert_allclose(np.asarray(sde.t_from_log_snr(lam)), TIMES, rtol=3e-3)


def test_cosine_schedule_closed_form():
  sde = sde_lib.VPSDE(schedule="cosine")
  s = 0.008
  u = sde_lib.COSINE_T_MAX * TIMES
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  alpha_bar = f(u) / f(0.0)
  # alpha(1)^2 ~ 7e-5 comes from cos near pi/2: its float32 argument limits it to ~3e-5.
  _rel_close(sde.alpha(jnp.asarray(TIMES, jnp.float32)) ** 2, alpha_bar, 5e-5)
  # beta(t) = -d log alpha_bar / dt, checked by central differences in float64.
  h = 1e-6
  tt = np.array([0.1, 0.5, 0.9])
  fd = -(np.log(f(sde_lib.COSINE_T_MAX * (tt + h))) - np.log(f(sde_lib.COSINE_T_MAX * (tt - h)))
         ) / (2 * h)
  _rel_close(sde.beta(jnp.asarray(tt, jnp.float32)), fd, 1e-5)
  # Ends at a nearly pure-noise prior without an infinite beta.
  assert float(sde.alpha(1.0)) ** 2 < 1e-4 and np.isfinite(float(sde.beta(1.0)))


def _reference_beta(schedule, t):
  """beta(t) of the lecture notes' schedules, float64."""
  if schedule == "quadratic":
    return (np.sqrt(B0) + t * (np.sqrt(B1) - np.sqrt(B0))) ** 2
  return B0 + (B1 - B0) / (1.0 + np.exp(-6.0 * (2.0 * t - 1.0)))


@pytest.mark.parametrize("schedule", ["quadratic", "sigmoid"])
def test_new_beta_schedules_match_closed_forms(schedule):
  """beta, int beta (by quadrature), alpha, sigma and log-SNR of the VP and sub-VP SDEs, in
  float64; beta = -2 d log alpha / dt by central differences; float32 at t = 1e-5."""
  from scipy import integrate
  with jax.enable_x64(True):
    vp, subvp = sde_lib.VPSDE(B0, B1, schedule=schedule), sde_lib.SubVPSDE(B0, B1,
                                                                         schedule=schedule)
    t = jnp.asarray(TIMES, jnp.float64)
    beta = _reference_beta(schedule, TIMES)
    _rel_close(vp.beta(t), beta, 1e-12)
    int_beta = np.array([integrate.quad(lambda u: _reference_beta(schedule, u), 0.0, ti,
                                        epsabs=0, epsrel=1e-13)[0] for ti in TIMES])
    _rel_close(vp.integral_beta(t), int_beta, 1e-10)
    alpha = np.exp(-0.5 * int_beta)
    _rel_close(vp.alpha(t), alpha, 1e-10)
    _rel_close(vp.sigma(t), np.sqrt(-np.expm1(-int_beta)), 1e-10)
    _rel_close(subvp.sigma(t), -np.expm1(-int_beta), 1e-10)
    _rel_close(vp.log_snr(t), np.log(alpha / np.sqrt(-np.expm1(-int_beta))), 1e-10)
    _rel_close(vp.t_from_log_snr(vp.log_snr(t)), TIMES, 1e-9)
    _rel_close(subvp.t_from_log_snr(subvp.log_snr(t)), TIMES, 1e-9)
    h, tt = 1e-6, jnp.asarray([0.1, 0.5, 0.9], jnp.float64)
    fd = -(vp.log_alpha(tt + h) - vp.log_alpha(tt - h)) / h
    _rel_close(fd, _reference_beta(schedule, np.asarray(tt)), 1e-7)
    _, g = vp.sde(jnp.zeros((len(TIMES), 1)), t)
    _rel_close(g, np.sqrt(beta), 1e-12)
  # float32 keeps its precision at t -> 0 (no 1 - exp cancellation).
  t32 = jnp.asarray(TIMES, jnp.float32)
  _rel_close(vp.sigma(t32), np.sqrt(-np.expm1(-int_beta)), 2e-5)


@pytest.mark.parametrize("schedule", ["quadratic", "sigmoid"])
def test_new_beta_schedules_discrete_chain(schedule):
  """The DDPM code's tables: 'quad' = linspace(sqrt(b0), sqrt(b1), N)^2 and 'sigmoid' =
  sigmoid(linspace(-6, 6, N)) (b1 - b0) + b0, with b = beta / N."""
  n = 1000
  sde = sde_lib.VPSDE(B0, B1, n, schedule=schedule)
  if schedule == "quadratic":
    expected = np.linspace(np.sqrt(B0 / n), np.sqrt(B1 / n), n) ** 2
  else:
    expected = (1 / (1 + np.exp(-np.linspace(-6, 6, n)))) * (B1 - B0) / n + B0 / n
  _rel_close(sde.discrete_betas(), expected, 1e-5)
  x = jnp.ones((2, 1))
  _, std = sde.discrete_marginal(x, jnp.asarray([0, n - 1]))
  _rel_close(std, np.sqrt(1 - np.cumprod(1 - expected)[[0, n - 1]]), 1e-4)


def test_vp_discretize_is_the_ddpm_chain():
  n = 1000
  sde = sde_lib.VPSDE(B0, B1, n)
  betas = np.linspace(B0 / n, B1 / n, n)
  idx = np.array([0, 1, 500, 999])
  x = jnp.ones((4, 2))
  f, G = sde.discretize(x, jnp.asarray(idx / (n - 1), jnp.float32))
  np.testing.assert_allclose(np.asarray(x + f)[:, 0], np.sqrt(1 - betas[idx]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(G), np.sqrt(betas[idx]), rtol=1e-5)
  # The chain's alpha_bar and std, and their agreement with the continuous marginal.
  mean, std = sde.discrete_marginal(x, jnp.asarray(idx))
  alpha_bar = np.cumprod(1 - betas)[idx]
  np.testing.assert_allclose(np.asarray(mean)[:, 0], np.sqrt(alpha_bar), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(std), np.sqrt(1 - alpha_bar), rtol=1e-5)
  cont = np.exp(-_int_beta(1.0))
  assert abs(np.log(alpha_bar[-1]) / np.log(cont) - 1) < 0.01


def test_ve_discretize_is_the_smld_chain():
  n = 10
  sde = sde_lib.VESDE(SMIN, SMAX, n)
  sigmas = np.exp(np.linspace(np.log(SMIN), np.log(SMAX), n))
  idx = np.arange(n)
  x = jnp.ones((n, 3))
  f, G = sde.discretize(x, jnp.asarray(idx / (n - 1), jnp.float32))
  assert np.all(np.asarray(f) == 0)
  prev = np.concatenate([[0.0], sigmas[:-1]])
  np.testing.assert_allclose(np.asarray(G), np.sqrt(sigmas**2 - prev**2), rtol=1e-5)
  # Noise added up the chain telescopes to sigma_i^2.
  np.testing.assert_allclose(np.cumsum(np.asarray(G, np.float64) ** 2), sigmas**2, rtol=1e-5)


def test_subvp_has_no_discrete_chain():
  with pytest.raises(ValueError, match="no discrete chain"):
    sde_lib.SubVPSDE().discrete_marginal(jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("name", SDES)
def test_forward_simulation_matches_marginal(name):
  """Euler-Maruyama simulation of the forward SDE from the exact marginal at t0 lands on the
  exact marginal at t1 (the Gaussian kernel is consistent with the SDE)."""
  sde = SDES[name]
  n, steps, t0, t1, x0 = 20000, 1000, 0.05, 0.8, 1.5
  key0, key = jax.random.split(jax.random.key(1))
  x_start = jnp.full((n, 1), x0)
  mean0, std0 = sde.marginal_prob(x_start, jnp.full((n,), t0))
  x = mean0 + std0[:, None] * jax.random.normal(key0, (n, 1))
  dt = (t1 - t0) / steps

  def simulate(x, key):
    def step(x, i):
      t = jnp.full((n,), t0 + i * dt)
      drift, g = sde.sde(x, t)
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
      return x + drift * dt + g[:, None] * math.sqrt(dt) * z, None
    return jax.lax.scan(step, x, jnp.arange(steps))[0]

  # 1000 steps of 20,000 normal draws: running, not compiling, is the cost, and the program
  # runs several times faster at XLA's optimization level 1 (tests/compiled.py).
  x = compiled(simulate, x, key, level=1)(x, key)
  mean1, std1 = sde.marginal_prob(x_start[:1], jnp.array([t1]))
  m, s = float(mean1[0, 0]), float(std1[0])
  se_mean, se_std = s / math.sqrt(n), s / math.sqrt(2 * n)
  assert abs(float(jnp.mean(x)) - m) < 4 * se_mean + 0.01 * s
  assert abs(float(jnp.std(x)) - s) < 4 * se_std + 0.01 * s


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_sde(probability_flow):
  sde = SDES["vp"]
  mix = three_gaussians_mixture()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
  t = jnp.full((5,), 0.3)
  rev = sde.reverse(mix.score_fn(sde), probability_flow)
  drift, g = rev.sde(x, t)
  f, g_fwd = sde.sde(x, t)
  scale = 0.5 if probability_flow else 1.0
  expected = f - (g_fwd**2)[:, None] * mix.score(x, t, sde) * scale
  np.testing.assert_allclose(np.asarray(drift), np.asarray(expected), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g), 0.0 if probability_flow else np.asarray(g_fwd))


def test_sdes_are_static_hashable_and_validated():
  sde = SDES["vp"]
  assert sde == sde_lib.VPSDE(0.1, 20.0, 1000) and hash(sde) == hash(sde_lib.VPSDE())

  @functools.partial(jax.jit, static_argnums=0)
  def f(s, t):
    return s.sigma(t)

  assert float(f(sde, 0.5)) == pytest.approx(float(sde.sigma(0.5)))
  with pytest.raises(ValueError, match="vesde"):
    sde_lib.get_sde("vp")
  with pytest.raises(ValueError, match="linear"):
    sde_lib.VPSDE(schedule="bogus")
  with pytest.raises(ValueError, match="sigma_min"):
    sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)
  assert isinstance(sde_lib.get_sde("subvpsde", beta_max=10.0), sde_lib.SubVPSDE)
