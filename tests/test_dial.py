"""The dial `sampling.sde_sample` (method "sde"): dx = [f - (1 + w^2) / 2 g^2 s] dt + w g dW.

- w = 0 is the fixed-step probability-flow ODE (`ode_sample` with the same solver and steps),
  on every process in `sde.SDES`, Euler and Heun, with and without the Tweedie step. Compared
  in float64 against the largest |x| (not entry by entry: an output entry near 0 turns a
  1e-15 round-off into a large relative error, see `test_w0_equals_the_fixed_step_ode`).
- Any w samples the exact mixture: mean, covariance and mode weights of 5,000 draws at
  w = 0, 0.5, 1, 2, with a negative control: a sampler that wrote w^2 as w (drift
  (1 + w) / 2 g^2 s) is the right sampler driven by the score times (1 + w) / (1 + w^2),
  1.2 at w = 0.5 and 0.6 at w = 2; the same checks must reject it (at w = 0 and 1 the two
  agree, so those values alone cannot tell).
- Heun is second order at w = 0, Euler first order (against a float64 Dopri8 solution).
- Bad w and solver: a ValueError naming the value (and the valid solvers), before tracing.
"""

from __future__ import annotations

import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import mixtures, sampling
from score_sde import sde as sde_lib
from tests.compiled import compiled

MIX = mixtures.three_gaussians_mixture()
PROCESSES = sorted(sde_lib.SDES)


def _exact_moments(mix):
  """Mean [D] and covariance [D, D] of an isotropic Gaussian mixture, in closed form."""
  w, mu, s = (np.asarray(v, np.float64) for v in (mix.weights, mix.means, mix.stds))
  mean = w @ mu
  second = sum(wk * (np.outer(m, m) + sk**2 * np.eye(mix.dim)) for wk, m, sk in zip(w, mu, s))
  return mean, second - np.outer(mean, mean)


# ---------------------------------------------------------------------------------------
# w = 0 is the fixed-step probability-flow ODE
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoise"])
@pytest.mark.parametrize("solver", sampling.SDE_SOLVERS)
@pytest.mark.parametrize("name", PROCESSES)
def test_w0_equals_the_fixed_step_ode(name, solver, denoise):
  """Same path and NFE as `ode_sample(steps=12, solver=...)` from the same x_T, to float64
  round-off.

  The two integrate the same vector field on the same grid but round differently: the dial
  takes its times from one linspace, diffrax accumulates t + dt, and the Heun stages are
  summed in another order. Measured (this file's set-up, 256 draws, 10-1000 steps): the
  largest difference is <= 1.5e-14 on every process, denoised or not; entry by entry
  the relative difference reaches 2.5e-10 (vpsde, 50 steps) at an output entry of 2e-8,
  which is how a per-entry `rtol` (numpy's default atol = 0) sees a 1e-15 round-off as a
  1e-8-sized "discrepancy". The bound: 1e-12 of max |x| (a few hundred ulps)."""
  sde = sde_lib.get_sde(name)
  with jax.enable_x64(True):
    score_fn = MIX.score_fn(sde)
    x_T = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)

    @jax.jit  # both samplers, one program
    def both(key, x_T):
      kw = dict(steps=12, solver=solver, x_T=x_T, denoise=denoise)
      return (sampling.sample(key, score_fn, sde, (64, 2), method="sde", w=0.0, **kw),
              sampling.sample(key, score_fn, sde, (64, 2), method="ode", **kw))

    (x, nfe), (ref, ref_nfe) = both(jax.random.key(0), x_T)
    x, ref = np.asarray(x), np.asarray(ref)
  assert x.dtype == np.float64 and ref.dtype == np.float64
  assert int(nfe) == int(ref_nfe) == 12 * (1 if solver == "euler" else 2) + int(denoise)
  scale = np.abs(ref).max()
  assert 0.1 < scale < 100
  np.testing.assert_array_less(np.abs(x - ref).max(), 1e-12 * scale)


