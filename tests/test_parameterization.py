"""Network parameterizations: exact conversions (float64), the Gaussian optimum through every
parameterization, and training on the closed-form Gaussian problem recovers the score."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import gaussian_problem

from configs import default
from score_sde import losses, models
from score_sde import parameterization as param_lib
from score_sde import sde as sde_lib
from score_sde.run import experiment, networks

MU, S = gaussian_problem.MU, gaussian_problem.S  # data ~ N(MU, S^2 I) in 2 dimensions
NAMES = ("epsilon", "x0", "v", "score", "edm")
SDES = {"vp": lambda **kw: sde_lib.VPSDE(**kw), "subvp": lambda **kw: sde_lib.SubVPSDE(**kw),
        "ve": lambda **kw: sde_lib.VESDE(**kw)}


def _alpha_sigma(sde, t, x):
  return sde.alpha(t)[:, None], sde.sigma(t)[:, None]


@pytest.mark.parametrize("sde_name", SDES)
def test_conversions_are_exact_inverses(sde_name):
  with jax.enable_x64(True):
    sde = SDES[sde_name]()

    @jax.jit  # every (converted, expected) pair from one program (eager: one per operation)
    def pairs():
      k1, k2 = jax.random.split(jax.random.key(0))
      t = jnp.asarray([1e-3, 0.1, 0.5, 0.9, 1.0], jnp.float64)
      x0 = jax.random.normal(k1, (5, 3), jnp.float64)
      eps = jax.random.normal(k2, (5, 3), jnp.float64)
      alpha, sigma = _alpha_sigma(sde, t, x0)
      x = alpha * x0 + sigma * eps
      score = param_lib.eps_to_score(eps, sigma)  # grad log p_0t(x | x0)
      v = param_lib.eps_x0_to_v(eps, x0, alpha, sigma)
      pairs = [(param_lib.score_to_eps(score, sigma), eps),
               (param_lib.eps_to_x0(eps, x, alpha, sigma), x0),
               (param_lib.x0_to_eps(x0, x, alpha, sigma), eps),
               (param_lib.score_to_x0(score, x, alpha, sigma), x0),
               (param_lib.x0_to_score(x0, x, alpha, sigma), score),
               (param_lib.v_to_x0(v, x, alpha, sigma), x0),
               (param_lib.v_to_eps(v, x, alpha, sigma), eps)]
      if sde_name == "vp":  # Salimans & Ho's v = alpha eps - sigma x0 exactly
        pairs.append((v, alpha * eps - sigma * x0))
      # Every parameterization: its regression target turns back into x0 and the score.
      for name in NAMES:
        target = param_lib.target(name, x0, eps, alpha, sigma, 0.5)
        pairs.append((param_lib.output_to_x0(name, target, x, alpha, sigma, 0.5), x0))
        pairs.append((param_lib.output_to_score(name, target, x, alpha, sigma, 0.5), score))
      return pairs

    for a, b in pairs():
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


def test_edm_coefficients_are_karras_in_sigma_hat():
  """c_skip, c_out, c_in of Karras et al. (Table 1) at sigma_hat = sigma / alpha, acting on
  x_hat = x / alpha: D = c_skip x_hat + c_out F(c_in x_hat)."""
  with jax.enable_x64(True):
    sde, sd = sde_lib.VPSDE(), 0.5
    t = jnp.asarray([1e-3, 0.3, 1.0], jnp.float64)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    sh = sigma / alpha
    c_skip, c_out, c_in = param_lib.edm_coefficients(alpha, sigma, sd)
    np.testing.assert_allclose(c_skip * alpha, sd**2 / (sh**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_out, sh * sd / np.sqrt(sh**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_in * alpha, 1 / np.sqrt(sh**2 + sd**2), rtol=1e-12)


def _labels_to_t(sde, labels):
  if isinstance(sde, sde_lib.VESDE):
    return jnp.log(labels / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
  return labels / 999.0


def gaussian_network(sde, name, sigma_data=0.5):
  """A 'network' for Gaussian data N(m, exp(log_v) I): it reads t from its label, undoes the
  input scaling of `name` (written here from the papers' definitions), and outputs the
  posterior mean of `name`'s target. At (m, log_v) = (MU, log S^2) it is the optimal network."""
  def apply(params, x_in, labels):
    t = _labels_to_t(sde, labels)
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    if name == "edm":
      x = x_in * jnp.sqrt(sigma**2 + alpha**2 * sigma_data**2)
    elif name == "v":
      x = x_in * jnp.sqrt(alpha**2 + sigma**2)
    else:
      x = x_in
    v = jnp.exp(params["log_v"])
    centred = (x - alpha * params["m"]) / (alpha**2 * v + sigma**2)
    x0 = params["m"] + alpha * v * centred
    eps = sigma * centred  # = (x - alpha x0) / sigma, without its cancellation
    if name == "epsilon":
      return eps
    if name == "x0":
      return x0
    if name == "score":
      return -eps / sigma
    if name == "v":
      r = jnp.sqrt(alpha**2 + sigma**2)
      return alpha / r * eps - sigma / r * x0
    # EDM: D = c_skip x_hat + c_out F, in sigma_hat = sigma / alpha.
    sh, x_hat = sigma / alpha, x / alpha
    c_skip = sigma_data**2 / (sh**2 + sigma_data**2)
    c_out = sh * sigma_data / jnp.sqrt(sh**2 + sigma_data**2)
    return (x0 - c_skip * x_hat) / c_out
  return apply


def param_score_fn(sm, name):
  """`score_fn(params, x, t)` of `gaussian_network` through the conversions of `sm`, a
  `ScoreModel` with parameterization `name`."""
  net = gaussian_network(sm.sde, name, sm.sigma_data)

  def score_fn(params, x, t):
    output = net(params, sm.network_input(x, t), sm.noise_labels(t))
    return sm.output_to_score(output, x, t)
  return score_fn


def score_model(sde_name, name):
  """A `ScoreModel` of parameterization `name` on the SDE `sde_name`, for its conversions only
  (the 'network' is the function `gaussian_network`, called by `param_score_fn`)."""
  sde = SDES[sde_name]()
  return models.ScoreModel(gaussian_network(sde, name), sde, parameterization=name)


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("name", NAMES)
def test_optimal_network_gives_the_exact_score(sde_name, name):
  # float64: for sub-VP at t = 1e-3, sigma^2 = 1e-8, and a data prediction's score
  # (alpha x0 - x) / sigma^2 cancels all float32 digits (the network-side conversion is
  # only as good as the working precision there).
  with jax.enable_x64(True):
    sm = score_model(sde_name, name)
    sde = sm.sde

    @jax.jit  # one program (eager: one per operation)
    def score_and_exact():
      x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64) * 2.0
      t = jnp.asarray([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0], jnp.float64)
      params = {"m": jnp.asarray(MU), "log_v": jnp.asarray(math.log(S**2))}
      score = param_score_fn(sm, name)(params, x, t)
      alpha, sigma = _alpha_sigma(sde, t, x)
      return score, -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2)

    score, exact = score_and_exact()
    np.testing.assert_allclose(np.asarray(score), np.asarray(exact), rtol=1e-6)



