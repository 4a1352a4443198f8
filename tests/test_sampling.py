"""Tests of score_sde.sampling against exact Gaussian-mixture scores and float64 references.

Fast tests: closed forms (a point mass, for which every deterministic sampler is exact),
DPM-Solver++ order 1 = DDIM, exact NFE (counted by a callback in the score function), one
compiled program per sampler, errors. Slow tests (`-m slow`): convergence orders against a
float64 probability-flow ODE solution, and each sampler reproducing a Gaussian mixture.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import mixtures
from score_sde import sampling
from score_sde import sde as sde_lib
from tests.pf_reference import pf_ode_reference
from tests.compiled import compiled

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}
FLAT = mixtures.three_gaussians_mixture()  # [B, 2], 3 modes
IMAGE = mixtures.image_mixture((4, 4, 1))  # [B, 4, 4, 1], 2 modes
KEY = jax.random.key(0)


def _point_mass(event_shape):
  """A one-component 'mixture' with zero width: its denoiser is the constant mu."""
  d = int(np.prod(event_shape))
  mu = tuple(float(v) for v in np.linspace(-0.7, 0.9, d))
  return mixtures.GaussianMixture(weights=(1.0,), means=(mu,), stds=(0.0,),
                                  event_shape=tuple(event_shape))


def _counting(score_fn):
  """Wraps a score function; returns (wrapped, calls, traces): `calls` grows by one per
  evaluation on device (a debug callback), `traces` by one per Python trace."""
  calls, traces = [], []

  def wrapped(x, t):
    traces.append(1)
    jax.debug.callback(lambda: calls.append(1))
    return score_fn(x, t)

  return wrapped, calls, traces


# --------------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------------


def test_default_eps_follows_the_sde():
  assert sampling.default_eps(SDES["vp"]) == 1e-3
  assert sampling.default_eps(SDES["subvp"]) == 1e-3
  assert sampling.default_eps(SDES["ve"]) == 1e-5
  # Also inside a trace (the decision is made from constants, not traced values).
  assert jax.jit(lambda: jnp.asarray(sampling.default_eps(SDES["ve"])))() == np.float32(1e-5)


def test_sampler_table_and_options():
  assert {"pc", "ode", "ddpm", "ddim", "heun", "dpm_solver", "unipc", "deis"} <= set(
      sampling.SAMPLERS)
  for name, fn in sampling.SAMPLERS.items():
    options = sampling.sampler_options(name)
    assert {"x_T", "eps", "denoise"} <= set(options), name
    assert fn is getattr(sampling, f"{name}_sample")


def _jitted(method, score_fn, sde, shape, **options):
  """The sampler as one compiled function of the key."""
  return jax.jit(functools.partial(sampling.sample, score_fn=score_fn, sde=sde, shape=shape,
                                   method=method, **options))


POINT_MASS_CASES = [("vp", (2,)), ("subvp", (3, 3, 2)), ("ve", (2,))]
# Samplers that integrate the point mass's probability-flow ODE exactly (not denoised), and
# the denoised chains that end exactly at mu.
# (DPM-Solver++ of order 3 with 7 steps runs orders 1, 2, 3, 3, 3, 2, 1.)
EXACT_ODE_SAMPLERS = [("ddim", {}), ("dpm_solver", dict(order=3)), ("heun", {})]
EXACT_DENOISED_SAMPLERS = [("heun", {}), ("ddpm", {}),
                           ("pc", dict(predictor="ancestral_sampling"))]


@pytest.mark.parametrize("sde_name,event_shape", POINT_MASS_CASES,
                         ids=[f"{n}-{len(s)}d" for n, s in POINT_MASS_CASES])
def test_samplers_are_exact_for_a_point_mass(sde_name, event_shape):
  """For data at one point mu the probability-flow ODE is x_t = alpha_t mu + sigma_t z with z
  constant, and the data prediction is mu at all t: DDIM, DPM-Solver++ (any order) and EDM's
  Heun integrate it exactly, on any grid, whatever the key; a denoised chain (Heun's last
  Euler step, DDPM, ancestral PC) ends exactly at mu.

  The six samplers and the closed form are one compiled program of the key."""
  sde = SDES[sde_name]
  mix = _point_mass(event_shape)
  score_fn = mix.score_fn(sde)
  shape = (8,) + event_shape
  eps = sampling.default_eps(sde)
  mu = np.asarray(mix.means[0], np.float32).reshape(event_shape)

  def run(key):
    x_T = sde.prior_sampling(jax.random.key(1), shape)
    t_T, t_eps = jnp.asarray(sde.T), jnp.asarray(eps)
    z = (x_T - sde.alpha(t_T) * mu) / sde.sigma(t_T)
    expected = sde.alpha(t_eps) * mu + sde.sigma(t_eps) * z
    exact = [sampling.sample(key, score_fn, sde, shape, method, steps=7, x_T=x_T,
                             denoise=False, **options)[0]
             for method, options in EXACT_ODE_SAMPLERS]
    denoised = [sampling.sample(key, score_fn, sde, shape, method, steps=7, x_T=x_T,
                                **options)[0]
                for method, options in EXACT_DENOISED_SAMPLERS]
    return x_T, expected, exact, denoised

  program = compiled(run, KEY)
  x_T, expected, exact, denoised = program(KEY)
  _, _, exact_other_key, _ = program(jax.random.key(9))
  atol = 3e-6 * float(np.max(np.abs(x_T))) + 1e-5
  for (method, _), x, x_other_key in zip(EXACT_ODE_SAMPLERS, exact, exact_other_key):
    np.testing.assert_allclose(x, expected, atol=atol, err_msg=method)
    np.testing.assert_array_equal(x, x_other_key)  # the key is unused
  for (method, _), x in zip(EXACT_DENOISED_SAMPLERS, denoised):
    np.testing.assert_allclose(x, np.broadcast_to(mu, shape), atol=2e-5, err_msg=method)


def test_ode_sampler_is_accurate_for_a_point_mass():
  sde = SDES["vp"]
  mix = _point_mass((2,))

  @jax.jit
  def run(key):
    x_T = sde.prior_sampling(jax.random.key(1), (16, 2))
    mu = jnp.asarray(mix.means[0])
    z = (x_T - sde.alpha(jnp.asarray(1.0)) * mu) / sde.sigma(jnp.asarray(1.0))
    t_eps = jnp.asarray(1e-3)
    expected = sde.alpha(t_eps) * mu + sde.sigma(t_eps) * z
    x, _ = sampling.ode_sample(key, mix.score_fn(sde), sde, (16, 2), x_T=x_T, denoise=False)
    return x, expected

  x, expected = run(KEY)
  np.testing.assert_allclose(x, expected, atol=2e-4)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dpm_solver_order_1_is_ddim(sde_name):
  sde = SDES[sde_name]
  score_fn = FLAT.score_fn(sde)

  @jax.jit
  def run(key):
    x_T = sde.prior_sampling(jax.random.key(3), (256, 2))
    dpm_x, _ = sampling.sample(key, score_fn, sde, (256, 2), "dpm_solver", steps=20, order=1,
                               grid="time_uniform", x_T=x_T)
    ddim_x, _ = sampling.sample(key, score_fn, sde, (256, 2), "ddim", steps=20, x_T=x_T)
    return dpm_x, ddim_x

  dpm_x, ddim_x = run(KEY)
  assert float(np.max(np.abs(dpm_x - ddim_x))) < 2e-5


# (method, options, the NFE rule's value or None where adaptive)
NFE_CASES = [
    ("pc", dict(steps=9, predictor="reverse_diffusion", corrector="langevin", n_steps=3), 36),
    ("pc", dict(steps=9, predictor="euler_maruyama", probability_flow=True), 9),
    ("ode", {}, None),
    ("ode", dict(solver="heun", rtol=1e-3, atol=1e-3, denoise=False), None),
    ("ode", dict(solver="euler", steps=7), 8),
    ("ddpm", dict(steps=9), 9),
    ("ddim", dict(steps=9, eta=0.5), 10),
    ("heun", dict(steps=5), 9),
    ("dpm_solver", dict(steps=7, order=3), 8),
]


@pytest.mark.parametrize("method,options,expected", NFE_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(NFE_CASES)])
def test_reported_nfe_is_the_number_of_score_calls(method, options, expected):
  """NFE is counted on device by a callback in the score function. The score function is
  traced a few times only, fewer than it is called: the loop is compiled, not unrolled."""
  sde = SDES["vp"]
  score_fn, calls, traces = _counting(FLAT.score_fn(sde))
  x, nfe = _jitted(method, score_fn, sde, (16, 2), **options)(KEY)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert np.all(np.isfinite(x))
  assert int(nfe) == len(calls)
  if expected is not None:
    assert int(nfe) == expected
  assert len(traces) <= 5 < len(calls), (len(traces), len(calls))


@pytest.mark.parametrize("method,options", [
    ("pc", dict(corrector="langevin", n_steps=2)),
    ("heun", dict(s_churn=5.0)),
    ("dpm_solver", dict(order=3)),
])
def test_trace_count_does_not_grow_with_steps(method, options):
  sde = SDES["vp"]
  trace_counts = []
  for steps in (4, 40):
    score_fn, _, traces = _counting(FLAT.score_fn(sde))
    jax.jit(functools.partial(sampling.sample, score_fn=score_fn, sde=sde, shape=(8, 2),
                              method=method, steps=steps, **options)).lower(KEY)
    trace_counts.append(len(traces))
  assert trace_counts[0] == trace_counts[1] <= 4, trace_counts


@pytest.mark.parametrize("method,options", [
    ("pc", dict(predictor="reverse_diffusion", corrector="langevin")),
    ("ddpm", {}), ("ddim", dict(eta=1.0)), ("heun", dict(s_churn=20.0))])
def test_stochastic_samplers_are_pure_functions_of_the_key(method, options):
  sde = SDES["ve"]
  x_T = sde.prior_sampling(jax.random.key(5), (16, 2))
  sampler = _jitted(method, FLAT.score_fn(sde), sde, (16, 2), steps=10, x_T=x_T, **options)
  a, b, c = (sampler(jax.random.key(k))[0] for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_unknown_names_raise_with_the_valid_ones():
  sde = SDES["vp"]
  score_fn = FLAT.score_fn(sde)
  run = functools.partial(sampling.sample, KEY, score_fn, sde, (4, 2))
  cases = [
      (dict(method="euler"), "'dpm_solver'"),
      (dict(method="pc", predictor="leapfrog"), "'reverse_diffusion'"),
      (dict(method="pc", corrector="hmc"), "'ald'"),
      (dict(method="ode", solver="rk4"), "'tsit5'"),
      (dict(method="ddim", grid="cosine"), "'time_quadratic'"),
      (dict(method="dpm_solver", grid="edm"), "'log_snr'"),
      (dict(method="ddpm", variance="learned"), "'posterior'"),
  ]
  for options, valid in cases:
    with pytest.raises(ValueError, match="valid") as info:
      run(**options)
    assert valid in str(info.value), options


@pytest.mark.parametrize("options", [
    dict(method="dpm_solver", order=4),
    dict(method="dpm_solver", order=0),
    dict(method="ddim", steps=0),
    dict(method="pc", steps=-3),
    dict(method="ddpm", steps=1001),
    dict(method="heun", steps=1),
    dict(method="heun", rho=0.0),
    dict(method="ddim", eta=-0.1),
    dict(method="pc", eps=0.0),
    dict(method="ode", eps=1.5),
    dict(method="pc", predictor="none", corrector="none"),
    dict(method="pc", corrector="langevin", n_steps=0),
    dict(method="pc", corrector="langevin", snr=-1.0),
    dict(method="pc", predictor="ancestral_sampling", probability_flow=True),
    dict(method="ode", solver="euler"),
    dict(method="ode", rtol=0.0),
    dict(method="ode", steps=10, max_steps=5),
    dict(method="ddim", x_T=jnp.zeros((4, 3))),
])
def test_invalid_option_values_raise(options):
  sde = SDES["vp"]
  with pytest.raises(ValueError):
    sampling.sample(KEY, FLAT.score_fn(sde), sde, (4, 2), **options)


def test_unknown_option_names_raise_type_error():
  sde = SDES["vp"]
  with pytest.raises(TypeError, match="s_churn") as info:
    sampling.sample(KEY, FLAT.score_fn(sde), sde, (4, 2), method="ddim", s_churn=7.0)
  assert "eta" in str(info.value)  # the valid options are listed
  with pytest.raises(TypeError):
    sampling.ddim_sample(KEY, FLAT.score_fn(sde), sde, (4, 2), order=2)


# --------------------------------------------------------------------------------------------
# Convergence orders against a float64 reference
# --------------------------------------------------------------------------------------------

# A smooth two-component mixture: its data prediction varies gently in log-SNR, so the
# asymptotic orders show already at 20-80 steps.
SMOOTH = mixtures.GaussianMixture(weights=(0.6, 0.4), means=((-0.6, 0.0), (0.6, 0.4)),
                                  stds=(0.5, 0.4), event_shape=(2,))


@functools.lru_cache(maxsize=None)
def _reference(sde_name):
  """(x_T [32, 2] float64, x at eps): the probability-flow ODE solved independently with
  diffrax (Dopri8, rtol = atol = 1e-10) in float64, T -> eps, as one compiled program. Call
  under enable_x64."""
  sde = SDES[sde_name]
  return pf_ode_reference(sde, SMOOTH.score_fn(sde), sde.T, sampling.default_eps(sde), 1e-10)


CONVERGENCE = [
    ("ddim", {}, 1.0, ("vp",)),
    ("heun", {}, 2.0, ("ve",)),
    ("dpm_solver", dict(order=2), 2.0, ("subvp",)),
    ("dpm_solver", dict(order=3), 3.0, ("vp",)),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,options,order,sde_names", CONVERGENCE,
                         ids=[f"{m}{o.get('order', '')}" for m, o, _, _ in CONVERGENCE])
def test_convergence_order(method, options, order, sde_names):
  """Pathwise error at eps against the float64 reference from the same x_T halves at the
  method's order as the steps double (log-log slope over 20, 40, 80 steps). The three
  step counts are one compiled program."""
  steps_list = np.array([20, 40, 80])
  with jax.enable_x64(True):
    for sde_name in sde_names:
      sde = SDES[sde_name]
      x_T, reference = _reference(sde_name)

      @jax.jit
      def rms_errors(x_T, reference):
        errors = []
        for steps in steps_list:
          x, _ = sampling.sample(KEY, SMOOTH.score_fn(sde), sde, (32, 2), method=method,
                                 steps=int(steps), x_T=x_T, denoise=False, **options)
          assert x.dtype == jnp.float64
          errors.append(jnp.sqrt(jnp.mean((x - reference) ** 2)))
        return jnp.stack(errors)

      errors = [float(e) for e in rms_errors(x_T, reference)]
      slope = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
      assert abs(slope - order) < 0.35, (sde_name, errors, slope)


@pytest.mark.slow
def test_ode_sampler_matches_the_float64_reference():
  """Both tolerances are one compiled program per SDE."""
  tolerances = ((1e-4, 3e-3), (1e-7, 3e-6))
  with jax.enable_x64(True):
    for sde_name in ("vp", "ve"):
      sde = SDES[sde_name]
      x_T, reference = _reference(sde_name)

      @jax.jit
      def solve(x_T):
        return [sampling.ode_sample(KEY, SMOOTH.score_fn(sde), sde, (32, 2), x_T=x_T,
                                    rtol=tol, atol=tol, denoise=False)
                for tol, _ in tolerances]

      for (tol, bound), (x, nfe) in zip(tolerances, solve(x_T)):
        error = float(np.max(np.abs(np.asarray(x) - np.asarray(reference))))
        assert error < bound, (sde_name, tol, error, int(nfe))


# --------------------------------------------------------------------------------------------
# Reproducing a Gaussian mixture
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _nearest_modes(mix: mixtures.GaussianMixture, x: jax.Array) -> jax.Array:
  """The most responsible component of each of x [B, *D] (float32): [B] ints; one compiled
  program per mixture and shape (eager, it was a dozen)."""
  return mix.responsibilities(x).argmax(-1)


def assert_reproduces(x, mix: mixtures.GaussianMixture, *, bias: float = 0.06):
  """Mode weights (nearest mode by responsibility), per-mode means and per-mode stds of
  samples x against the mixture: each within 4.5 standard errors of its estimate, plus a
  discretization allowance `bias` (relative, for stds; in units of the mode's std, for means;
  none for weights)."""
  x = np.asarray(x, np.float64)
  assert np.all(np.isfinite(x)), "non-finite samples"
  n = x.shape[0]
  flat = x.reshape(n, -1)
  d = flat.shape[1]
  labels = np.asarray(_nearest_modes(mix, jnp.asarray(x, jnp.float32)))
  weights, means, stds = (np.asarray(v, np.float64) for v in (mix.weights, mix.means,
                                                                mix.stds))
  counts = np.bincount(labels, minlength=len(weights))
  weight_se = np.sqrt(weights * (1 - weights) / n)
  np.testing.assert_array_less(np.abs(counts / n - weights), 4.5 * weight_se,
                               err_msg=f"mode weights {counts / n} vs {weights}")
  for k in range(len(weights)):
    members = flat[labels == k]
    n_k = len(members)
    mean_error = np.max(np.abs(members.mean(0) - means[k])) / stds[k]
    assert mean_error < 4.5 / math.sqrt(n_k) + bias, f"mode {k}: mean off by {mean_error} std"
    std = np.sqrt(np.mean((members - members.mean(0)) ** 2))
    assert abs(std / stds[k] - 1) < 4.5 / math.sqrt(2 * n_k * d) + bias, (
        f"mode {k}: std {std} vs {stds[k]}")


DATA = {"flat": (FLAT, 2000), "image": (IMAGE, 500)}
SDE_NAMES = list(SDES)
PREDICTORS = ["euler_maruyama", "reverse_diffusion", "ancestral_sampling"]
CORRECTORS = ["none", "langevin", "ald"]


def _pc_cases():
  """Every predictor x corrector combination on flat data, the SDE rotated as a Latin square
  (each predictor and each corrector meets every SDE); on image-shaped data each predictor
  and each corrector once; the corrector-only samplers (Langevin; ALD on VE, i.e. SMLD,
  where it applies: its step size (snr sigma)^2 freezes the chain once sigma is small
  against the data scale of VP / sub-VP); and the probability-flow predictors."""
  cases = []
  for (i, predictor), (j, corrector) in itertools.product(enumerate(PREDICTORS),
                                                          enumerate(CORRECTORS)):
    cases.append(("flat", SDE_NAMES[(i + j) % 3],
                  dict(predictor=predictor, corrector=corrector, steps=200)))
  for i, predictor in enumerate(PREDICTORS):
    cases.append(("image", SDE_NAMES[i], dict(predictor=predictor,
                                              corrector=CORRECTORS[(i + 1) % 3], steps=200)))
  corrector_only = dict(predictor="none", steps=500, n_steps=5)
  cases += [("flat", "subvp", dict(corrector_only, corrector="langevin")),
            ("image", "vp", dict(corrector_only, corrector="langevin")),
            ("flat", "ve", dict(corrector_only, corrector="ald"))]
  cases += [("flat", "vp", dict(predictor="reverse_diffusion", probability_flow=True,
                                steps=500))]
  return cases


# A corrector-only sampler runs 500 x 5 stochastic steps: its program runs about five times
# faster compiled at XLA's optimization level 1, for a compile about 1.5 times as long
# (tests/compiled.py); every other case here is faster at the run's level 0.
def _optimization_level(options):
  return 1 if options.get("predictor") == "none" else None


@pytest.mark.slow
@pytest.mark.parametrize("data,sde_name,options", _pc_cases(),
                         ids=lambda v: v if isinstance(v, str) else "-".join(
                             f"{k}={w}" for k, w in v.items() if k != "steps"))
def test_pc_sampler_reproduces_the_mixture(data, sde_name, options):
  mix, n = DATA[data]
  sde = SDES[sde_name]
  run = compiled(lambda key: sampling.pc_sample(key, mix.score_fn(sde), sde,
                                                (n,) + mix.event_shape, **options)[0],
                 KEY, level=_optimization_level(options))
  assert_reproduces(run(KEY), mix)


METHOD_CASES = {
    "ode": ("ode", {}),
    "ddpm": ("ddpm", dict(steps=500)),
    "ddpm_posterior": ("ddpm", dict(steps=500, variance="posterior")),
    "ddim": ("ddim", dict(steps=100, grid="time_quadratic")),
    "ddim_eta1": ("ddim", dict(steps=200, grid="time_quadratic", eta=1.0)),
    "heun": ("heun", dict(steps=40)),
    "heun_churn": ("heun", dict(steps=40, s_churn=10.0)),
    "dpm_solver2": ("dpm_solver", dict(steps=50, order=2)),
    "dpm_solver3": ("dpm_solver", dict(steps=50, order=3)),
}


def _method_cases():
  """Each method case on flat data and each method (not every variant) on image-shaped data,
  the SDE rotated so that each meets two SDEs and each SDE both shapes; the ODE sampler on
  every SDE."""
  cases = [("flat", sde_name, "ode") for sde_name in SDE_NAMES]
  for i, name in enumerate(METHOD_CASES):
    if name != "ode":
      cases.append(("flat", SDE_NAMES[(i + 2) % 3], name))
    if name not in ("ddpm_posterior", "ddim_eta1", "heun_churn"):
      cases.append(("image", SDE_NAMES[i % 3], name))
  return cases


@pytest.mark.slow
@pytest.mark.parametrize("data,sde_name,case", _method_cases())
def test_method_reproduces_the_mixture(data, sde_name, case):
  method, options = METHOD_CASES[case]
  mix, n = DATA[data]
  sde = SDES[sde_name]
  x, _ = jax.jit(lambda key: sampling.sample(key, mix.score_fn(sde), sde,
                                             (n,) + mix.event_shape, method=method,
                                             **options))(KEY)
  assert_reproduces(x, mix)


@pytest.mark.slow
def test_the_mixture_check_can_fail():
  """The statistical check rejects a sampler with a wrong noise scale and a skewed mode."""
  sde = SDES["vp"]
  x, _ = jax.jit(lambda key: sampling.ddim_sample(key, FLAT.score_fn(sde), sde, (2000, 2),
                                                  steps=100, grid="time_quadratic"))(KEY)
  assert_reproduces(x, FLAT)
  x = np.asarray(x)  # float32, altered below with numpy (eager jnp compiles each operation)
  labels = np.asarray(_nearest_modes(FLAT, x))
  means = np.asarray(FLAT.means, np.float32)[labels]
  with pytest.raises(AssertionError, match="std"):  # 10% too wide around the right means
    assert_reproduces(means + np.float32(1.1) * (x - means), FLAT)
  with pytest.raises(AssertionError, match="weights"):  # 5% of the samples in the wrong mode
    moved = np.flatnonzero(labels == 0)[:100]
    shifted = x.copy()
    shifted[moved] += np.asarray(FLAT.means[1], np.float32) - np.asarray(FLAT.means[0],
                                                                          np.float32)
    assert_reproduces(shifted, FLAT)


# EDM's own stochastic settings (Karras et al. 2022, Table 5), in sigma_hat = sigma / alpha.
EDM_CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_heun_with_edm_churn_reproduces_the_mixture(sde_name, dtype):
  """heun with s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003 (gamma = sqrt(2) - 1 on
  every level within [0.05, 50]; on VE sigma_hat(T) = 50, so the first churned level lies
  above sigma_max) gives finite samples of the exact mixture, and the churn does change
  them. Compiled at XLA's default optimization level (3; conftest sets 0 for speed): there
  the former noise std sqrt(sigma_up^2 - sigma^2) became an FMA that is NaN where gamma = 0
  (every sample was NaN, on VP and VE)."""
  sde = SDES[sde_name]
  with jax.enable_x64(dtype == "float64"):
    x_T = sde.prior_sampling(jax.random.key(3), (2000, 2)).astype(dtype)

    def churned_and_deterministic(key, x_T):  # one program, both samplers
      return [sampling.sample(key, FLAT.score_fn(sde), sde, x_T.shape, "heun", steps=40,
                              x_T=x_T, **churn)[0] for churn in (EDM_CHURN, {})]

    x, deterministic = compiled(churned_and_deterministic, KEY, x_T, level=3)(KEY, x_T)
    assert x.dtype == jnp.dtype(dtype)
    x = np.asarray(x, np.float64)
    deterministic = np.asarray(deterministic, np.float64)
  assert np.all(np.isfinite(x)), "non-finite samples"
  assert_reproduces(x, FLAT)
  assert np.sqrt(np.mean((x - deterministic) ** 2)) > 0.05  # the churn moved the samples
