"""Learned variance in the `ddpm` sampler (Nichol & Dhariwal 2021, as DiT samples):
log sigma^2 = f log beta + (1 - f) log beta-tilde with f = (v + 1) / 2 from the network's
variance half. v fixed at +1 / -1 must be `variance='beta'` / `'posterior'` exactly (same key,
same noise), pixel by pixel; `ScoreModel.variance_fn` is the second half of a `learn_sigma`
DiT's output; the bad combinations are refused before tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from score_sde import models, sampling
from score_sde import sde as sde_lib
from score_sde.models.dit import DiT
from score_sde.run import experiment, networks, programs

SHAPE = (4, 4, 4, 2)


def point_mass_score(sde):
  """The exact score of data at a point (x0 = 0.3): the case where the true reverse step is
  the posterior q(x_s | x_t, x0), i.e. the optimum is v = -1."""
  def score_fn(x, t):
    mean, std = sde.marginal_prob(jnp.full_like(x, 0.3), t)
    return -(x - mean) / std.reshape(-1, *([1] * (x.ndim - 1))) ** 2
  return score_fn


def constant_v(value):
  return lambda x, t: jnp.full_like(x, value)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(N=100), sde_lib.SubVPSDE(N=100),
                                 sde_lib.VESDE(N=100)], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("v,fixed", [(1.0, "beta"), (-1.0, "posterior")])
def test_fixed_v_is_beta_or_posterior_exactly(sde, v, fixed):
  key = jax.random.key(0)
  score_fn = point_mass_score(sde)
  want, nfe_want = sampling.ddpm_sample(key, score_fn, sde, SHAPE, steps=20, variance=fixed,
                                        denoise=False)
  got, nfe = sampling.ddpm_sample(key, score_fn, sde, SHAPE, steps=20, variance="learned",
                                  var_interp_fn=constant_v(v), denoise=False)
  assert nfe == nfe_want == 20
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_v_is_per_pixel():
  """v = +1 on one half of the channels and -1 on the other gives each half its fixed
  sampler's values (to rounding: XLA fuses the per-pixel variance differently, 1 ulp)."""
  sde, key = sde_lib.VPSDE(N=100), jax.random.key(1)
  score_fn = point_mass_score(sde)
  common = dict(steps=10, denoise=False)
  beta, _ = sampling.ddpm_sample(key, score_fn, sde, SHAPE, variance="beta", **common)
  post, _ = sampling.ddpm_sample(key, score_fn, sde, SHAPE, variance="posterior", **common)
  half = lambda x, t: jnp.concatenate([jnp.ones_like(x[..., :1]), -jnp.ones_like(x[..., 1:])],
                                      axis=-1)
  mixed, _ = sampling.ddpm_sample(key, score_fn, sde, SHAPE, variance="learned",
                                  var_interp_fn=half, **common)
  np.testing.assert_allclose(np.asarray(mixed[..., :1]), np.asarray(beta[..., :1]),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(mixed[..., 1:]), np.asarray(post[..., 1:]),
                             rtol=1e-6, atol=1e-7)
  assert not np.array_equal(np.asarray(beta), np.asarray(post))


def test_one_step_variance_is_the_interpolation():
  """Two levels t = 0.2 -> 0.1 -> data, x_T = 0, a zero score, denoise=True (no noise on the
  last step): the output is sqrt(var) z / alpha(0.1), with var = beta^f beta-tilde^(1 - f)
  of the step 0.2 -> 0.1 (beta-tilde / beta = sigma(0.1)^2 / sigma(0.2)^2 = 0.30 here)."""
  sde, f, n = sde_lib.VPSDE(N=1000), 0.25, 40_000
  ts = np.asarray([0.2, 0.1])
  zero_score = lambda x, t: jnp.zeros_like(x)
  out, _ = sampling.ddpm_sample(jax.random.key(2), zero_score, sde, (n, 1), grid=ts,
                                variance="learned", var_interp_fn=constant_v(2 * f - 1),
                                x_T=jnp.zeros((n, 1)))
  (a_t, s_t), (a_s, s_s) = [
      [float(np.asarray(v).reshape(-1)[0]) for v in sde.marginal_prob(jnp.ones((1, 1)),
                                                                     jnp.asarray([t]))]
      for t in ts]
  beta = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
  beta_tilde = beta * s_s ** 2 / s_t ** 2
  want = np.sqrt(beta ** f * beta_tilde ** (1 - f)) / a_s
  got = float(np.std(np.asarray(out, np.float64)))
  assert abs(got / want - 1) < 0.02, (got, want)  # sampling error ~0.4% at n = 40,000
  for other in (np.sqrt(beta), np.sqrt(beta_tilde)):  # both at least 10% away
    assert abs(got / (other / a_s) - 1) > 0.1