@pytest.mark.slow
@pytest.mark.parametrize("sde_name,name,weighting,time_sampling", [
    ("vp", "epsilon", "sigma2", "uniform"), ("vp", "x0", "x0", "uniform"),
    ("vp", "v", "v", "uniform"), ("vp", "edm", "edm", "log_normal"),
    ("vp", "score", "sigma2", "uniform"), ("ve", "edm", "edm", "log_normal"),
    ("ve", "x0", "x0", "uniform"), ("subvp", "v", "v", "uniform")])
def test_training_each_parameterization_recovers_the_gaussian_score(sde_name, name, weighting,
                                                                    time_sampling):
  sm = score_model(sde_name, name)
  loss_fn = losses.get_loss_fn(sm.sde, weighting=weighting, eps=1e-3,
                               time_sampling=time_sampling, sigma_data=sm.sigma_data)
  score_fn = param_score_fn(sm, name)
  gaussian_problem.assert_recovers_the_data(gaussian_problem.fit(loss_fn, score_fn))


def test_score_fn_feeds_c_in_and_applies_the_preconditioning():
  config = default.get_config("tiny")
  config.data.image_size, config.data.num_channels = 8, 1
  # Any network shows what the wrapper feeds it and does with its output: one resolution,
  # no attention (a small program; compiled, not run op by op).
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.model.embedding_type = "positional"
  config.model.init_scale = 1.0  # a non-zero output layer, so F matters
  model = networks.get_model(config)
  variables = jax.jit(lambda k: networks.init_model(k, config, model))(jax.random.key(0))
  sde = sde_lib.VPSDE()
  sm = models.ScoreModel(model, sde, parameterization="edm", sigma_data=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.asarray([0.1, 0.7])
  alpha, sigma = sde.alpha(t)[:, None, None, None], sde.sigma(t)[:, None, None, None]
  norm = jnp.sqrt(sigma**2 + alpha**2 * 0.25)
  score, out = jax.jit(lambda v, x, t, norm: (
      sm.score_fn(v)(x, t), model.apply(v, x / norm, 999.0 * t, train=False)))(
          variables, x, t, norm)
  assert float(jnp.max(jnp.abs(out))) > 1e-2  # F is not ~0: the check below sees it
  denoised = alpha * 0.25 / norm**2 * x + sigma * 0.5 / norm * out
  np.testing.assert_allclose(np.asarray(score), np.asarray((alpha * denoised - x) / sigma**2),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="continuous"):
    models.ScoreModel(model, sde, parameterization="edm", sigma_data=0.5, continuous=False)


def test_bad_parameterizations():
  # ScoreModel(None, ...) only checks the settings.
  with pytest.raises(ValueError, match=r"'x0', 'v', 'score', 'edm'"):
    models.ScoreModel(None, sde_lib.VPSDE(), parameterization="noise")
  with pytest.raises(ValueError, match="sigma_data"):
    models.ScoreModel(None, sde_lib.VESDE(), parameterization="edm", sigma_data=0.0)
  # A data prediction cannot become a score without x_t: x is a required argument now.
  with pytest.raises(TypeError, match="x"):
    models.ScoreModel(None, sde_lib.VPSDE(), parameterization="x0").output_to_score(
        jnp.zeros((1, 2)), t=jnp.ones(1))
  # The native ones keep the discrete path.
  models.ScoreModel(None, sde_lib.VPSDE(), parameterization="epsilon", continuous=False)
  models.ScoreModel(None, sde_lib.VESDE(), parameterization="score", continuous=False)
  with pytest.raises(ValueError, match="training.continuous=True"):
    models.ScoreModel(None, sde_lib.VESDE(), parameterization="epsilon", continuous=False)


def _config(**changes) -> ml_collections.ConfigDict:
  config = default.get_config("tiny")
  for path, value in changes.items():
    section, field = path.split(".")
    config[section][field] = value
  return config


@pytest.mark.parametrize("changes,match", [
    ({"model.parameterization": "noise"}, r"config.model.parameterization 'noise'.*'edm'"),
    ({"model.schedule": "exp"}, r"config.model.schedule 'exp'.*'sigmoid'"),
    ({"training.time_sampling": "beta"}, r"time_sampling 'beta'.*'log_normal'"),
    ({"sampling.threshold": "soft"}, r"threshold 'soft'.*'dynamic'"),
    ({"model.parameterization": "x0", "model.scale_by_sigma": True}, "scale_by_sigma"),
    ({"model.parameterization": "v", "training.continuous": False}, "continuous"),
])
def test_config_checks_name_the_valid_values(changes, match):
  with pytest.raises(ValueError, match=match):
    experiment.check_config(_config(**changes))


def test_config_builds_the_parameterized_score_model():
  config = _config(**{"model.parameterization": "edm", "model.sigma_data": 0.3,
                      "model.schedule": "sigmoid"})
  sm = experiment.make_score_model(config, None)
  assert (sm.parameterization, sm.sigma_data, sm.sde.schedule) == ("edm", 0.3, "sigmoid")