@pytest.mark.parametrize("name", ["rectified_flow", "trigflow", "vpsde"])
def test_w0_euler_equals_a_hand_written_pf_ode(name):
  """The same, against the probability-flow ODE written out here (12 Euler steps on
  linspace(t_max, eps), then Tweedie at eps), float64: measured <= 8.4e-14 of max |x|.
  (Starting that reference at float32(t_max) instead moves it by 2.9e-7 on rectified flow,
  8.4e-8 on TrigFlow, 0 on VP, whose t_max = 1 is exact: a float32 time anywhere in such a
  comparison shows at that size.)"""
  sde = sde_lib.get_sde(name)
  with jax.enable_x64(True):
    score_fn = MIX.score_fn(sde)
    x_T = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)

    @jax.jit  # the 12 hand-written steps (unrolled) and the sampler, one program
    def both(key, x_T):
      x, ts = x_T, np.linspace(sde.t_max, 1e-3, 13)
      for t, s in zip(ts[:-1], ts[1:]):
        tb = jnp.full((64,), t, jnp.float64)
        f, g = sde.sde(x, tb)
        x = x + (f - 0.5 * g[:, None] ** 2 * score_fn(x, tb)) * (s - t)
      tb = jnp.full((64,), 1e-3, jnp.float64)
      ref = (x + sde.sigma(tb)[:, None] ** 2 * score_fn(x, tb)) / sde.alpha(tb)[:, None]
      out, _ = sampling.sde_sample(key, score_fn, sde, (64, 2), steps=12, w=0.0, x_T=x_T,
                                   denoise=True)
      return out, ref

    out, ref = (np.asarray(v) for v in both(jax.random.key(0), x_T))
  assert np.abs(out - ref).max() < 1e-12 * np.abs(ref).max()


def test_w0_equals_the_ode_in_float32_at_round_off():
  """In float32 the same comparison differs at float32 round-off: measured 1e-7 to 1.1e-6
  of max |x| for 20-1000 steps (the accumulated grid of diffrax against one linspace);
  bound 1e-5 at 20 steps, far below the 1e-2 a wrong step would give."""
  for name in ("rectified_flow",):
    sde = sde_lib.get_sde(name)
    x_T = jax.random.normal(jax.random.key(1), (64, 2), jnp.float32)

    @jax.jit  # both samplers, one program
    def both(key, x_T):
      kw = dict(steps=20, solver="euler", x_T=x_T, denoise=True)
      return (sampling.sde_sample(key, MIX.score_fn(sde), sde, (64, 2), w=0.0, **kw)[0],
              sampling.ode_sample(key, MIX.score_fn(sde), sde, (64, 2), **kw)[0])

    x, ref = both(jax.random.key(0), x_T)
    assert x.dtype == jnp.float32
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.abs(x - ref).max() < 1e-5 * np.abs(ref).max()