def test_options_are_checked():
  sde = sde_lib.VPSDE(N=10)
  score_fn = point_mass_score(sde)
  with pytest.raises(ValueError, match="var_interp_fn"):
    sampling.ddpm_sample(jax.random.key(0), score_fn, sde, SHAPE, variance="learned")
  with pytest.raises(ValueError, match="only with variance='learned'"):
    sampling.ddpm_sample(jax.random.key(0), score_fn, sde, SHAPE, variance="beta",
                         var_interp_fn=constant_v(0.0))
  with pytest.raises(ValueError, match=r"'beta', 'learned', 'posterior'"):
    sampling.ddpm_sample(jax.random.key(0), score_fn, sde, SHAPE, variance="fixed")


def test_variance_fn_of_a_learn_sigma_dit():
  """`variance_fn` is channels C..2C of the network's output; the sampler runs on it."""
  net = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=0,
            learn_sigma=True)
  sde = sde_lib.VPSDE(N=50)
  sm = models.ScoreModel(net, sde)
  variables = models.init_network(jax.random.key(0), net, (8, 8, 4))
  # Non-zero final layer, so that both halves of the output are non-trivial.
  variables = jax.tree_util.tree_map(lambda a: a + 0.01, variables)
  x, t = jnp.ones((2, 8, 8, 4)), jnp.array([0.2, 0.7])
  out = sm.apply(variables, x, t)
  np.testing.assert_array_equal(sm.variance_fn(variables)(x, t), out[..., 4:])
  samples, nfe = sampling.ddpm_sample(jax.random.key(1), sm.score_fn(variables), sde,
                                      (2, 8, 8, 4), steps=5, variance="learned",
                                      var_interp_fn=sm.variance_fn(variables))
  assert nfe == 5 and np.all(np.isfinite(samples))
  plain = models.ScoreModel(DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                num_classes=0, learn_sigma=False), sde)
  plain_vars = models.init_network(jax.random.key(0), plain.network, (8, 8, 4))
  with pytest.raises(ValueError, match="learned variance"):
    plain.variance_fn(plain_vars)(x, t)


def learned_dit_config(variance="learned"):
  config = default.get_config()
  config.model.update(name="dit", patch_size=2, hidden_size=32, depth=1, num_heads=2,
                      learn_sigma=True)
  config.data.update(image_size=8, num_channels=2)
  config.sampling.update(method="ddpm", steps=5, variance=variance)
  return config


def test_config_path_uses_the_networks_variance():
  """`config.sampling.variance='learned'` reaches ddpm through `programs.make_sample_fn`: a
  DiT whose variance half is +1 everywhere samples as variance='beta' (same key), and not as
  'posterior'."""
  spec = experiment.run_spec(learned_dit_config())
  variables = jax.jit(lambda k: networks.init_model(k, learned_dit_config()))(jax.random.key(0))
  bias = np.zeros((2, 2, 4), np.float32)
  bias[..., 2:] = 1.0  # (i, j, c) per token, c fastest: the variance channels C..2C
  final = dict(variables["params"]["final_layer_linear"], bias=jnp.asarray(bias.reshape(-1)))
  variables = {**variables, "params": {**variables["params"], "final_layer_linear": final}}
  shape = (2, 8, 8, 2)
  method, options = experiment.sampler_settings(learned_dit_config())
  assert options["variance"] == "learned"
  got, nfe = programs.make_sample_fn(spec, shape, method, options)(variables, jax.random.key(3))
  beta_options = {**options, "variance": "beta"}
  want, _ = programs.make_sample_fn(spec, shape, method, beta_options)(variables,
                                                                         jax.random.key(3))
  assert int(nfe) == 5
  # Equal up to float32 rounding through 5 steps (measured 2e-6; posterior differs by > 1e-3).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
  posterior = {**options, "variance": "posterior"}
  other, _ = programs.make_sample_fn(spec, shape, method, posterior)(variables,
                                                                     jax.random.key(3))
  assert not np.allclose(np.asarray(other), np.asarray(want), atol=1e-3)


def test_config_learned_variance_needs_learn_sigma():
  experiment.check_config(learned_dit_config())
  config = learned_dit_config()
  config.model.learn_sigma = False
  with pytest.raises(ValueError, match="variance='learned' needs a network with learned"):
    experiment.check_config(config)
  config = default.get_config()
  config.sampling.update(method="ddpm", variance="learned")
  with pytest.raises(ValueError, match=r"name='ncsnpp', learn_sigma=False"):
    experiment.check_config(config)
  config.sampling.variance = "fixed"
  with pytest.raises(ValueError, match="variance"):
    experiment.check_config(config)
