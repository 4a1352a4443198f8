"""Rectified flow and TrigFlow as SDEs, the velocity parameterization, the flow-matching loss,
logit-normal times and likelihoods from t_max: closed forms (float64), exact inverses, the
closed-form Gaussian problem and exact Gaussian-mixture densities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

import gaussian_problem

from score_sde import likelihood, losses, mixtures
from score_sde import parameterization as param_lib
from score_sde import sde as sde_lib

MU, S = gaussian_problem.MU, gaussian_problem.S  # data ~ N(MU, S^2 I) in 2 dimensions
TIMES = np.array([1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999])
FLOWS = {"rectified_flow": sde_lib.RectifiedFlow(), "trigflow": sde_lib.TrigFlow()}
ALL = {**FLOWS, "vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE(),
       "vp_cosine": sde_lib.VPSDE(schedule="cosine")}


def _reference(name, t):
  """(alpha, sigma, d_alpha, d_sigma) of the interpolants from their definitions, float64."""
  if name == "rectified_flow":
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)
  a = np.pi * t / 2
  return np.cos(a), np.sin(a), -np.pi / 2 * np.sin(a), np.pi / 2 * np.cos(a)


def _log_alpha_reference(name, t):
  """log alpha in float64 without cancellation: log1p(-t), or log cos's Taylor series where
  cos a is within 5e-3 of 1."""
  if name == "rectified_flow":
    return np.log1p(-t)
  a = np.pi * t / 2
  series = -(a**2 / 2 + a**4 / 12 + a**6 / 45 + 17 * a**8 / 2520 + 31 * a**10 / 14175)
  return np.where(a < 0.1, series, np.log(np.cos(a)))


def _f64(v):
  return np.asarray(v, np.float64)


@pytest.mark.parametrize("name", FLOWS)
def test_kernel_drift_and_diffusion_match_closed_forms(name):
  sde = FLOWS[name]
  with jax.enable_x64(True):
    t = jnp.asarray(TIMES)
    alpha, sigma, d_alpha, d_sigma = _reference(name, TIMES)
    np.testing.assert_allclose(_f64(sde.alpha(t)), alpha, rtol=1e-12)
    np.testing.assert_allclose(_f64(sde.sigma(t)), sigma, rtol=1e-12)
    np.testing.assert_allclose(_f64(sde.log_alpha(t)), _log_alpha_reference(name, TIMES),
                               rtol=1e-12)
    np.testing.assert_allclose(_f64(sde.d_alpha(t)), d_alpha, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(_f64(sde.d_sigma(t)), d_sigma, rtol=1e-12)
    log_snr = _log_alpha_reference(name, TIMES) - np.log(sigma)
    np.testing.assert_allclose(_f64(sde.log_snr(t)), log_snr, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_f64(sde.t_from_log_snr(jnp.asarray(log_snr))), TIMES,
                               rtol=1e-10)
    # Drift and diffusion implied by the kernel: f = d log alpha / dt,
    # g^2 = d sigma^2 / dt - 2 f sigma^2.
    f = d_alpha / alpha
    g2 = 2 * sigma * d_sigma - 2 * f * sigma**2
    x = jnp.asarray(np.linspace(-2, 2, 2 * len(TIMES)).reshape(len(TIMES), 2))
    drift, g = sde.sde(x, t)
    np.testing.assert_allclose(_f64(drift), f[:, None] * _f64(x), rtol=1e-10)
    np.testing.assert_allclose(_f64(g) ** 2, g2, rtol=1e-10)
    assert np.all(g2 > 0)
    mean, std = sde.marginal_prob(x, t)
    np.testing.assert_allclose(_f64(mean), alpha[:, None] * _f64(x), rtol=1e-12)
    np.testing.assert_allclose(_f64(std), sigma, rtol=1e-12)
  # Their closed forms: rectified flow g^2 = 2t / (1 - t), TrigFlow g^2 = pi tan(pi t / 2).
  closed = 2 * TIMES / (1 - TIMES) if name == "rectified_flow" else np.pi * np.tan(
      np.pi * TIMES / 2)
  np.testing.assert_allclose(g2, closed, rtol=1e-10)
  assert sde.T == 1.0 and sde.t_max == pytest.approx(1 - 1e-3, abs=0)
  assert not sde.constant_alpha and sde_lib.get_sde(name) == sde


@pytest.mark.parametrize("name", FLOWS)
def test_float32_ends_keep_their_digits(name):
  """Near t = 0 (log alpha ~ -t) and t = t_max (alpha ~ 1e-3) float32 keeps ~6 digits."""
  sde = FLOWS[name]
  t32 = np.array([1e-7, 1e-4, 0.998, 0.999], np.float32)
  alpha, sigma, _, _ = _reference(name, t32.astype(np.float64))
  log_alpha = _log_alpha_reference(name, t32.astype(np.float64))
  np.testing.assert_allclose(_f64(sde.log_alpha(jnp.asarray(t32))), log_alpha, rtol=2e-6)
  np.testing.assert_allclose(_f64(sde.alpha(jnp.asarray(t32))), alpha, rtol=2e-6)
  np.testing.assert_allclose(_f64(sde.log_snr(jnp.asarray(t32))), log_alpha - np.log(sigma),
                             rtol=2e-6)


def test_t_max_is_t_for_the_diffusions():
  for name in ("vp", "subvp", "ve"):
    assert ALL[name].t_max == ALL[name].T == 1.0


@pytest.mark.parametrize("name", ALL)
def test_derivatives_of_alpha_and_sigma(name):
  """d_alpha, d_sigma against central differences (every process; the base class's
  forward-mode derivative for VP / sub-VP / VE), and the moment equations of the linear SDE
  dx = f x dt + g dw: alpha' = f alpha and (sigma^2)' = 2 f sigma^2 + g^2."""
  sde = ALL[name]
  with jax.enable_x64(True):
    t = jnp.asarray([0.01, 0.2, 0.5, 0.8, 0.99])
    h = 1e-6
    fd_alpha = (_f64(sde.alpha(t + h)) - _f64(sde.alpha(t - h))) / (2 * h)
    fd_sigma = (_f64(sde.sigma(t + h)) - _f64(sde.sigma(t - h))) / (2 * h)
    d_alpha, d_sigma = _f64(sde.d_alpha(t)), _f64(sde.d_sigma(t))
    np.testing.assert_allclose(d_alpha, fd_alpha, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d_sigma, fd_sigma, rtol=1e-6, atol=1e-9)
    # The closed forms of the interpolants equal the base class's forward-mode derivative.
    np.testing.assert_allclose(_f64(sde_lib.SDE.d_alpha(sde, t)), d_alpha, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(_f64(sde_lib.SDE.d_sigma(sde, t)), d_sigma, rtol=1e-12)
    drift, g = sde.sde(jnp.ones((5, 1)), t)
    f = _f64(drift)[:, 0]
    alpha, sigma = _f64(sde.alpha(t)), _f64(sde.sigma(t))
    np.testing.assert_allclose(d_alpha, f * alpha, rtol=1e-9, atol=1e-12)
    if name != "ve":  # VE's kernel std is sigma(t), not sqrt(sigma^2 - sigma_min^2) (documented)
      np.testing.assert_allclose(2 * sigma * d_sigma, 2 * f * sigma**2 + _f64(g) ** 2,
                                 rtol=1e-9)


@pytest.mark.parametrize("name", FLOWS)
def test_prior(name):
  sde = FLOWS[name]
  z = sde.prior_sampling(jax.random.key(0), (20000, 3))
  assert z.shape == (20000, 3)
  assert abs(float(jnp.mean(z))) < 0.02 and abs(float(jnp.std(z)) - 1.0) < 0.02
  zs = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
  np.testing.assert_allclose(sde.prior_logp(zs), stats.norm.logpdf(np.asarray(zs)).sum(-1),
                             rtol=1e-6)


# --- velocity ---------------------------------------------------------------------------------


def _scalars(sde, t, x):
  return tuple(v[:, None] for v in (sde.alpha(t), sde.sigma(t), sde.d_alpha(t), sde.d_sigma(t)))


@pytest.mark.parametrize("name", ["rectified_flow", "trigflow", "vp", "ve"])
def test_velocity_conversions_are_exact_inverses(name):
  sde = ALL[name]
  with jax.enable_x64(True):
    k1, k2 = jax.random.split(jax.random.key(0))
    t = jnp.asarray([1e-3, 0.1, 0.5, 0.9, sde.t_max])
    x0 = jax.random.normal(k1, (5, 3), jnp.float64)
    eps = jax.random.normal(k2, (5, 3), jnp.float64)
    alpha, sigma, d_alpha, d_sigma = _scalars(sde, t, x0)
    x = alpha * x0 + sigma * eps
    score = param_lib.eps_to_score(eps, sigma)  # grad log p_0t(x | x0)
    d = dict(d_alpha=d_alpha, d_sigma=d_sigma)
    close = lambda a, b: np.testing.assert_allclose(_f64(a), _f64(b), rtol=1e-9, atol=1e-9)
    velocity = d_alpha * x0 + d_sigma * eps  # dx_t / dt, from the definition
    close(param_lib.eps_x0_to_velocity(eps, x0, d_alpha, d_sigma), velocity)
    close(param_lib.x0_to_velocity(x0, x, alpha, sigma, d_alpha, d_sigma), velocity)
    close(param_lib.eps_to_velocity(eps, x, alpha, sigma, d_alpha, d_sigma), velocity)
    close(param_lib.score_to_velocity(score, x, alpha, sigma, d_alpha, d_sigma), velocity)
    close(param_lib.velocity_to_x0(velocity, x, alpha, sigma, d_alpha, d_sigma), x0)
    close(param_lib.velocity_to_eps(velocity, x, alpha, sigma, d_alpha, d_sigma), eps)
    close(param_lib.velocity_to_score(velocity, x, alpha, sigma, d_alpha, d_sigma), score)
    target = param_lib.target("velocity", x0, eps, alpha, sigma, 0.5, **d)
    close(target, velocity)
    close(param_lib.output_to_x0("velocity", target, x, alpha, sigma, 0.5, **d), x0)
    close(param_lib.output_to_score("velocity", target, x, alpha, sigma, 0.5, **d), score)
    close(param_lib.network_input("velocity", x, alpha, sigma, 0.5, **d), x)
    # The identity: velocity = f x - g^2 / 2 score (the probability-flow drift), f and g from
    # the SDE itself.
    drift, g = sde.sde(x, t)
    close(drift - 0.5 * (g**2)[:, None] * score, velocity)


@pytest.mark.parametrize("name", ["rectified_flow", "trigflow", "vp"])
def test_velocity_of_the_exact_score_is_the_probability_flow_drift(name):
  """For mixture data E[alpha' x0 + sigma' z | x_t] (from the exact posterior of each
  component) equals f x - g^2 / 2 grad log p_t(x) (reverse(probability_flow=True).sde)."""
  sde = ALL[name]
  mix = mixtures.three_gaussians_mixture()
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64) * 1.5
    t = jnp.asarray([1e-3, 0.1, 0.3, 0.6, 0.9, sde.t_max])
    alpha, sigma, d_alpha, d_sigma = _scalars(sde, t, x)
    r = mix.responsibilities(x, t, sde)  # [B, K]
    mu, s2 = jnp.asarray(mix.means), jnp.asarray(mix.stds) ** 2
    var = alpha**2 * s2[None] + sigma**2  # [B, K]
    x0_k = mu[None] + (alpha * s2[None] / var)[..., None] * (x[:, None] - alpha[..., None]
                                                              * mu[None])
    eps_k = (x[:, None] - alpha[..., None] * x0_k) / sigma[..., None]
    velocity = jnp.sum(r[..., None] * (d_alpha[..., None] * x0_k + d_sigma[..., None] * eps_k),
                       axis=1)
    drift, _ = sde.reverse(mix.score_fn(sde), probability_flow=True).sde(x, t)
    np.testing.assert_allclose(_f64(drift), _f64(velocity), rtol=1e-8, atol=1e-8)


def test_velocity_needs_the_derivatives():
  x = jnp.ones((2, 3))
  a = s = jnp.full((2, 1), 0.5)
  for fn in (lambda: param_lib.output_to_score("velocity", x, x, a, s, 0.5),
             lambda: param_lib.output_to_x0("velocity", x, x, a, s, 0.5, d_alpha=a),
             lambda: param_lib.target("velocity", x, x, a, s, 0.5, d_sigma=s)):
    with pytest.raises(ValueError, match="d_alpha and d_sigma"):
      fn()
  with pytest.raises(ValueError, match=r"\['d_sigma'\]"):
    param_lib.output_to_x0("velocity", x, x, a, s, 0.5, d_alpha=a)
  with pytest.raises(ValueError, match="'edm', 'velocity'"):
    param_lib.check_name("flow")
  # The other parameterizations do not need them.
  np.testing.assert_allclose(param_lib.output_to_score("epsilon", x, x, a, s, 0.5), -x / s)


def _velocity_network(sde):
  """The score model of a 'velocity' network that outputs E[alpha' x0 + sigma' z | x_t] for
  Gaussian data N(m, exp(log_v) I); at (MU, log S^2) it is the exact velocity."""
  def velocity(params, x, t):
    alpha, sigma, d_alpha, d_sigma = _scalars(sde, t, x)
    v = jnp.exp(params["log_v"])
    centred = (x - alpha * params["m"]) / (alpha**2 * v + sigma**2)
    x0 = params["m"] + alpha * v * centred
    return d_alpha * x0 + d_sigma * sigma * centred

  def score_fn(params, x, t):
    alpha, sigma, d_alpha, d_sigma = _scalars(sde, t, x)
    return param_lib.output_to_score("velocity", velocity(params, x, t), x, alpha, sigma, 0.5,
                                     d_alpha=d_alpha, d_sigma=d_sigma)
  return velocity, score_fn


TRUE_PARAMS = {"m": jnp.asarray(MU, jnp.float32), "log_v": jnp.asarray(math.log(S**2))}


@pytest.mark.parametrize("name", ["rectified_flow", "trigflow", "vp"])
def test_flow_matching_loss_at_the_exact_velocity_matches_closed_form(name):
  """E || v*(x_t) - (alpha' x0 + sigma' z) ||^2 / D = W^2 S^2 / (alpha^2 S^2 + sigma^2) per t,
  W = alpha sigma' - sigma alpha' (the conditional variance of the velocity target given
  x_t, from the definitions), averaged over t ~ U(eps, t_max)."""
  sde, eps = ALL[name], 1e-3
  loss_fn = losses.get_loss_fn(sde, weighting="flow_matching", eps=eps)
  _, score_fn = _velocity_network(sde)

  @jax.jit
  def draws(key):
    k_x, k_l = jax.random.split(key)
    return loss_fn(k_l, score_fn, TRUE_PARAMS, gaussian_problem.data(k_x, 8192))[1]
  aux = [draws(k) for k in jax.random.split(jax.random.key(0), 8)]
  per_example = np.concatenate([np.asarray(a["per_example_loss"]) for a in aux])
  t = np.concatenate([np.asarray(a["t"]) for a in aux])
  assert t.min() >= np.float32(eps) and t.max() <= np.float32(sde.t_max)

  # One compiled program, called by quad hundreds of times (eager, every call ran its
  # operations one by one).
  coefficients = jax.jit(lambda tt: (sde.alpha(tt), sde.sigma(tt), sde.d_alpha(tt),
                                     sde.d_sigma(tt)))

  def integrand(u):
    with jax.enable_x64(True):
      tt = jnp.asarray([u])
      a, s, da, ds = (float(v[0]) for v in coefficients(tt))
    return (a * ds - s * da) ** 2 * S**2 / (a**2 * S**2 + s**2)
  expected = integrate.quad(integrand, eps, sde.t_max, limit=200)[0] / (sde.t_max - eps)
  se = per_example.std() / math.sqrt(per_example.size)
  assert abs(per_example.mean() - expected) < 4 * se + 1e-3 * expected, (
      per_example.mean(), expected, se)


@pytest.mark.parametrize("name,time_sampling", [("rectified_flow", "logit_normal"),
                                                ("trigflow", "uniform")])
def test_training_the_velocity_recovers_the_exact_velocity(name, time_sampling):
  sde = FLOWS[name]
  loss_fn = losses.get_loss_fn(sde, weighting="flow_matching", eps=1e-3,
                               time_sampling=time_sampling)
  velocity, score_fn = _velocity_network(sde)
  params = gaussian_problem.fit(loss_fn, score_fn, steps=400)
  gaussian_problem.assert_recovers_the_data(params)
  x = jax.random.normal(jax.random.key(3), (4, 2)) + jnp.asarray(MU, jnp.float32)
  t = jnp.asarray([0.05, 0.3, 0.7, 0.95])
  fitted, exact = velocity(params, x, t), velocity(TRUE_PARAMS, x, t)
  np.testing.assert_allclose(np.asarray(fitted), np.asarray(exact), atol=0.06)


# --- time sampling and the likelihood weighting ------------------------------------------------


def test_logit_normal_times():
  """logit t ~ N(p_mean, p_std^2): moments, the CDF at three points, and the clipping mass at
  t_max (p_std = 3 puts 1.5% of the draws beyond logit(1 - 1e-3) = 6.9)."""
  sde = sde_lib.RectifiedFlow()
  sampler = losses.LogitNormalSampler(sde, 1e-3, 0.5, 3.0)
  t = np.asarray(sampler.sample(jax.random.key(0), 200_000), np.float64)
  t_min, t_max = np.float32(1e-3), np.float32(sde.t_max)
  assert t.min() >= t_min and t.max() <= t_max
  logit_max, logit_min = special.logit(sde.t_max), special.logit(1e-3)
  for c in (0.1, 0.5, 0.9):
    assert abs(np.mean(t <= c) - stats.norm.cdf(special.logit(c), 0.5, 3.0)) < 0.004
  assert abs(np.mean(t >= t_max) - stats.norm.sf(logit_max, 0.5, 3.0)) < 0.002
  assert abs(np.mean(t <= t_min) - stats.norm.cdf(logit_min, 0.5, 3.0)) < 0.002
  # SD3's defaults (0, 1) when p_mean / p_std are not given, through get_loss_fn.
  loss_fn = losses.get_loss_fn(sde, weighting="flow_matching", time_sampling="logit_normal")
  _, score_fn = _velocity_network(sde)
  aux = jax.jit(lambda k: loss_fn(k, score_fn, TRUE_PARAMS,
                                  gaussian_problem.data(k, 50_000))[1])(jax.random.key(1))
  logit = special.logit(np.asarray(aux["t"], np.float64))
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03


def test_likelihood_weighting_integrates_up_to_t_max():
  """For rectified flow g^2 / sigma^2 = 2 / (t (1 - t)), so the importance sampler's
  normalizer is 2 (logit(t_max) - logit(eps)) and its CDF 2 (logit t - logit eps) / Z."""
  sde, eps = sde_lib.RectifiedFlow(), 1e-3
  sampler = losses.ImportanceSampler(sde, eps)
  z = 2 * (special.logit(sde.t_max) - special.logit(eps))
  assert sampler.normalizer == pytest.approx(z, rel=1e-4)
  t = np.asarray(sampler.sample(jax.random.key(3), 200_000))
  assert t.max() <= np.float32(sde.t_max)
  for c in (0.01, 0.5, 0.99):
    assert abs(np.mean(t < c) - 2 * (special.logit(c) - special.logit(eps)) / z) < 0.005
  loss_fn = losses.get_loss_fn(sde, weighting="likelihood", eps=eps, importance_sampling=True)
  _, score_fn = _velocity_network(sde)
  loss, _ = jax.jit(lambda k: loss_fn(k, score_fn, TRUE_PARAMS,
                                      gaussian_problem.data(k, 1024)))(jax.random.key(0))
  assert np.isfinite(float(loss))


# --- likelihood from t_max ----------------------------------------------------------------------

EPS = 1e-5


@pytest.mark.parametrize("name", FLOWS)
def test_bits_per_dim_matches_the_mixture_log_density(name):
  sde = FLOWS[name]
  mixture = mixtures.three_gaussians_mixture()
  with jax.enable_x64(True):
    x, _ = mixture.sample(jax.random.key(1), 6)
    x = x.astype(jnp.float64)
    logp, z, nfe = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.key(0), mixture.score_fn(sde), sde, x, divergence="exact", eps=EPS,
        rtol=1e-7, atol=1e-7))(x)
    exact = mixture.log_prob(x, EPS, sde)
    bpd = likelihood.bits_per_dim(logp, x.shape[1:], offset=0.0)
    exact_bpd = likelihood.bits_per_dim(exact, x.shape[1:], offset=0.0)
    # Raw: the ODE error plus the prior mismatch at t_max (p_t_max = N(1e-3 x0, 0.999^2 I)
    # for rectified flow, against N(0, I)).
    err_bpd = np.abs(_f64(bpd - exact_bpd))
    assert err_bpd.max() < 0.01, err_bpd
    # With the exact p_t_max in place of the prior only the solver's error remains.
    transported = logp - sde.prior_logp(z) + mixture.log_prob(z, sde.t_max, sde)
    err = np.abs(_f64(transported - exact)) / mixture.dim
    assert err.max() < 1e-4, err
    assert int(nfe) > 6


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input():
  with pytest.raises(ValueError, match="rectified_flow.*trigflow|trigflow"):
    sde_lib.get_sde("flow")
  with pytest.raises(ValueError, match="N must be"):
    sde_lib.RectifiedFlow(N=0)
  with pytest.raises(ValueError, match="'log_normal', 'logit_normal'"):
    losses.get_loss_fn(sde_lib.RectifiedFlow(), time_sampling="beta")
  with pytest.raises(ValueError, match="flow_matching"):
    losses.get_loss_fn(sde_lib.RectifiedFlow(), weighting="velocity")
  with pytest.raises(ValueError, match="t_max"):
    losses.get_loss_fn(sde_lib.RectifiedFlow(), eps=0.9995)
  with pytest.raises(ValueError, match="p_std"):
    losses.get_loss_fn(sde_lib.RectifiedFlow(), time_sampling="logit_normal", p_std=0.0)
  with pytest.raises(ValueError, match="continuous weighting"):
    losses.get_loss_fn(sde_lib.VPSDE(), weighting="ddpm", time_sampling="logit_normal")
  with pytest.raises(ValueError, match="no discrete chain"):
    losses.get_loss_fn(sde_lib.TrigFlow(), weighting="ddpm")
  mixture = mixtures.three_gaussians_mixture()
  with pytest.raises(ValueError, match="t_max"):
    likelihood.log_likelihood(jax.random.key(0), mixture.score_fn(sde_lib.TrigFlow()),
                              sde_lib.TrigFlow(), jnp.zeros((2, 2)), eps=0.9995)