def test_w_enters_as_w_squared_in_the_drift_and_w_in_the_noise():
  """One Euler step in float64 against the formula written out: x + [f - (1 + w^2)/2 g^2 s] h
  + w g sqrt(-h) z, with z the draw the sampler makes (recovered from w = 1 and w = 0)."""
  sde = sde_lib.RectifiedFlow()
  with jax.enable_x64(True):
    score_fn = MIX.score_fn(sde)
    x_T = jax.random.normal(jax.random.key(3), (8, 2), jnp.float64)
    eps = 0.5
    h = eps - sde.t_max
    ws = (0.0, 1.0, 0.5, 2.0)

    @jax.jit  # the coefficients and the one step at every w, one program
    def coefficients_and_steps(key, x_T):
      t = jnp.full((8,), sde.t_max, jnp.float64)
      f, g = sde.sde(x_T, t)
      steps = [sampling.sde_sample(key, score_fn, sde, (8, 2), steps=1, w=w, eps=eps, x_T=x_T,
                                   denoise=False)[0] for w in ws]
      return f, g, score_fn(x_T, t), steps

    f, g, s, steps = coefficients_and_steps(jax.random.key(0), x_T)
    x_T, f, s = np.asarray(x_T), np.asarray(f), np.asarray(s)
    g = np.asarray(g)[:, None]
    run = lambda w: np.asarray(steps[ws.index(w)])
    ode = x_T + (f - 0.5 * g**2 * s) * h
    np.testing.assert_allclose(run(0.0), ode, rtol=1e-12)
    z = (run(1.0) - (x_T + (f - g**2 * s) * h)) / (g * math.sqrt(-h))
    assert 0.3 < np.std(z) < 3
    for w in (0.5, 2.0):
      expected = (x_T + (f - 0.5 * (1 + w * w) * g**2 * s) * h) + w * g * math.sqrt(-h) * z
      np.testing.assert_allclose(run(w), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Any w samples the exact mixture
# ---------------------------------------------------------------------------------------

N_DRAWS = 5_000
STEPS = 200
MEAN, COV = _exact_moments(MIX)


@functools.lru_cache(maxsize=None)
def _mixture_sampler(name, solver="euler"):
  """One compiled program per process: (key, w, score scale) -> N_DRAWS draws, w traced."""
  sde = sde_lib.get_sde(name)
  exact = MIX.score_fn(sde)

  def run(key, w, score_scale):
    score_fn = lambda x, t: score_scale * exact(x, t)
    return sampling.sde_sample(key, score_fn, sde, (N_DRAWS, 2), steps=STEPS, w=w,
                               solver=solver)[0]

  return compiled(run, jax.random.key(7), jnp.float32(1.0), jnp.float32(1.0))


def _mixture_errors(name, w, score_scale=1.0, solver="euler"):
  """(largest mean error, largest covariance error, mode-weight TV) of N_DRAWS draws."""
  x = _mixture_sampler(name, solver)(jax.random.key(7), jnp.float32(w),
                                     jnp.float32(score_scale))
  x = np.asarray(x, np.float64)
  return (np.abs(x.mean(0) - MEAN).max(), np.abs(np.cov(x.T) - COV).max(),
          mixtures.mode_weight_tv(MIX, x))


# Largest entry errors of the mean and covariance and the mode-weight TV, measured (these
# keys, 5,000 draws, 200 Euler steps): the right sampler, every process and w in
# {0, 0.5, 1, 2}: <= 0.049, 0.088, 0.024 (the worst: vesde at w = 0, Euler's error on VE's
# uniform-t grid; statistical error of 5,000 draws ~0.02 in the mean); the w-as-w^2 sampler
# (score scaled by 1.2 at w = 0.5, 0.6 at w = 2), every process: >= 0.116, 0.177, 0.048.
# The bounds lie between, so each of the three checks alone tells the two apart.
BOUNDS = (0.075, 0.13, 0.035)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", PROCESSES)
def test_any_w_samples_the_exact_mixture(name, w):
  errors = _mixture_errors(name, w)
  assert all(e < b for e, b in zip(errors, BOUNDS)), (name, w, errors)


@pytest.mark.parametrize("w", [0.5, 2.0])
@pytest.mark.parametrize("name", ["vpsde", "rectified_flow"])
def test_w_written_as_w_squared_would_fail(name, w):
  """The drift of a sampler with w in place of w^2, f - (1 + w)/2 g^2 s, is the right drift
  with the score scaled by c = (1 + w) / (1 + w^2): the mixture checks reject it."""
  c = (1 + w) / (1 + w * w)
  errors = _mixture_errors(name, w, score_scale=c)
  assert all(e > b for e, b in zip(errors, BOUNDS)), (name, w, c, errors)


@pytest.mark.parametrize("solver", sampling.SDE_SOLVERS)
def test_a_traced_w_gives_the_static_w_samples(solver):
  """One compiled program for every w (w an argument of the jit) gives the samples of the
  program compiled for each static w, to float32 round-off (measured: 6e-7 at w = 0, where
  the traced program adds the noise times zero and fuses differently)."""
  sde = sde_lib.get_sde("vpsde")
  score_fn = MIX.score_fn(sde)
  key = jax.random.key(3)

  def draw(w):
    return sampling.sde_sample(key, score_fn, sde, (64, 2), steps=20, w=w, solver=solver)[0]

  traced = compiled(draw, jnp.float32(0.0))
  for w in (0.0, 0.5, 2.0):
    static = np.asarray(jax.jit(lambda: draw(w))())
    got = np.asarray(traced(jnp.float32(w)))
    np.testing.assert_allclose(got, static, rtol=1e-5, atol=1e-5)
    assert w == 0.0 or np.abs(static - np.asarray(jax.jit(lambda: draw(0.0))())).max() > 0.1


# ---------------------------------------------------------------------------------------
# Orders at w = 0
# ---------------------------------------------------------------------------------------

SMOOTH = mixtures.GaussianMixture(weights=(0.6, 0.4), means=((-0.6, 0.0), (0.6, 0.4)),
                                  stds=(0.5, 0.4), event_shape=(2,))


@functools.lru_cache(maxsize=None)
def _reference(name):
  """(x_T [32, 2], x at eps) of the probability-flow ODE, diffrax Dopri8 rtol = atol = 1e-12,
  float64. Call under x64."""
  sde = sde_lib.get_sde(name)
  score_fn = SMOOTH.score_fn(sde)

  def vector_field(t, x, args):
    del args
    tb = jnp.full(x.shape[:1], t, x.dtype)
    drift, diffusion = sde.sde(x, tb)
    return drift - 0.5 * (diffusion**2)[:, None] * score_fn(x, tb)

  @jax.jit  # one program
  def solve():
    x_T = jax.random.normal(jax.random.key(1), (32, 2), jnp.float64)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Dopri8(), sde.t_max, sampling.default_eps(sde),
        -1e-3, x_T, stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000)
    return x_T, solution.ys[0]

  x_T, ref = solve()
  return x_T, np.asarray(ref)


