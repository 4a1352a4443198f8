"""The path helpers of the lecture figures (`score_sde.trajectories`) and the sampler panel's
pixel statistics (`score_sde.run.figures`), against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sampling, trajectories
from score_sde import sde as sde_lib
from score_sde.run import figures


def test_slerp_ends_and_angles():
  """slerp(z0, z1, w) is z0 at w = 0, z1 at w = 1, and for orthogonal unit vectors the point
  at angle w pi / 2: (cos, sin)."""
  z0 = jnp.asarray([[1.0, 0.0, 0.0]])
  z1 = jnp.asarray([[0.0, 1.0, 0.0]])
  w = jnp.asarray([0.0, 1.0 / 3.0, 1.0])
  out = np.asarray(trajectories.slerp(z0, z1, w))[:, 0]
  angle = np.pi / 6
  np.testing.assert_allclose(out, [[1, 0, 0], [np.cos(angle), np.sin(angle), 0], [0, 1, 0]],
                             atol=1e-6)


def test_ddim_trajectory_is_the_ddim_sampler():
  """The recorded trajectory ends where `ddim_sample` (without the final denoising) ends, and
  its x0 estimates are Tweedie's, checked with an exact Gaussian score."""
  sde = sde_lib.VPSDE()
  mean, std = 0.5, 0.3

  def score_fn(x, t):
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    return -(x - alpha * mean) / (alpha**2 * std**2 + sigma**2)

  x_T = jax.random.normal(jax.random.key(0), (4, 2))
  ts, xs, x0s = trajectories.ddim_trajectory(score_fn, sde, x_T, 10, 1e-3)
  assert xs.shape == (10, 4, 2) and x0s.shape == (10, 4, 2)
  np.testing.assert_allclose(np.asarray(xs[0]), np.asarray(x_T))
  alpha, sigma = sde.alpha(ts[3]), sde.sigma(ts[3])
  tweedie = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (xs[3] - alpha * mean)
  np.testing.assert_allclose(np.asarray(x0s[3]), np.asarray(tweedie), rtol=1e-4, atol=1e-5)
  # One more step from the last recorded state reaches ddim_sample's end point.
  t, s = ts[-1], 1e-3
  x_last = sde.alpha(s) * x0s[-1] + sde.sigma(s) * (xs[-1] - sde.alpha(t) * x0s[-1]) / sde.sigma(t)
  expected, _ = sampling.ddim_sample(jax.random.key(1), score_fn, sde, x_T.shape, steps=10,
                                     denoise=False, x_T=x_T)
  np.testing.assert_allclose(np.asarray(x_last), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_pixel_stats():
  x = np.array([-0.1, 0.0, 0.5, 1.0, 1.04, 1.2]).reshape(1, 2, 3, 1)
  stats = figures.pixel_stats(x)
  assert stats["saturated"] == pytest.approx(2 / 6)
  assert stats["mean"] == pytest.approx(x.mean()) and stats["std"] == pytest.approx(x.std())


def test_unknown_sampler_names_the_valid_ones():
  with pytest.raises(ValueError, match="'rk45'.*ddim"):
    figures.check_samplers(["ddim", "rk45"])


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.VESDE()], ids=["vp", "ve"])
def test_demo_sampler_settings_are_valid_options(sde):
  # Every panel entry, unipc and deis included, passes the samplers' one option check.
  assert {"unipc", "deis"} <= set(figures.DEMO_SAMPLERS)
  for method, options in figures.DEMO_SAMPLERS.items():
    sampling.check_options(sde, method, options)