# Measured slopes (log2 of the error ratio per doubling, 40 -> 80 -> 160 steps):
#   vpsde           euler 0.93 0.97   heun 1.96 1.98
#   rectified_flow  euler 0.99 0.99   heun 1.96 1.98
#   trigflow        euler 0.97 0.99   heun 1.98 1.99
# bounds: within 0.3 of the order.
@pytest.mark.parametrize("solver,order", [("euler", 1.0), ("heun", 2.0)])
@pytest.mark.parametrize("name", ["vpsde", "rectified_flow", "trigflow"])
def test_order_at_w0(name, solver, order):
  sde = sde_lib.get_sde(name)
  steps_list = (40, 80, 160)
  with jax.enable_x64(True):
    x_T, ref = _reference(name)

    @jax.jit  # the three step counts, one program
    def samples(key, x_T):
      return [sampling.sde_sample(key, SMOOTH.score_fn(sde), sde, (32, 2), steps=steps,
                                  w=0.0, solver=solver, x_T=x_T, denoise=False)[0]
              for steps in steps_list]

    errors = [np.sqrt(np.mean((np.asarray(x) - ref) ** 2))
              for x in samples(jax.random.key(0), x_T)]
  slopes = -np.diff(np.log2(errors))
  assert np.all(np.abs(slopes - order) < 0.3), (errors, slopes)


# ---------------------------------------------------------------------------------------
# Bad input, before anything is traced
# ---------------------------------------------------------------------------------------


def _never_called(x, t):
  raise AssertionError("the score function was traced before the options were checked")


@pytest.mark.parametrize("w", [-0.5, float("nan"), float("inf"), -float("inf"), "1", None,
                               True])
def test_bad_w(w):
  sde = sde_lib.RectifiedFlow()
  with pytest.raises(ValueError, match=r"w must be a finite number >= 0.*got"):
    sampling.sample(jax.random.key(0), _never_called, sde, (4, 2), method="sde", w=w)
  with pytest.raises(ValueError, match=r"w must be a finite number >= 0"):
    sampling.sde_sample(jax.random.key(0), _never_called, sde, (4, 2), w=w)
  with pytest.raises(ValueError, match=r"w must be a finite number >= 0"):
    sampling.check_options(sde, "sde", dict(w=w))


def test_unknown_solver_lists_the_valid_ones():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match=r"Unknown sde solver 'rk4'; valid: \['euler', 'heun'\]"):
    sampling.sample(jax.random.key(0), _never_called, sde, (4, 2), method="sde", solver="rk4")
  with pytest.raises(ValueError, match=r"Unknown sde solver 'rk4'"):
    sampling.check_options(sde, "sde", dict(solver="rk4"))
  with pytest.raises(TypeError, match=r"takes no option\(s\) \['eta'\]"):
    sampling.sample(jax.random.key(0), _never_called, sde, (4, 2), method="sde", eta=0.0)
  with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
    sampling.sample(jax.random.key(0), _never_called, sde, (4, 2), method="sde", steps=0)
  with pytest.raises(ValueError, match=r"eps must lie in \(0, t_max = 0.999\)"):
    sampling.sample(jax.random.key(0), _never_called, sde_lib.TrigFlow(), (4, 2),
                    method="sde", eps=0.9995)
