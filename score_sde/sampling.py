"""Samplers for score-based models: reverse-SDE, probability-flow ODE and the diffusion family.

One entry point and one public function per method:

    x, nfe = sample(key, score_fn, sde, shape, method="pc", **options)

| method       | function            | what                                                        |
|--------------|---------------------|-------------------------------------------------------------|
| `pc`         | `pc_sample`         | predictor-corrector on the reverse SDE (Song et al. 2021)   |
| `ode`        | `ode_sample`        | probability-flow ODE with diffrax (adaptive Tsit5 default)  |
| `ddpm`       | `ddpm_sample`       | ancestral sampling of the (respaced) DDPM chain (Ho 2020)   |
| `ddim`       | `ddim_sample`       | DDIM, eta = 0 deterministic (Song, Meng & Ermon 2021)       |
| `heun`       | `heun_sample`       | EDM Heun sampler in sigma, optional churn (Karras 2022)     |
| `dpm_solver` | `dpm_solver_sample` | DPM-Solver++ multistep, orders 1-3 (Lu et al. 2022); with   |
|              |                     | `stochastic=True` SDE-DPM-Solver++ (orders 1-2)             |
| `unipc`      | `unipc_sample`      | UniPC multistep with the UniC corrector (Zhao et al. 2023)  |
| `deis`       | `deis_sample`       | DEIS multistep, tAB in log rho (Zhang & Chen 2023)          |

Every sampler takes a `jax.random` key first, a score function `score_fn(x [B, *D], t [B])`, an
SDE from `score_sde.sde` and the batch shape `(B, *D)`; all else is keyword-only. It returns
`(x, nfe)`: samples `[B, *D]` at the data end (not inverse-scaled) and the exact number of
score evaluations (a Python int, or an int32 array for the adaptive ODE solver). Everything
here is written with the SDE's scalar functions `alpha(t)`, `sigma(t)`, `log_snr(t)` and
`t_from_log_snr`, so every method works for VP, sub-VP and VE SDEs alike.

Common options (all checked once, by `check_options`, before anything is traced):
  grid (every fixed-step method): the time grid, one option for all of them, built by
    `time_grid`: 'time_uniform', 'log_snr', 'karras' (with `rho`), 'time_quadratic', or an
    explicit decreasing array of times. Defaults: pc, ddpm, ddim 'time_uniform'; heun
    'karras'; dpm_solver, unipc, deis 'log_snr'. Every grid starts at `sde.t_max`.
  x_T: the starting noise `[B, *D]` at t = t_max (default: drawn from `sde.prior_sampling`), so
    different samplers can be compared on the same draws; its dtype sets the working dtype.
  eps: the smallest time (data end). Default `default_eps(sde)`: 1e-5 when alpha(t) is
    constantly 1 (VE), else 1e-3 (VP, sub-VP).
  steps: number of steps (default `sde.N`); what one step is follows each method's paper:
    - `pc`, `ddpm`: `steps` times on a grid from T down to eps; the step taken from each of
      them (for the last, from eps to the clean data) is one predictor evaluation, as in the
      reference codebase and Ho et al.'s Algorithm 2. `denoise=True` returns the mean of the
      last step (no noise added), i.e. the Tweedie estimate of the clean data.
    - `ddim`, `dpm_solver`, `unipc`, `deis`, `ode`: integration from t_max to eps in `steps`
      steps; `denoise=True`
      then adds one Tweedie step x0 = (x + sigma^2 score) / alpha at eps (+1 NFE).
    - `heun`: EDM's `steps` noise levels from sigma(T) to sigma(eps) and a last Euler step to
      sigma = 0 when `denoise=True` (which is the Tweedie estimate): NFE 2 steps - 1.
  denoise: default True everywhere (the reference's `noise_removal`).
  threshold, threshold_percentile, data_range (all but `pc` and `ode`): clip
    the denoised estimate x0 = (x + sigma^2 score) / alpha to the data range ('static') or
    by dynamic thresholding ('dynamic', Saharia et al. 2022) in every step; 'none' (default).

Each sampler is a pure function; its loop is one `lax.scan` / `fori_loop` / diffrax solve, so
`jax.jit(functools.partial(sample, score_fn=..., sde=..., shape=..., method=...))` compiles
the whole sampler into one program with the score function traced a bounded number of times.

Where this differs from the reference implementations, on purpose:
  - PC predictors work on any grid (`steps` != N): the reverse-diffusion and ancestral steps
    use the exact forward transition between grid times, x_t = (alpha_t / alpha_s) x_s + G z,
    G^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2, which on the N-step grid is the
    reference's DDPM / SMLD discretization; the Langevin step-size factor 1 - beta_i is
    (alpha(t) / alpha(t - T/N))^2, which is also defined for sub-VP (where the reference
    crashes) and is 1 for VE.
  - DPM-Solver++ order 3: the published multistep update weights the second divided
    difference D2 (= h^2 x0'' / 2) by phi_3 where the Taylor expansion needs 2 phi_3, which
    makes it second order; here it is third order (checked by the tests' convergence rates).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import solvers
from score_sde.sde import SDE, ScoreFn, batch_scalar

if TYPE_CHECKING:
  import diffrax

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def default_eps(sde: SDE) -> float:
  """The default end time: 1e-5 for SDEs with constant alpha(t) = 1 (VE), else 1e-3."""
  return 1e-5 if sde.constant_alpha else 1e-3


def _check_name(kind: str, name: str, valid) -> None:
  if name not in valid:
    raise ValueError(f"Unknown {kind} {name!r}; valid: {sorted(valid)}")


def _check_steps(steps: int | None, sde: SDE, minimum: int = 1) -> int:
  steps = sde.N if steps is None else steps
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < minimum:
    raise ValueError(f"steps must be an integer >= {minimum}, got {steps!r}")
  return int(steps)


def _check_eps(eps: float | None, sde: SDE) -> float:
  eps = default_eps(sde) if eps is None else float(eps)
  if not 0.0 < eps < sde.t_max:
    raise ValueError(f"eps must lie in (0, t_max = {sde.t_max}), got {eps}")
  return eps


def _initial_x(key: Array, sde: SDE, shape, x_T: Array | None) -> Array:
  """x_T: the given starting noise (checked against `shape`) or a draw from the prior."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f"shape must be (B, *D) with at least one event axis, got {shape}")
  if x_T is None:
    return sde.prior_sampling(key, shape)
  x_T = jnp.asarray(x_T)
  if x_T.shape != shape:
    raise ValueError(f"x_T has shape {x_T.shape}, but shape is {shape}")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a float array, got dtype {x_T.dtype}")
  return x_T


def _full_t(t: Array, x: Array) -> Array:
  """A scalar time as a `[B]` vector of x's dtype."""
  return jnp.full(x.shape[:1], t, dtype=x.dtype)


def _normal_like(key: Array, x: Array) -> Array:
  """Standard normal noise shaped like x. Drawn as [B, prod(D)] and reshaped: the same
  distribution, but XLA compiles the flat draw much faster than a 4-D one."""
  return jax.random.normal(key, (x.shape[0], math.prod(x.shape[1:])), x.dtype).reshape(x.shape)


def _flat_norm(v: Array) -> Array:
  return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1)


GRIDS = ("time_uniform", "log_snr", "karras", "time_quadratic")


def time_grid(sde: SDE, grid, steps: int, eps: float, rho: float = 7.0) -> np.ndarray:
  """The times `[steps + 1]` (float64 numpy, strictly decreasing) of a fixed-step sampler,
  from `sde.t_max` to `eps`.

  Args:
    sde: the forward SDE (its `t_max`, `log_snr` and `t_from_log_snr`).
    grid: one of `GRIDS` or an explicit array of times:
      - 'time_uniform': uniform in t;
      - 'time_quadratic': t = eps + (t_max - eps) u^2, u uniform in [0, 1] (denser near the
        data end, DDIM's CIFAR-10 setting);
      - 'log_snr': uniform in lambda = log(alpha / sigma) (DPM-Solver's 'logSNR');
      - 'karras': EDM's schedule in sigma_hat = sigma / alpha = exp(-lambda),
        sigma_i = (s_max^(1/rho) + i / steps (s_min^(1/rho) - s_max^(1/rho)))^rho;
      - an explicit 1-D array of times `[n + 1]`, strictly decreasing within [eps, t_max]:
        returned as it is (float64); `steps` must then be None or n, and the sampler ends at
        its last entry.
    steps: the number of steps (>= 1; None with an explicit grid).
    eps: the smallest time (data end), 0 < eps < t_max.
    rho: the 'karras' exponent (> 0).

  Returns:
    `ts [steps + 1]` with ts[0] = t_max and ts[-1] = eps exactly (for the named grids); the
    times are computed in float64 when JAX's x64 mode is on, else in float32.

  Raises:
    ValueError: an unknown grid name, a bad explicit grid (naming its first bad entry),
      `steps` < 1 or not matching an explicit grid, `eps` outside (0, t_max), `rho` <= 0.
  """
  t_max = float(sde.t_max)
  if not 0.0 < eps < t_max:
    raise ValueError(f"eps must lie in (0, t_max = {t_max}), got {eps}")
  if not isinstance(grid, str):
    ts = _check_explicit_grid(grid, t_max, eps)
    if steps is not None and int(steps) != len(ts) - 1:
      raise ValueError(f"steps = {steps} does not match the explicit grid of {len(ts)} times "
                       f"({len(ts) - 1} steps); leave steps unset")
    return ts
  _check_name("grid", grid, GRIDS)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  u = np.linspace(1.0, 0.0, int(steps) + 1)  # 1 at t_max, 0 at eps
  if grid == "time_uniform":
    ts = eps + (t_max - eps) * u
  elif grid == "time_quadratic":
    ts = eps + (t_max - eps) * u**2
  else:
    with jax.ensure_compile_time_eval():
      dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
      lambda_max, lambda_min = (float(v) for v in sde.log_snr(jnp.asarray([t_max, eps], dtype)))
      if grid == "log_snr":
        lambdas = lambda_min + (lambda_max - lambda_min) * u
      else:
        if not rho > 0:
          raise ValueError(f"rho must be positive, got {rho}")
        lo, hi = np.exp(-lambda_max / rho), np.exp(-lambda_min / rho)  # sigma_hat^(1/rho)
        lambdas = -rho * np.log(hi + (lo - hi) * u)
      ts = np.array(sde.t_from_log_snr(jnp.asarray(lambdas, dtype)), np.float64)
  ts[0], ts[-1] = t_max, eps
  return ts


def _check_explicit_grid(grid, t_max: float, eps: float) -> np.ndarray:
  """An explicit grid as float64 numpy `[n + 1]`, checked: 1-D, >= 2 finite times, strictly
  decreasing, within [eps, t_max]; the error names the first bad entry."""
  try:
    ts = np.asarray(grid, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"grid must be one of {list(GRIDS)} or an array of times, got {grid!r}"
                     ) from None
  if ts.ndim != 1 or len(ts) < 2:
    raise ValueError(f"an explicit grid must be a 1-D array of at least 2 times, got shape "
                     f"{ts.shape}")
  for i, t in enumerate(ts):
    if not (np.isfinite(t) and eps <= t <= t_max):
      raise ValueError(f"explicit grid entry {i} = {t} is not within [eps = {eps}, "
                       f"t_max = {t_max}]")
    if i > 0 and not t < ts[i - 1]:
      raise ValueError(f"explicit grid entry {i} = {t} is not below entry {i - 1} = "
                       f"{ts[i - 1]}: the grid must be strictly decreasing")
  return ts


def _point_grid(sde: SDE, grid, steps: int | None, eps: float, rho: float = 7.0
                ) -> np.ndarray:
  """The `steps` times (default `sde.N`) of a sampler whose last step goes from the last of
  them to the data (pc, ddpm): `time_grid` of steps - 1 steps, or an explicit grid as it is."""
  if not isinstance(grid, str):
    ts = _check_explicit_grid(grid, float(sde.t_max), eps)
    if steps is not None and int(steps) != len(ts):
      raise ValueError(f"steps = {steps} does not match the explicit grid of {len(ts)} times; "
                       "leave steps unset")
    return ts
  steps = sde.N if steps is None else steps
  if steps == 1:
    _check_name("grid", grid, GRIDS)
    return np.asarray([eps], np.float64)
  return time_grid(sde, grid, steps - 1, eps, rho)


def _sampler_grid(sde: SDE, grid, steps: int | None, eps: float, rho: float = 7.0
                  ) -> np.ndarray:
  """`time_grid` with `steps` defaulting to `sde.N` for the named grids."""
  if isinstance(grid, str) and steps is None:
    steps = sde.N
  return time_grid(sde, grid, steps, eps, rho)


def _denoised(x: Array, score: Array, alpha, sigma) -> Array:
  """Tweedie's formula E[x_0 | x_t] = (x + sigma^2 score) / alpha, for the score at x_t."""
  return (x + sigma**2 * score) / alpha


def _tweedie(score_fn: ScoreFn, sde: SDE, x: Array, t) -> Array:
  """E[x_0 | x_t] at time t (a scalar): one score evaluation."""
  t = _full_t(t, x)
  sigma = batch_scalar(sde.sigma(t), x)
  alpha = batch_scalar(sde.alpha(t), x)
  return _denoised(x, score_fn(x, t), alpha, sigma)


def _data_end(values: Array, end) -> Array:
  """Appends one value (the clean-data end point: alpha = 1, sigma = 0, log-SNR = inf)."""
  return jnp.concatenate([values, jnp.full((1,), end, values.dtype)])


class _Step(NamedTuple):
  """Scalars of one step t -> s of a grid sampler (s may be the clean-data end point)."""

  index: Array
  t: Array
  alpha: Array
  sigma: Array
  log_snr: Array
  t_next: Array
  alpha_next: Array
  sigma_next: Array
  log_snr_next: Array
  langevin_alpha: Array  # the step-size factor of the Langevin correctors
  noise_scale: Array  # 1, or 0 on the last step of a denoised chain


def _grid_steps(sde: SDE, ts: np.ndarray, dtype, *, to_data: bool, denoise: bool = False
                ) -> _Step:
  """The stacked `_Step`s from each time in `ts` to the next: len(ts) - 1 of them, or with
  `to_data` len(ts), the last from ts[-1] to the clean data (with `denoise` noise-free)."""
  t = jnp.asarray(ts, dtype)
  alpha, sigma, log_snr = sde.alpha(t), sde.sigma(t), sde.log_snr(t)
  # The reference's Langevin step size is scaled by 1 - beta_i = alpha_bar_i / alpha_bar_{i-1}
  # of the N-step DDPM chain (VP); written with alpha(t), that is 1 for VE and works for sub-VP.
  t_prev = jnp.maximum(t - sde.T / sde.N, 0.0)
  langevin_alpha = jnp.exp(2.0 * (sde.log_alpha(t) - sde.log_alpha(t_prev))).astype(dtype)
  noise_scale = np.ones(len(ts))
  if to_data and denoise:
    noise_scale[-1] = 0.0
  steps = _Step(
      index=jnp.arange(len(ts)), t=t, alpha=alpha, sigma=sigma, log_snr=log_snr,
      t_next=_data_end(t[1:], 0.0), alpha_next=_data_end(alpha[1:], 1.0),
      sigma_next=_data_end(sigma[1:], 0.0), log_snr_next=_data_end(log_snr[1:], jnp.inf),
      langevin_alpha=langevin_alpha, noise_scale=jnp.asarray(noise_scale, dtype))
  if to_data:
    return steps
  return jax.tree.map(lambda v: v[:-1], steps)


def _transition_var(step: _Step) -> Array:
  """Variance G^2 of the forward transition x_t = r x_s + G z, r = alpha_t / alpha_s:
  G^2 = sigma_t^2 - r^2 sigma_s^2 = -sigma_t^2 expm1(2 (lambda_t - lambda_s))."""
  return -step.sigma**2 * jnp.expm1(2.0 * (step.log_snr - step.log_snr_next))


def _posterior_var(step: _Step) -> Array:
  """Variance of q(x_s | x_t, x_0): G^2 sigma_s^2 / sigma_t^2 (0 towards the clean data)."""
  return -step.sigma_next**2 * jnp.expm1(2.0 * (step.log_snr - step.log_snr_next))


# --------------------------------------------------------------------------------------------
# Predictor-corrector (Song et al. 2021)
# --------------------------------------------------------------------------------------------
# A predictor maps (key, score_fn, sde, x, step, probability_flow) -> (x, x_mean) for one step
# t -> s of the reverse SDE, with one score evaluation. A corrector maps
# (key, score_fn, sde, x, step, snr, n_steps) -> (x, x_mean) with n_steps evaluations at t.


def _euler_maruyama(key, score_fn, sde, x, step: _Step, probability_flow: bool):
  """Euler-Maruyama step of the reverse SDE (Euler of the ODE) from t to s: dt = s - t < 0."""
  rsde = sde.reverse(score_fn, probability_flow)
  drift, diffusion = rsde.sde(x, _full_t(step.t, x))
  dt = step.t_next - step.t
  x_mean = x + drift * dt
  if probability_flow:
    return x_mean, x_mean
  noise = _normal_like(key, x)
  return x_mean + batch_scalar(diffusion, x) * jnp.sqrt(-dt) * noise, x_mean


def _reverse_diffusion(key, score_fn, sde, x, step: _Step, probability_flow: bool):
  """The reverse of the forward transition x_t = r x_s + G z (Song et al. eq. 45):
  x_s = x_t - (r - 1) x_t + G^2 score + G z. For VP on the N-step grid this is the DDPM
  discretization of the reference, for VE the SMLD one."""
  r = step.alpha / step.alpha_next
  g2 = _transition_var(step)
  score = score_fn(x, _full_t(step.t, x))
  x_mean = (2.0 - r) * x + g2 * (0.5 if probability_flow else 1.0) * score
  if probability_flow:
    return x_mean, x_mean
  noise = _normal_like(key, x)
  return x_mean + jnp.sqrt(g2) * noise, x_mean


def _ancestral_update(key, score, x, step: _Step, variance: str):
  """One draw from q(x_s | x_t, x0_hat): mean E[x_s | x_t] = (x_t + G^2 score) / r (exact
  for any SDE here); variance G^2 ('beta', Ho et al.'s sigma^2 = beta) or the posterior
  G^2 sigma_s^2 / sigma_t^2 ('posterior', sigma^2 = beta-tilde)."""
  r = step.alpha / step.alpha_next
  g2 = _transition_var(step)
  x_mean = (x + g2 * score) / r
  var = g2 if variance == "beta" else _posterior_var(step)
  noise = _normal_like(key, x)
  return x_mean + jnp.sqrt(var) * step.noise_scale * noise, x_mean


def _ancestral_sampling(key, score_fn, sde, x, step: _Step, probability_flow: bool):
  """Ancestral sampling as in the reference: for SDEs that scale the signal (VP; sub-VP with
  its own alpha and sigma) the DDPM step with sigma^2 = beta; for VE (alpha = 1) the SMLD
  step, whose variance is the posterior one, G^2 sigma_s^2 / sigma_t^2."""
  del probability_flow  # Rejected by `pc_sample`.
  score = score_fn(x, _full_t(step.t, x))
  variance = "posterior" if sde.constant_alpha else "beta"
  return _ancestral_update(key, score, x, step, variance)


def _langevin(key, score_fn, sde, x, step: _Step, snr: float, n_steps: int):
  """Langevin corrector: step size 2 alpha (snr ||z|| / ||score||)^2, norms averaged over the
  batch, as in the reference codebase."""
  t = _full_t(step.t, x)

  def body(j, carry):
    x, _ = carry
    grad = score_fn(x, t)
    noise = _normal_like(jax.random.fold_in(key, j), x)
    grad_norm = jnp.mean(_flat_norm(grad))
    noise_norm = jnp.mean(_flat_norm(noise))
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2.0 * step.langevin_alpha
    x_mean = x + step_size * grad
    return x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean

  return jax.lax.fori_loop(0, n_steps, body, (x, x))


def _annealed_langevin(key, score_fn, sde, x, step: _Step, snr: float, n_steps: int):
  """Annealed Langevin dynamics (Song & Ermon 2019): step size 2 alpha (snr sigma(t))^2."""
  t = _full_t(step.t, x)
  step_size = (snr * step.sigma) ** 2 * 2.0 * step.langevin_alpha

  def body(j, carry):
    x, _ = carry
    grad = score_fn(x, t)
    noise = _normal_like(jax.random.fold_in(key, j), x)
    x_mean = x + step_size * grad
    return x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean

  return jax.lax.fori_loop(0, n_steps, body, (x, x))


PREDICTORS: dict[str, Callable | None] = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "ancestral_sampling": _ancestral_sampling,
    "none": None,
}
CORRECTORS: dict[str, Callable | None] = {
    "langevin": _langevin,
    "ald": _annealed_langevin,
    "none": None,
}


_HOOK_STREAM = 0x686F6F6B  # folded into the key for step-hook draws (apart from the steps')


def _apply_hook(step_hook, key, index, x, x_mean, t):
  """(step_hook(k, x, t), step_hook(None, x_mean, t)) with k drawn for `index`; unchanged
  when there is no hook."""
  if step_hook is None:
    return x, x_mean
  hook_key = jax.random.fold_in(jax.random.fold_in(key, _HOOK_STREAM), index)
  return step_hook(hook_key, x, t), step_hook(None, x_mean, t)


def pc_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *,
              predictor: str = "euler_maruyama", corrector: str = "none", snr: float = 0.16,
              n_steps: int = 1, steps: int | None = None, probability_flow: bool = False,
              denoise: bool = True, eps: float | None = None, x_T: Array | None = None,
              step_hook: Callable | None = None, grid="time_uniform", rho: float = 7.0
              ) -> tuple[Array, int]:
  """Predictor-corrector sampling of the reverse SDE (Song et al. 2021, Algorithm 1).

  On a grid of `steps` times t_i from t_max to eps (`grid`; default uniform, t_i =
  linspace(t_max, eps, steps)), each iteration runs the corrector at t_i, then the predictor
  from t_i to t_{i+1}; the last predictor step goes from eps to the clean data (alpha = 1,
  sigma = 0; for Euler-Maruyama a step of dt = -eps).

  A corrector alone (predictor 'none') needs many more steps than a predictor (e.g. 500
  steps of 5 Langevin steps for a 2-D mixture). 'ald' uses SMLD's step size 2 (snr sigma)^2,
  which stops moving once sigma(t) is small against the data scale: alone, it is a sampler
  for VE (that is SMLD); for VP / sub-VP it ends at a noisier marginal.

  Args:
    key: a `jax.random` key.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward SDE.
    shape: `(B, *D)`.
    predictor: one of `PREDICTORS`: 'euler_maruyama', 'reverse_diffusion',
      'ancestral_sampling' or 'none'.
    corrector: one of `CORRECTORS`: 'langevin', 'ald' (annealed Langevin) or 'none'.
    snr: the correctors' signal-to-noise ratio (> 0).
    n_steps: corrector steps per iteration (>= 1).
    steps: grid size (default `sde.N`).
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE
      (euler_maruyama and reverse_diffusion only).
    denoise: return the mean of the last step (no noise), i.e. the denoised sample.
    eps: the last grid time (default `default_eps(sde)`).
    x_T: optional starting noise `[B, *D]`.
    step_hook: optional `step_hook(key, x, t) -> x`, called inside the loop after every
      corrector step (t = the step's time) and predictor step (t = the next time, 0 at the
      data end) on the sample x, and with `key=None` on the noise-free x_mean; used by
      `guidance.inpaint` to re-impose known pixels. Pure; no extra score evaluations.
    grid, rho: the `steps` times, see `time_grid` (its grid of steps - 1 steps); an explicit
      grid is the `steps` times themselves (steps = its length), the last step going from
      its last entry to the data.

  Returns:
    `(x [B, *D], nfe)` with nfe = steps * ([predictor != 'none'] + n_steps [corrector !=
    'none']).

  Raises:
    ValueError: unknown predictor/corrector, both 'none', or invalid option values.
  """
  check_options(sde, "pc", dict(
      predictor=predictor, corrector=corrector, snr=snr, n_steps=n_steps, steps=steps,
      probability_flow=probability_flow, denoise=denoise, eps=eps, grid=grid, rho=rho))
  eps = _check_eps(eps, sde)
  ts = _point_grid(sde, grid, steps, eps, rho)
  steps = len(ts)
  predictor_fn, corrector_fn = PREDICTORS[predictor], CORRECTORS[corrector]

  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  grid = _grid_steps(sde, ts, x.dtype, to_data=True)

  def body(carry, step):
    x, x_mean = carry
    corrector_key, predictor_key = jax.random.split(jax.random.fold_in(key, step.index))
    if corrector_fn is not None:
      x, x_mean = corrector_fn(corrector_key, score_fn, sde, x, step, snr, n_steps)
      x, x_mean = _apply_hook(step_hook, key, 2 * step.index, x, x_mean, step.t)
    if predictor_fn is not None:
      x, x_mean = predictor_fn(predictor_key, score_fn, sde, x, step, probability_flow)
      x, x_mean = _apply_hook(step_hook, key, 2 * step.index + 1, x, x_mean, step.t_next)
    return (x, x_mean), None

  (x, x_mean), _ = jax.lax.scan(body, (x, x), grid)
  nfe = steps * (int(predictor_fn is not None) + (n_steps if corrector_fn is not None else 0))
  return (x_mean if denoise else x), nfe


# --------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020) and DDIM (Song, Meng & Ermon 2021)
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Clipping / thresholding of the denoised estimate (ddpm, ddim, heun, dpm_solver)
# --------------------------------------------------------------------------------------------

THRESHOLDS = ("none", "static", "dynamic")


def threshold_x0(x0: Array, mode: str = "none", percentile: float = 0.995,
                 data_range: tuple[float, float] = (-1.0, 1.0)) -> Array:
  """Clips a denoised estimate `x0: [B, *D]` into the data range.

  With c, w the centre and half-width of `data_range` and y = (x0 - c) / w (so the data lie in
  [-1, 1]): 'none' returns x0; 'static' clips y to [-1, 1]; 'dynamic' (Saharia et al. 2022,
  Imagen) takes s = max(1, the `percentile` quantile of |y| per example) and returns
  c + w clip(y, -s, s) / s, i.e. it clips the outliers and shrinks the rest back into range.
  Both are the identity on an estimate already in range.
  """
  _check_name("threshold", mode, THRESHOLDS)
  if mode == "none":
    return x0
  lo, hi = data_range
  if not hi > lo:
    raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}")
  if mode == "static":
    return jnp.clip(x0, lo, hi)
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"threshold_percentile must lie in (0, 1], got {percentile}")
  centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
  y = (x0 - centre) / half
  s = jnp.quantile(jnp.abs(y).reshape(y.shape[0], -1), percentile, axis=1)
  s = batch_scalar(jnp.maximum(s, 1.0), y)
  return centre + half * jnp.clip(y, -s, s) / s


def _thresholded(score_fn: ScoreFn, sde: SDE, mode: str, percentile: float,
                 data_range: tuple[float, float]) -> ScoreFn:
  """The score whose Tweedie estimate is `threshold_x0` of `score_fn`'s: x0 = (x + sigma^2
  score) / alpha is thresholded and turned back, score = (alpha x0 - x) / sigma^2. A
  data-prediction sampler driven by it uses the clipped x0 in every update (DDIM's eps_hat is
  recomputed from it, as in Saharia et al.)."""
  _check_name("threshold", mode, THRESHOLDS)
  if mode == "none":
    return score_fn

  def clipped_score_fn(x, t):
    t = _full_t(t, x)
    alpha, sigma = batch_scalar(sde.alpha(t), x), batch_scalar(sde.sigma(t), x)
    x0 = (x + sigma**2 * score_fn(x, t)) / alpha
    return (alpha * threshold_x0(x0, mode, percentile, data_range) - x) / sigma**2

  return clipped_score_fn


DDPM_VARIANCES = ("beta", "posterior", "learned")


def _learned_var(step: _Step, frac: Array) -> Array:
  """Nichol & Dhariwal's interpolated variance exp(f log beta + (1 - f) log beta-tilde), as
  beta^f beta-tilde^(1 - f): exactly beta at f = 1 and beta-tilde at f = 0 (also where
  beta-tilde = 0, the step to the clean data)."""
  return _transition_var(step) ** frac * _posterior_var(step) ** (1.0 - frac)


def ddpm_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
                variance: str = "beta", denoise: bool = True, eps: float | None = None,
                x_T: Array | None = None, threshold: str = "none",
                threshold_percentile: float = 0.995,
                data_range: tuple[float, float] = (-1.0, 1.0), grid="time_uniform",
                rho: float = 7.0, var_interp_fn: ScoreFn | None = None) -> tuple[Array, int]:
  """Ancestral sampling of the DDPM chain (Ho et al. 2020, Algorithm 2), respaced.

  The chain has N = sde.N levels at t = linspace(T, eps, N) (for VP with eps = 1/N these are
  the reference's DDPM levels, alpha_bar_i = alpha(t_i)^2); `steps` <= N of them are kept,
  evenly spaced, and the betas are recomputed from ratios, beta = 1 - alpha_bar_t /
  alpha_bar_s (in general the transition variance G^2 = sigma_t^2 - (alpha_t / alpha_s)^2
  sigma_s^2, so sub-VP and VE work too). From each kept level, with eps_hat = -sigma score:
  x_s = (x_t - G^2 / sigma_t eps_hat) / (alpha_t / alpha_s) + sqrt(var) z; the step from the
  lowest level goes to the clean data.

  Args:
    key, score_fn, sde, shape: as for `pc_sample`.
    steps: number of kept levels, 1 <= steps <= sde.N (default N); NFE = steps.
    variance: 'beta' (sigma^2 = beta, as the reference), 'posterior' (beta-tilde), or
      'learned': the network's (Nichol & Dhariwal 2021, as DiT samples), log sigma^2 =
      f log beta + (1 - f) log beta-tilde per pixel, f = (v + 1) / 2 with v =
      `var_interp_fn(x, t)` (beta, beta-tilde of the respaced step; v = 1 gives 'beta',
      v = -1 'posterior').
    var_interp_fn: with variance='learned' (only then), `(x [B, *D], t [B]) -> v [B, *D]`,
      the variance half of a `learn_sigma` network's output (`ScoreModel.variance_fn`),
      evaluated at the same (x, t) as the score: under jit XLA computes the shared network
      once (compiled flops of a tiny DiT's score and variance together: 14,786,208 against
      14,784,160 for the score alone), and it counts in the NFE as part of that evaluation.
    denoise: no noise on the last step (Ho et al.'s z = 0 at t = 1).
    eps: the lowest level's time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0` ('none' by default; 'static'; 'dynamic' at the given percentile).
    grid, rho: the kept levels. 'time_uniform' (default): the levels of the N-level chain
      (uniform in t from t_max to eps) nearest a uniform grid of `steps` times, i.e. the
      respaced chain above; any other grid of `time_grid` (of steps - 1 steps), or an
      explicit array of the `steps` times, is used as it is.

  Returns:
    `(x [B, *D], nfe = steps)`.
  """
  check_options(sde, "ddpm", dict(
      steps=steps, variance=variance, denoise=denoise, eps=eps, threshold=threshold,
      threshold_percentile=threshold_percentile, data_range=data_range, grid=grid, rho=rho,
      var_interp_fn=var_interp_fn))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  if isinstance(grid, str) and grid == "time_uniform":
    steps = sde.N if steps is None else steps
    levels = time_grid(sde, "time_uniform", sde.N - 1, eps) if sde.N > 1 else np.asarray([eps])
    ts = levels[np.round(np.linspace(0, sde.N - 1, steps)).astype(int)]
  else:
    ts = _point_grid(sde, grid, steps, eps, rho)
  steps = len(ts)
  grid = _grid_steps(sde, ts, x.dtype, to_data=True, denoise=denoise)

  def body(x, step):
    t = _full_t(step.t, x)
    score = score_fn(x, t)
    step_key = jax.random.fold_in(key, step.index)
    if variance == "learned":
      frac = (var_interp_fn(x, t).astype(x.dtype) + 1.0) / 2.0
      r = step.alpha / step.alpha_next
      x_mean = (x + _transition_var(step) * score) / r
      noise = _normal_like(step_key, x)
      return x_mean + jnp.sqrt(_learned_var(step, frac)) * step.noise_scale * noise, None
    x, x_mean = _ancestral_update(step_key, score, x, step, variance)
    return x, None

  x, _ = jax.lax.scan(body, x, grid)
  return x, steps


def ddim_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
                eta: float = 0.0, grid="time_uniform", rho: float = 7.0,
                denoise: bool = True, eps: float | None = None, x_T: Array | None = None,
                threshold: str = "none", threshold_percentile: float = 0.995,
                data_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[Array, int]:
  """DDIM (Song, Meng & Ermon 2021, eq. 12) in continuous time, t_max to eps in `steps` steps.

  With eps_hat = -sigma_t score and x0_hat = (x - sigma_t eps_hat) / alpha_t, each step t -> s
  sets x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
  c^2 = eta^2 sigma_s^2 / sigma_t^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)
  (eta = 0: deterministic, the first-order solver of the probability-flow ODE; eta = 1: DDPM
  with the posterior variance). VE works too (alpha = 1).

  Args:
    key, score_fn, sde, shape: as for `pc_sample`.
    steps: number of steps (default `sde.N`).
    eta: stochasticity, >= 0.
    grid, rho: the times, see `time_grid` (default 'time_uniform'; 'time_quadratic' is
      DDIM's CIFAR-10 setting).
    denoise: end with a Tweedie step at eps (+1 NFE).
    eps: the end time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0` ('none' by default; 'static'; 'dynamic' at the given percentile).

  Returns:
    `(x [B, *D], nfe = steps + denoise)`.
  """
  check_options(sde, "ddim", dict(
      steps=steps, eta=eta, grid=grid, rho=rho, denoise=denoise, eps=eps, threshold=threshold,
      threshold_percentile=threshold_percentile, data_range=data_range))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  ts = _sampler_grid(sde, grid, steps, eps, rho)
  steps = len(ts) - 1
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  grid = _grid_steps(sde, ts, x.dtype, to_data=False)

  def body(x, step):
    score = score_fn(x, _full_t(step.t, x))
    eps_hat = -step.sigma * score
    x0 = (x - step.sigma * eps_hat) / step.alpha
    if eta == 0:
      return step.alpha_next * x0 + step.sigma_next * eps_hat, None
    var = eta**2 * _posterior_var(step)
    noise = _normal_like(jax.random.fold_in(key, step.index), x)
    direction = jnp.sqrt(jnp.maximum(step.sigma_next**2 - var, 0.0))
    return step.alpha_next * x0 + direction * eps_hat + jnp.sqrt(var) * noise, None

  x, _ = jax.lax.scan(body, x, grid)
  if denoise:
    x = _tweedie(score_fn, sde, x, ts[-1])
  return x, steps + int(denoise)


# --------------------------------------------------------------------------------------------
# EDM Heun sampler (Karras et al. 2022, Algorithms 1 and 2)
# --------------------------------------------------------------------------------------------


def heun_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
                rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, denoise: bool = True,
                eps: float | None = None, x_T: Array | None = None, threshold: str = "none",
                threshold_percentile: float = 0.995,
                data_range: tuple[float, float] = (-1.0, 1.0), grid="karras"
                ) -> tuple[Array, int]:
  """Heun's 2nd-order method on the probability-flow ODE in EDM's form.

  Works with x_hat = x / alpha(t) and sigma_hat = sigma(t) / alpha(t) = exp(-log_snr(t)), in
  which every SDE's probability-flow ODE reads dx_hat / dsigma_hat = -sigma(t) score(x, t)
  = (x_hat - D(x_hat; sigma_hat)) / sigma_hat with the denoiser D = Tweedie estimate.
  The `steps` noise levels follow Karras et al.'s schedule (`grid='karras'`, the default)
  sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
  from sigma_hat(t_max) to sigma_hat(eps); time is recovered by `sde.t_from_log_snr` (any
  other grid of `time_grid` gives the times, and sigma_hat follows). With `s_churn` > 0 each
  step first raises the noise level by a factor 1 + gamma, gamma = min(s_churn / steps,
  sqrt(2) - 1) for sigma_i in [s_tmin, s_tmax] (Algorithm 2), adding noise of std
  s_noise sigma_i sqrt(gamma (2 + gamma)) (the form in which gamma = 0 adds exactly none).

  Args:
    key, score_fn, sde, shape: as for `pc_sample`.
    steps: number of noise levels, >= 2 (default `sde.N`).
    rho: schedule exponent (> 0).
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (in sigma_hat units);
      EDM's own stochastic setting is s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003.
    denoise: end with the Euler step from sigma_hat(eps) to 0, which returns D(x; sigma_min).
    eps: the smallest time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0` ('none' by default; 'static'; 'dynamic' at the given percentile).
    grid: the times, see `time_grid` (`steps` noise levels: its grid of steps - 1 steps; an
      explicit grid is the levels' times themselves).

  Returns:
    `(x [B, *D], nfe)`, nfe = 2 (steps - 1) + denoise (= 2 steps - 1 with denoising); x is in
    the SDE's space at eps (x = alpha x_hat) or the denoised data.
  """
  check_options(sde, "heun", dict(
      steps=steps, rho=rho, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
      denoise=denoise, eps=eps, threshold=threshold, threshold_percentile=threshold_percentile,
      data_range=data_range, grid=grid))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  ts_grid = _sampler_grid(sde, grid, None if steps is None else steps - 1, eps, rho)
  steps = len(ts_grid)
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  dtype = x.dtype

  ts = jnp.asarray(ts_grid, dtype)
  sigmas = jnp.exp(-sde.log_snr(ts)).astype(dtype)  # sigma_hat = sigma / alpha
  gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)

  def derivative(x_hat, sigma_hat, t):
    """dx_hat / dsigma_hat = -sigma(t) score(alpha(t) x_hat, t)."""
    tb = _full_t(t, x_hat)
    alpha = sde.alpha(t)
    return -alpha * sigma_hat * score_fn(alpha * x_hat, tb)

  def churn(x_hat, sigma, t, index):
    """Algorithm 2, lines 4-6: raise the noise level from sigma to sigma (1 + gamma)."""
    if gamma_max == 0:
      return x_hat, sigma, t
    gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0).astype(dtype)
    sigma_up = sigma * (1.0 + gamma)
    noise = _normal_like(jax.random.fold_in(key, index), x_hat)
    # sqrt(sigma_up^2 - sigma^2) written as sigma sqrt(gamma (2 + gamma)): XLA may contract
    # the difference of squares into an FMA that is slightly negative (NaN) or positive
    # (spurious noise) when gamma = 0, i.e. outside [s_tmin, s_tmax].
    x_hat = x_hat + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * noise
    t_up = jnp.where(gamma > 0, sde.t_from_log_snr(-jnp.log(sigma_up)), t).astype(dtype)
    return x_hat, sigma_up, t_up

  def body(x_hat, inputs):
    index, sigma, t, sigma_next, t_next = inputs
    x_hat, sigma, t = churn(x_hat, sigma, t, index)
    d = derivative(x_hat, sigma, t)
    x_euler = x_hat + (sigma_next - sigma) * d
    d_next = derivative(x_euler, sigma_next, t_next)
    return x_hat + (sigma_next - sigma) * 0.5 * (d + d_next), None

  x_hat = x / sde.alpha(ts[0])
  inputs = (jnp.arange(steps - 1), sigmas[:-1], ts[:-1], sigmas[1:], ts[1:])
  x_hat, _ = jax.lax.scan(body, x_hat, inputs)
  if not denoise:
    return sde.alpha(ts[-1]) * x_hat, 2 * (steps - 1)
  # Last step: Euler from sigma_min to 0, x_hat - sigma d = D(x_hat; sigma_min).
  x_hat, sigma, t = churn(x_hat, sigmas[-1], ts[-1], steps - 1)
  return x_hat - sigma * derivative(x_hat, sigma, t), 2 * steps - 1


# --------------------------------------------------------------------------------------------
# DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its 3rd order)
# --------------------------------------------------------------------------------------------

def _dpm_orders(steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """Per-step orders: warm-up min(order, k + 1); with `lower_order_final` and fewer than 10
  steps, also at most steps - k (as the DPM-Solver reference implementation)."""
  k = np.arange(steps)
  orders = np.minimum(order, k + 1)
  if lower_order_final and steps < 10:
    orders = np.minimum(orders, steps - k)
  return orders


# The weight of the second divided difference D2 in the third-order DPM-Solver++ update:
# 2 (phi_3) where the Taylor expansion needs it; the published update (and diffusers) has 1.
# Module-level so that the parity test can set the published value and show that this is the
# only difference.
_DPM_SOLVER_D2_WEIGHT = 2.0


def _multistep_lambdas(lambdas: Array, steps: int) -> tuple[Array, Array, Array]:
  """(lambda_{k-1}, lambda_{k-2}, lambda_{k-3}) for each step k of a multistep grid `[steps]`,
  continued linearly below k = 0 (where they are unused: the orders warm up) so that no
  difference of them is zero."""
  h0 = lambdas[1] - lambdas[0]
  ahead = lambdas[0] - h0 * jnp.arange(3, 0, -1, dtype=lambdas.dtype)
  padded = jnp.concatenate([ahead, lambdas])
  return padded[2:2 + steps], padded[1:1 + steps], padded[:steps]


def dpm_solver_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *,
                      steps: int | None = None, order: int = 2, grid="log_snr",
                      rho: float = 7.0, stochastic: bool = False,
                      lower_order_final: bool = True, denoise: bool = True,
                      eps: float | None = None, x_T: Array | None = None,
                      threshold: str = "none", threshold_percentile: float = 0.995,
                      data_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[Array, int]:
  """DPM-Solver++ multistep in data prediction, x0_hat = (x + sigma^2 score) / alpha.

  With lambda = log_snr and h = lambda_s - lambda_t, the order-1 step t -> s is
  x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) x0_hat(t) (exactly DDIM with eta = 0);
  orders 2 and 3 add finite differences of the previous x0_hat's (multistep, one score
  evaluation per step), with lower orders for the first steps.

  With `stochastic=True` this is SDE-DPM-Solver++ (Lu et al. 2022, the 'sde-dpmsolver++'
  of diffusers), the exponential integrator of the reverse SDE in data prediction:
  x_s = (sigma_s / sigma_t) e^{-h} x_t - alpha_s expm1(-2h) (x0_hat + D1 / 2)
  + sigma_s sqrt(-expm1(-2h)) z, with D1 = 0 at order 1 and the divided difference of the
  last two x0_hat's at order 2 (its '2M', midpoint form); z ~ N(0, I) is drawn for step k
  from `fold_in(key, k)`. Orders 1 and 2 only.

  Args:
    key, score_fn, sde, shape: as for `pc_sample`.
    steps: number of steps (default `sde.N`).
    order: 1, 2 or 3 (1 or 2 when `stochastic`).
    grid, rho: the times, see `time_grid` (default 'log_snr', uniform in log-SNR).
    stochastic: SDE-DPM-Solver++ instead of the ODE solver.
    lower_order_final: with fewer than 10 steps, lower the order of the last steps.
    denoise: end with a Tweedie step at eps (+1 NFE).
    eps: the end time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0` ('none' by default; 'static'; 'dynamic' at the given percentile).

  Returns:
    `(x [B, *D], nfe = steps + denoise)`.
  """
  check_options(sde, "dpm_solver", dict(
      steps=steps, order=order, grid=grid, rho=rho, stochastic=stochastic,
      lower_order_final=lower_order_final, denoise=denoise, eps=eps, threshold=threshold,
      threshold_percentile=threshold_percentile, data_range=data_range))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  ts_grid = _sampler_grid(sde, grid, steps, eps, rho)
  steps = len(ts_grid) - 1
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  dtype = x.dtype

  ts = jnp.asarray(ts_grid, dtype)
  lambdas = sde.log_snr(ts).astype(dtype)
  alphas, sigmas = sde.alpha(ts).astype(dtype), sde.sigma(ts).astype(dtype)
  hs = lambdas[1:] - lambdas[:-1]  # [steps], positive
  lambda_1, lambda_2, _ = _multistep_lambdas(lambdas, steps)
  h_prev1 = lambdas[:-1] - lambda_1  # h of the previous two steps
  h_prev2 = lambda_1 - lambda_2
  orders = jnp.asarray(_dpm_orders(steps, order, lower_order_final) - 1)
  d2_weight = _DPM_SOLVER_D2_WEIGHT

  def update(operands, branch):
    x, x0, x0_1, x0_2, h, h1, h2, alpha_s, sigma_s, ratio, noise = operands
    r0 = h1 / h
    if stochastic:
      # (sigma_s / sigma_t) e^{-h} x - alpha_s expm1(-2h) (x0 + D1 / 2) + noise.
      phi = jnp.expm1(-2.0 * h)
      data = x0 if branch == 1 else x0 + 0.5 * (x0 - x0_1) / r0
      return (ratio * jnp.exp(-h) * x - alpha_s * phi * data
              + sigma_s * jnp.sqrt(-phi) * noise)
    phi1 = jnp.expm1(-h)
    first = ratio * x - alpha_s * phi1 * x0
    if branch == 1:
      return first
    d1_0 = (x0 - x0_1) / r0
    if branch == 2:
      return first - 0.5 * alpha_s * phi1 * d1_0
    r1 = h2 / h
    d1_1 = (x0_1 - x0_2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return first + alpha_s * phi2 * d1 - d2_weight * alpha_s * phi3 * d2

  branches = [functools.partial(update, branch=b) for b in (1, 2, 3)][:order]

  def body(carry, inputs):
    x, x0_1, x0_2 = carry
    index, t, alpha, sigma, alpha_s, sigma_s, h, h1, h2, step_order = inputs
    score = score_fn(x, _full_t(t, x))
    x0 = _denoised(x, score, alpha, sigma)
    noise = (_normal_like(jax.random.fold_in(key, index), x) if stochastic
             else jnp.zeros((), x.dtype))
    operands = (x, x0, x0_1, x0_2, h, h1, h2, alpha_s, sigma_s, sigma_s / sigma, noise)
    x = branches[0](operands) if order == 1 else jax.lax.switch(step_order, branches, operands)
    return (x, x0, x0_1), None

  inputs = (jnp.arange(steps), ts[:-1], alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:], hs,
            h_prev1, h_prev2, orders)
  (x, _, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), jnp.zeros_like(x)), inputs)
  if denoise:
    x = _tweedie(score_fn, sde, x, ts_grid[-1])
  return x, steps + int(denoise)


# --------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector, data prediction
# --------------------------------------------------------------------------------------------

UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_coefficients(h: Array, rks: list, order: int, variant: str):
  """The UniPC weights of one step of log-SNR length h > 0 (Zhao et al. 2023, Algorithms 2-3,
  data prediction, B(h) = -h ('bh1') or expm1(-h) ('bh2')).

  Args:
    h: lambda_next - lambda_now (scalar).
    rks: the order - 1 ratios r_k = (lambda_k - lambda_now) / h of the previous points.
    order: p, 1..3.
    variant: 'bh1' | 'bh2'.

  Returns:
    `(h_phi_1, B_h, rhos_p [p - 1], rhos_c [p])`: h_phi_1 = expm1(-h); the predictor's weights
    of the divided differences D_k = (m_k - m_now) / r_k (order 2: 1/2 as in the paper); the
    corrector's weights of D_1..D_{p-1} and of D_t = m_next - m_now (order 1: 1/2).
  """
  hh = -h
  h_phi_1 = jnp.expm1(hh)
  b_h = hh if variant == "bh1" else h_phi_1
  # b_i = i! phi_{i+1}(hh) hh / B(h) with phi_k by the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
  h_phi_k = h_phi_1 / hh - 1.0
  factorial = 1.0
  b = []
  for i in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  r = jnp.stack(list(rks) + [jnp.ones_like(h)])
  matrix = jnp.stack([r**i for i in range(order)])  # [p, p]: row i holds r_k^i
  b = jnp.stack(b)
  if order == 1:
    rhos_p = jnp.zeros((0,), h.dtype)
    rhos_c = jnp.full((1,), 0.5, h.dtype)
  else:
    rhos_p = (jnp.full((1,), 0.5, h.dtype) if order == 2
              else jnp.linalg.solve(matrix[:-1, :-1], b[:-1]))
    rhos_c = jnp.linalg.solve(matrix, b)
  return h_phi_1, b_h, rhos_p, rhos_c


def _weighted(weights: Array, terms: list) -> Array:
  """sum_k weights[k] terms[k] (0 for no terms)."""
  return sum((weights[k] * terms[k] for k in range(len(terms))), jnp.zeros_like(terms[0])
             ) if terms else 0.0


def unipc_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
                 order: int = 2, variant: str = "bh2", corrector: bool = True,
                 lower_order_final: bool = True, grid="log_snr", rho: float = 7.0,
                 denoise: bool = True, eps: float | None = None, x_T: Array | None = None,
                 threshold: str = "none", threshold_percentile: float = 0.995,
                 data_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[Array, int]:
  """UniPC multistep (Zhao et al. 2023) in data prediction, m = x0_hat = (x + sigma^2 score)
  / alpha, on the log-SNR lambda.

  Step k from t_k to t_{k+1} (h = lambda_{k+1} - lambda_k) is the UniP-p predictor
  x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} expm1(-h) m_k
  - alpha_{k+1} B(h) sum_j rho_j D_j, with D_j = (m_{k-j} - m_k) / r_j the divided differences
  of the previous data predictions. With the UniC corrector (default), the evaluation
  m_{k+1} at the predicted x_{k+1} (needed by the next step anyway) first corrects x_{k+1}
  by the same formula with one more point, which raises the order to p + 1 at no extra
  evaluation; the next predictor starts from the corrected point. The last step is not
  corrected (its evaluation would serve nothing else). The order warms up over the first
  steps (min(order, k + 1)); `lower_order_final` lowers it over the last steps on grids
  of fewer than 10 steps (as `dpm_solver`).

  Args:
    key, score_fn, sde, shape: as for `pc_sample` (the key only draws x_T).
    steps: number of steps (default `sde.N`).
    order: p, 1, 2 or 3.
    variant: 'bh2' (B(h) = expm1(-h); the paper's choice for guided sampling, diffusers'
      default) or 'bh1' (B(h) = -h).
    corrector: apply UniC (default True).
    lower_order_final: with fewer than 10 steps, lower the order of the last steps.
    grid, rho: the times, see `time_grid` (default 'log_snr').
    denoise: end with a Tweedie step at eps (+1 NFE), from the last, uncorrected point.
    eps: the end time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0`.

  Returns:
    `(x [B, *D], nfe = steps + denoise)`.
  """
  check_options(sde, "unipc", dict(
      steps=steps, order=order, variant=variant, corrector=corrector,
      lower_order_final=lower_order_final, grid=grid, rho=rho, denoise=denoise, eps=eps,
      threshold=threshold, threshold_percentile=threshold_percentile, data_range=data_range))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  ts_grid = _sampler_grid(sde, grid, steps, eps, rho)
  steps = len(ts_grid) - 1
  x = _initial_x(key, sde, shape, x_T)
  dtype = x.dtype
  ts = jnp.asarray(ts_grid, dtype)
  lambdas = sde.log_snr(ts).astype(dtype)
  alphas, sigmas = sde.alpha(ts).astype(dtype), sde.sigma(ts).astype(dtype)
  lambda_1, lambda_2, lambda_3 = _multistep_lambdas(lambdas, steps)
  predictor_orders = _dpm_orders(steps, order, lower_order_final)
  # The corrector at step k corrects the point step k - 1 predicted, with that step's order
  # (0: no correction, at k = 0 or without the corrector).
  corrector_orders = np.concatenate([[0], predictor_orders[:-1]]) * int(corrector)

  def predict(p, x, ms, lam_now, lams_prev, lam_next, sigma_now, alpha_next, sigma_next):
    """UniP-p from (x, lambda_now) to lambda_next with m_now = ms[0], previous ms[1:p]."""
    h = lam_next - lam_now
    rks = [(lams_prev[j] - lam_now) / h for j in range(p - 1)]
    h_phi_1, b_h, rhos_p, _ = _unipc_coefficients(h, rks, p, variant)
    ds = [(ms[j + 1] - ms[0]) / rks[j] for j in range(p - 1)]
    return (sigma_next / sigma_now * x - alpha_next * h_phi_1 * ms[0]
            - alpha_next * b_h * _weighted(rhos_p, ds))

  def correct(p, x_prev, ms, m_new, lam_prev, lams_before, lam_now, sigma_prev, alpha_now,
              sigma_now):
    """UniC-p: x at lambda_now recomputed from x_prev with m_new = m(x_now) added."""
    h = lam_now - lam_prev
    rks = [(lams_before[j] - lam_prev) / h for j in range(p - 1)]
    h_phi_1, b_h, _, rhos_c = _unipc_coefficients(h, rks, p, variant)
    ds = [(ms[j + 1] - ms[0]) / rks[j] for j in range(p - 1)]
    correction = _weighted(rhos_c[:-1], ds) + rhos_c[-1] * (m_new - ms[0])
    return (sigma_now / sigma_prev * x_prev - alpha_now * h_phi_1 * ms[0]
            - alpha_now * b_h * correction)

  def body(carry, inputs):
    x_prev, x, m1, m2, m3 = carry  # x_prev: the (corrected) point before x; m1..: its m's
    (t, lam_prev3, lam_prev2, lam_prev1, lam, lam_next, sigma_prev, alpha, sigma, alpha_next,
     sigma_next, p_order, c_order) = inputs
    m = _denoised(x, score_fn(x, _full_t(t, x)), batch_scalar(alpha, x), batch_scalar(sigma, x))

    def corrector_branch(c):
      def run(x):
        if c == 0:
          return x
        return correct(c, x_prev, [m1, m2, m3], m, lam_prev1, [lam_prev2, lam_prev3],
                       lam, sigma_prev, alpha, sigma)
      return run

    x = jax.lax.switch(c_order, [corrector_branch(c) for c in range(order + 1)], x)

    def predictor_branch(p):
      return lambda x: predict(p, x, [m, m1, m2], lam, [lam_prev1, lam_prev2], lam_next,
                               sigma, alpha_next, sigma_next)

    x_next = jax.lax.switch(p_order - 1, [predictor_branch(p) for p in range(1, order + 1)], x)
    return (x, x_next, m, m1, m2), None

  sigma_before = jnp.concatenate([sigmas[:1], sigmas[:-2]])  # sigma_{k-1} (unused at k = 0)
  inputs = (ts[:-1], lambda_3, lambda_2, lambda_1, lambdas[:-1], lambdas[1:], sigma_before,
            alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:],
            jnp.asarray(predictor_orders, jnp.int32), jnp.asarray(corrector_orders, jnp.int32))
  zeros = jnp.zeros_like(x)
  (_, x, _, _, _), _ = jax.lax.scan(body, (x, x, zeros, zeros, zeros), inputs)
  if denoise:
    x = _tweedie(score_fn, sde, x, ts_grid[-1])
  return x, steps + int(denoise)


# --------------------------------------------------------------------------------------------
# DEIS multistep (Zhang & Chen 2023), noise prediction, polynomial in log(sigma / alpha)
# --------------------------------------------------------------------------------------------


def _deis_weights(a: Array, ds: list, order: int) -> list:
  """w_j = int_0^a e^v l_j(v) dv for the Lagrange basis l_j through the nodes v = 0, ds[0],
  ds[1] (p = order nodes): the exponential-integrator weights of DEIS.

  With v = log rho - log rho_now (rho = sigma / alpha = e^{-lambda}) and
  I_k = int_0^a e^v v^k dv = a^k e^a - k I_{k-1}, I_0 = expm1(a).
  """
  i0 = jnp.expm1(a)
  if order == 1:
    return [i0]
  i1 = a * jnp.exp(a) - i0
  d1 = ds[0]
  if order == 2:
    return [i0 - i1 / d1, i1 / d1]
  i2 = a * a * jnp.exp(a) - 2.0 * i1
  d2 = ds[1]
  return [(i2 - (d1 + d2) * i1 + d1 * d2 * i0) / (d1 * d2),
          (i2 - d2 * i1) / (d1 * (d1 - d2)),
          (i2 - d1 * i1) / (d2 * (d2 - d1))]


def deis_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
                order: int = 2, lower_order_final: bool = True, grid="log_snr",
                rho: float = 7.0, denoise: bool = True, eps: float | None = None,
                x_T: Array | None = None, threshold: str = "none",
                threshold_percentile: float = 0.995,
                data_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[Array, int]:
  """DEIS multistep (Zhang & Chen 2023, 'tAB' in the variable rho = sigma / alpha).

  With x_hat = x / alpha, the probability-flow ODE is d x_hat / d rho = eps_hat(x, t),
  eps_hat = -sigma score. Each step rho_k -> rho_{k+1} integrates exactly the Lagrange
  polynomial in log rho through the last p = order values of eps_hat (Adams-Bashforth in
  log rho, the exponential integrator of DEIS; diffusers' 'log-rho' DEIS):
  x_{k+1} = alpha_{k+1} (x_k / alpha_k + rho_k sum_j w_j eps_hat_{k-j}). Order 1 is DDIM.
  Orders warm up over the first steps; `lower_order_final` as for `dpm_solver`.

  Args:
    key, score_fn, sde, shape: as for `pc_sample` (the key only draws x_T).
    steps: number of steps (default `sde.N`).
    order: 1, 2 or 3.
    lower_order_final: with fewer than 10 steps, lower the order of the last steps.
    grid, rho: the times, see `time_grid` (default 'log_snr').
    denoise: end with a Tweedie step at eps (+1 NFE).
    eps: the end time (default `default_eps(sde)`).
    x_T: optional starting noise.
    threshold, threshold_percentile, data_range: clipping of the denoised estimate, see
      `threshold_x0`.

  Returns:
    `(x [B, *D], nfe = steps + denoise)`.
  """
  check_options(sde, "deis", dict(
      steps=steps, order=order, lower_order_final=lower_order_final, grid=grid, rho=rho,
      denoise=denoise, eps=eps, threshold=threshold, threshold_percentile=threshold_percentile,
      data_range=data_range))
  score_fn = _thresholded(score_fn, sde, threshold, threshold_percentile, data_range)
  eps = _check_eps(eps, sde)
  ts_grid = _sampler_grid(sde, grid, steps, eps, rho)
  steps = len(ts_grid) - 1
  x = _initial_x(key, sde, shape, x_T)
  dtype = x.dtype
  ts = jnp.asarray(ts_grid, dtype)
  lambdas = sde.log_snr(ts).astype(dtype)
  alphas, sigmas = sde.alpha(ts).astype(dtype), sde.sigma(ts).astype(dtype)
  lambda_1, lambda_2, _ = _multistep_lambdas(lambdas, steps)
  orders = jnp.asarray(_dpm_orders(steps, order, lower_order_final) - 1, jnp.int32)

  def update(p, x, e, e1, e2, lam, lam1, lam2, lam_next, alpha, alpha_next):
    # v = log rho - log rho_now = lambda_now - lambda.
    w = _deis_weights(lam - lam_next, [lam - lam1, lam - lam2], p)
    eps_sum = sum(wj * ej for wj, ej in zip(w, (e, e1, e2)))
    return alpha_next * (x / alpha + jnp.exp(-lam) * eps_sum)

  def body(carry, inputs):
    x, e1, e2 = carry
    t, lam, lam1, lam2, lam_next, alpha, sigma, alpha_next, step_order = inputs
    e = -sigma * score_fn(x, _full_t(t, x))
    branches = [functools.partial(update, p) for p in range(1, order + 1)]
    x = jax.lax.switch(step_order, branches, x, e, e1, e2, lam, lam1, lam2, lam_next, alpha,
                       alpha_next)
    return (x, e, e1), None

  inputs = (ts[:-1], lambdas[:-1], lambda_1, lambda_2, lambdas[1:], alphas[:-1], sigmas[:-1],
            alphas[1:], orders)
  (x, _, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), jnp.zeros_like(x)), inputs)
  if denoise:
    x = _tweedie(score_fn, sde, x, ts_grid[-1])
  return x, steps + int(denoise)


# --------------------------------------------------------------------------------------------
# Probability-flow ODE with diffrax
# --------------------------------------------------------------------------------------------

# The solvers `ode_sample` takes by name (the table lives in `score_sde.solvers`).
ODE_SOLVERS = solvers.SOLVERS

def ode_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, solver: str = "tsit5",
               rtol: float = 1e-5, atol: float = 1e-5, steps: int | None = None,
               max_steps: int | None = None, denoise: bool = True, eps: float | None = None,
               x_T: Array | None = None, return_result: bool = False
               ) -> tuple[Array, Array] | tuple[Array, Array, diffrax.RESULTS]:
  """Solves the probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 from T to eps.

  One diffrax solve (a compiled while loop). Adaptive (PID step-size control in the batch's
  RMS norm, rtol/atol) unless `steps` is given, then fixed steps of (T - eps) / steps.

  Args:
    key, score_fn, sde, shape: as for `pc_sample`.
    solver: one of `ODE_SOLVERS`: 'tsit5' (default), 'dopri5', 'dopri8', 'bosh3', 'heun'
      (adaptive or fixed) or 'euler' (fixed steps only).
    rtol, atol: tolerances of the adaptive step-size controller.
    steps: fixed number of steps (None: adaptive).
    max_steps: cap on step attempts (default 4096 adaptive, `steps` fixed); diffrax raises
      at run time when it is hit (with `return_result`: the result says so).
    denoise: end with a Tweedie step at eps (+1 NFE).
    eps: the end time (default `default_eps(sde)`).
    x_T: optional starting noise.
    return_result: solve with diffrax's `throw=False` (no run-time check, so no host callback
      in the compiled program: it can be stored in the persistent compilation cache) and
      return the solver's result as a third output; check it on the host with
      `solvers.check_result` (x is not meaningful when it failed).

  Returns:
    `(x [B, *D], nfe)` with nfe an int32 array: per step attempt (accepted or rejected) the
    solver's new stages (6 for Tsit5/Dopri5, which reuse the last stage; 2 for Heun; 1 for
    Euler), plus one evaluation at x_T for first-same-as-last solvers, plus `denoise`.
    With `return_result`: `(x, nfe, result)`, result a `diffrax.RESULTS` item.
  """
  import diffrax  # here, not with the module: see `score_sde.solvers`

  check_options(sde, "ode", dict(solver=solver, rtol=rtol, atol=atol, steps=steps,
                                 max_steps=max_steps, denoise=denoise, eps=eps))
  eps = _check_eps(eps, sde)
  if max_steps is None:
    max_steps = 4096 if steps is None else steps
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  dtype = x.dtype
  rsde = sde.reverse(score_fn, probability_flow=True)

  # Integrate in s = -t from -T to -eps, so that the solver moves forward in its own time.
  def vector_field(s, y, args):
    del args
    return -rsde.sde(y, _full_t(-s, y))[0]

  term = diffrax.ODETerm(vector_field)
  ode_solver = solvers.make_solver(solver)
  fsal = solvers.is_fsal(ode_solver)
  # Python floats, not arrays: diffrax's solve is an `equinox.filter_jit`, which traces array
  # arguments, and its check of the direction of dt0 is then decided at trace time instead
  # of compiling a run-time check (a host callback, which keeps the program out of the
  # persistent compilation cache).
  s0, s1 = -float(sde.t_max), -float(eps)
  # Adaptive: an explicit first step (1% of the interval; the controller adapts it from
  # there) rather than diffrax's initial-step heuristic, whose cost in evaluations varies by
  # version.
  dt0 = 0.01 * (s1 - s0) if steps is None else (s1 - s0) / steps
  controller = (diffrax.PIDController(rtol=rtol, atol=atol) if steps is None
                else diffrax.ConstantStepSize())
  # A first-same-as-last solver re-evaluates its first stage on the first step and again
  # after any rejection of that step; seeding its state with f(x_T) makes the count exact.
  solver_state = (jnp.asarray(False), vector_field(s0, x, None)) if fsal else None
  solution = diffrax.diffeqsolve(
      term, ode_solver, s0, s1, dt0, x, stepsize_controller=controller, max_steps=max_steps,
      saveat=diffrax.SaveAt(t1=True), solver_state=solver_state, throw=not return_result)
  x = solution.ys[0]
  nfe = solvers.function_evaluations(ode_solver, solution.stats["num_steps"]) + int(denoise)
  if denoise:
    x = _tweedie(score_fn, sde, x, eps)
  if return_result:
    return x, jnp.asarray(nfe, jnp.int32), solution.result
  return x, jnp.asarray(nfe, jnp.int32)


# --------------------------------------------------------------------------------------------
# The dial: the reverse-time family from the probability-flow ODE (w = 0) to the SDE (w = 1)
# --------------------------------------------------------------------------------------------

SDE_SOLVERS = ("euler", "heun")


def sde_sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, *, steps: int | None = None,
               w: float = 1.0, solver: str = "euler", eps: float | None = None,
               x_T: Array | None = None, denoise: bool = True) -> tuple[Array, int]:
  """Fixed-step solver of the reverse-time family, for any w >= 0,

      dx = [f(x, t) - (1 + w^2) / 2 g(t)^2 score(x, t)] dt + w g(t) dW-bar,

  which has the marginals p_t of the forward SDE whatever w (in the Fokker-Planck equation the
  extra drift -w^2 / 2 g^2 score = -w^2 / 2 g^2 grad log p_t cancels the extra diffusion
  w^2 g^2 / 2 Laplacian): w = 0 is the probability-flow ODE, w = 1 the reverse SDE (Anderson
  1982; Song et al. 2021), larger w contracts more of the accumulated error towards p_t
  (Karras et al. 2022, eq. 6; EDM's churn and DDIM's eta are discrete cousins).

  The grid is uniform in t from `sde.t_max` down to `eps`, `steps` steps of h = (eps -
  t_max) / steps < 0, with Brownian increments dW = sqrt(-h) z, one z per step. Solvers:
    - 'euler': Euler-Maruyama, x' = x + a(x, t) h + w g(t) dW (a the drift above); at w = 0
      the Euler method on the probability-flow ODE (first order).
    - 'heun': the stochastic Heun scheme (Ruemelin 1982; Kloeden & Platen 1992; diffrax's
      `Heun` on an SDE): predictor x~ = x + a(x, t) h + w g(t) dW, then
      x' = x + (a(x, t) + a(x~, s)) h / 2 + w (g(t) + g(s)) / 2 dW with the same dW,
      s = t + h. The noise is additive (g depends on t alone), so its Stratonovich limit is
      the Ito one. At w = 0 it is Heun's (explicit trapezoidal) method: second order.

  Args:
    key: PRNG key (the prior draw unless `x_T` is given, and the Brownian increments).
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward SDE; the grid starts at `sde.t_max` (`T`, or 1 - 1e-3 for rectified
      flow and TrigFlow).
    shape: `(B, *D)`.
    steps: number of steps (default `sde.N`).
    w: the stochasticity, a finite float >= 0; or a traced scalar (an argument of the
      enclosing `jax.jit`, so that one compiled program serves every w), which is not
      checked and always draws the noise (at w = 0 it is multiplied by zero).
    solver: one of `SDE_SOLVERS`, 'euler' or 'heun'.
    eps: the end time (default `default_eps(sde)`), in (0, t_max).
    x_T: optional starting point `[B, *D]` at t_max (default: a prior draw).
    denoise: end with a Tweedie step x0 = (x + sigma^2 score) / alpha at eps (+1 NFE).

  Returns:
    `(x [B, *D], nfe)`, nfe = steps (euler) or 2 steps (heun), + 1 with `denoise`.

  Raises:
    ValueError: w negative or not finite, an unknown solver, bad steps / eps / x_T / shape.
  """
  check_options(sde, "sde", dict(steps=steps, w=w, solver=solver, eps=eps, denoise=denoise))
  static_w = not _is_traced(w)
  w = float(w) if static_w else w
  steps = _check_steps(steps, sde)
  eps = _check_eps(eps, sde)
  key, prior_key = jax.random.split(key)
  x = _initial_x(prior_key, sde, shape, x_T)
  ts = jnp.asarray(np.linspace(sde.t_max, eps, steps + 1), x.dtype)
  scan_over = (jnp.arange(steps), ts[:-1], ts[1:])
  drift_scale = 0.5 * (1.0 + w * w)

  def drift_and_g(x, t):
    t = _full_t(t, x)
    f, g = sde.sde(x, t)
    return f - batch_scalar(drift_scale * g**2, x) * score_fn(x, t), batch_scalar(g, x)

  def body(x, step):
    index, t, s = step
    h = s - t
    drift, g = drift_and_g(x, t)
    if static_w and w == 0.0:
      noise = jnp.zeros_like(x)
    else:
      noise = w * jnp.sqrt(-h) * _normal_like(jax.random.fold_in(key, index), x)  # w dW
    x_pred = x + drift * h + g * noise
    if solver == "euler":
      return x_pred, None
    drift_pred, g_pred = drift_and_g(x_pred, s)
    return x + 0.5 * (drift + drift_pred) * h + 0.5 * (g + g_pred) * noise, None

  x, _ = jax.lax.scan(body, x, scan_over)
  nfe = steps * (1 if solver == "euler" else 2)
  if denoise:
    x = _tweedie(score_fn, sde, x, eps)
  return x, nfe + int(denoise)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable] = {
    "pc": pc_sample,
    "ode": ode_sample,
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "heun": heun_sample,
    "dpm_solver": dpm_solver_sample,
    "unipc": unipc_sample,
    "deis": deis_sample,
    "sde": sde_sample,
}


def sampler_options(method: str) -> tuple[str, ...]:
  """The keyword options a method accepts (e.g. to pick them out of a config); not
  `return_result`, which is an argument of `sample` (what to return), not a sampler option."""
  _check_name("sampling method", method, SAMPLERS)
  parameters = inspect.signature(SAMPLERS[method]).parameters.values()
  return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY
               and p.name != "return_result")


def sample(key: Array, score_fn: ScoreFn, sde: SDE, shape, method: str = "pc", *,
           return_result: bool = False, **options) -> tuple:
  """Draws samples `[B, *D]` with `SAMPLERS[method]`; returns `(x, nfe)`.

  Args:
    key: a `jax.random` key.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward SDE.
    shape: `(B, *D)`.
    method: one of `SAMPLERS` ('pc', 'ode', 'ddpm', 'ddim', 'heun', 'dpm_solver', 'unipc',
      'deis', ...).
    return_result: return `(x, nfe, result)`, with no run-time check compiled in: for 'ode'
      diffrax's result (see `ode_sample`), for the fixed-step methods (which cannot fail)
      `diffrax.RESULTS.successful`. Check it on the host with `solvers.check_result`.
    **options: that method's keyword options (see `sampler_options(method)`).

  Raises:
    ValueError: unknown method, an option renamed (`spacing`, `skip`: now `grid`), or bad
      option values (see `check_options`).
    TypeError: an option the method does not take.
  """
  check_options(sde, method, options)
  if method == "ode":
    return ode_sample(key, score_fn, sde, shape, return_result=return_result, **options)
  x, nfe = SAMPLERS[method](key, score_fn, sde, shape, **options)
  return (x, nfe, solvers.successful()) if return_result else (x, nfe)


# --------------------------------------------------------------------------------------------
# Validation of the options, once, before anything is traced
# --------------------------------------------------------------------------------------------

# Options that were renamed: (method, old name) -> what to pass now.
RENAMED_OPTIONS = {
    ("ddim", "spacing"): "grid='time_uniform' (was spacing='uniform') or "
                         "grid='time_quadratic' (was spacing='quadratic')",
    ("dpm_solver", "skip"): "grid='log_snr' (was skip='logSNR') or "
                            "grid='time_uniform' (was skip='time')",
}

# The methods whose `order` option is a multistep order, and its valid values.
ORDERS = {"dpm_solver": (1, 2, 3), "unipc": (1, 2, 3), "deis": (1, 2, 3)}


def _is_int(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _check_int(name: str, v, minimum: int) -> None:
  if not _is_int(v) or v < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _check_bool(name: str, v) -> None:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {v!r}")


def _check_positive(name: str, v, *, allow_zero: bool = False) -> None:
  ok = _is_number(v) and (v >= 0 if allow_zero else v > 0)
  if not ok:
    raise ValueError(f"{name} must be a number {'>=' if allow_zero else '>'} 0, got {v!r}")


def _is_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def _is_traced(v) -> bool:
  """Whether `v` is a scalar JAX array without a concrete value (an argument of a jit)."""
  if not isinstance(v, jax.Array) or v.shape != ():
    return False
  try:
    float(v)
  except jax.errors.ConcretizationTypeError:
    return True
  return False


def check_options(sde: SDE, method: str, options: dict) -> None:
  """Validates a sampler's options once, before anything is traced or compiled.

  Every sampler calls it on entry; the config edge calls it with the options it builds, so
  a bad config fails with the same message, without tracing a sampler. Options left out
  (or None where None means the default) take the method's defaults. `x_T` is checked
  against the batch shape by the sampler itself.

  Args:
    sde: the forward SDE (its N, t_max; the eps range and explicit grids depend on it).
    method: a name in `SAMPLERS`.
    options: keyword options for `SAMPLERS[method]`, e.g. `dict(steps=10, grid='karras')`.

  Raises:
    ValueError: an unknown method, grid, variant, predictor, corrector, solver, threshold or
      variance (listing the valid ones); an order out of range for the method (1-3; 1-2 with
      `stochastic=True`); an explicit grid that is not a strictly decreasing array within
      [eps, t_max] (naming its first bad entry); a renamed option (`ddim` `spacing`,
      `dpm_solver` `skip`: naming `grid=...`); an out-of-range number; or a combination
      that cannot sample (pc with no predictor and no corrector, ...).
    TypeError: an option the method does not take (listing the valid ones).
  """
  _check_name("sampling method", method, SAMPLERS)
  valid = sampler_options(method)
  for name in options:
    if (method, name) in RENAMED_OPTIONS:
      raise ValueError(f"{method} option {name!r} is now `grid`: pass "
                       f"{RENAMED_OPTIONS[method, name]}; valid grids: {list(GRIDS)} or an "
                       "explicit decreasing array of times")
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise TypeError(f"Sampling method {method!r} takes no option(s) {unknown}; "
                    f"valid: {sorted(valid)}")
  defaults = {p.name: p.default for p in inspect.signature(SAMPLERS[method]).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  o = {**defaults, **options}
  get = o.get

  # --- shared options
  eps = get("eps")
  if "eps" in o:
    if eps is not None and not _is_number(eps):
      raise ValueError(f"eps must be a number, got {eps!r}")
    eps = _check_eps(eps, sde)
  if "steps" in o and get("steps") is not None:
    minimum = 2 if method == "heun" else 1
    _check_int("steps", get("steps"), minimum)
  for name in ("denoise", "lower_order_final", "probability_flow", "stochastic"):
    if name in o:
      _check_bool(name, get(name))
  if "rho" in o:
    _check_positive("rho", get("rho"))
  if "threshold" in o:
    _check_name("threshold", get("threshold"), THRESHOLDS)
    if get("threshold") != "none":
      percentile, data_range = get("threshold_percentile"), get("data_range")
      if not (_is_number(percentile) and 0.0 < percentile <= 1.0):
        raise ValueError(f"threshold_percentile must lie in (0, 1], got {percentile!r}")
      if not (len(data_range) == 2 and data_range[1] > data_range[0]):
        raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}")
  if "grid" in o:
    grid = get("grid")
    if isinstance(grid, str):
      _check_name("grid", grid, GRIDS)
    else:
      ts = _check_explicit_grid(grid, float(sde.t_max), eps)
      steps = get("steps")
      # pc, ddpm and heun take the grid as their `steps` points; the others as steps + 1.
      n = len(ts) if method in ("pc", "ddpm", "heun") else len(ts) - 1
      if steps is not None and steps != n:
        raise ValueError(f"steps = {steps} does not match the explicit grid of {len(ts)} "
                         f"times ({n} for {method}); leave steps unset")
      if method == "heun" and len(ts) < 2:
        raise ValueError("heun needs an explicit grid of at least 2 noise levels")

  # --- per-method options
  if method in ORDERS:
    order = get("order")
    valid_orders = ORDERS[method]
    if method == "dpm_solver" and get("stochastic"):
      valid_orders = (1, 2)
    if not _is_int(order) or order not in valid_orders:
      extra = " with stochastic=True" if valid_orders != ORDERS[method] else ""
      raise ValueError(f"{method} order must be one of {list(valid_orders)}{extra}, "
                       f"got {order!r}")
  if method == "unipc":
    _check_name("UniPC variant", get("variant"), UNIPC_VARIANTS)
    _check_bool("corrector (UniC on/off)", get("corrector"))
  if method == "ddim":
    _check_positive("eta", get("eta"), allow_zero=True)
  if method == "ddpm":
    _check_name("variance", get("variance"), DDPM_VARIANCES)
    learned, fn = get("variance") == "learned", options.get("var_interp_fn")
    if learned and fn is None:
      raise ValueError("ddpm variance='learned' needs var_interp_fn(x, t) -> v, the variance "
                       "half of a learn_sigma network (ScoreModel.variance_fn); valid "
                       f"variances without it: {[v for v in DDPM_VARIANCES if v != 'learned']}")
    if fn is not None and not learned:
      raise ValueError(f"ddpm var_interp_fn is used only with variance='learned', got "
                       f"variance={get('variance')!r}")
    steps = get("steps")
    if steps is not None and steps > sde.N:
      raise ValueError(f"ddpm steps must be <= sde.N = {sde.N} (a subsequence of the chain), "
                       f"got {steps}")
  if method == "heun":
    for name in ("s_churn", "s_noise", "s_tmin", "s_tmax"):
      _check_positive(name, get(name), allow_zero=True)
    if not get("s_tmin") <= get("s_tmax"):
      raise ValueError(f"need s_tmin <= s_tmax, got {get('s_tmin')}, {get('s_tmax')}")
  if method == "pc":
    predictor, corrector = get("predictor"), get("corrector")
    _check_name("predictor", predictor, PREDICTORS)
    _check_name("corrector", corrector, CORRECTORS)
    if predictor == "none" and corrector == "none":
      raise ValueError("predictor and corrector are both 'none': nothing would be sampled")
    if corrector != "none":
      _check_positive("snr", get("snr"))
      _check_int("n_steps", get("n_steps"), 1)
    if get("probability_flow") and predictor == "ancestral_sampling":
      raise ValueError("The ancestral_sampling predictor has no probability-flow version; "
                       "use euler_maruyama or reverse_diffusion")
  if method == "sde":
    _check_name("sde solver", get("solver"), SDE_SOLVERS)
    w = get("w")
    if _is_traced(w):
      pass  # a traced w (one compiled program for every w) cannot be checked here
    elif not (_is_number(w) and math.isfinite(w) and w >= 0):
      raise ValueError(f"w must be a finite number >= 0 (0: probability-flow ODE, 1: reverse "
                       f"SDE), got {w!r}")
  if method == "ode":
    solvers.check_solver(get("solver"))
    steps = get("steps")
    if steps is None and get("solver") == "euler":
      raise ValueError("solver 'euler' has no error estimate: give a fixed number of steps")
    _check_positive("rtol", get("rtol"))
    _check_positive("atol", get("atol"))
    max_steps = get("max_steps")
    if max_steps is not None:
      _check_int("max_steps", max_steps, 1)
      if steps is not None and max_steps < steps:
        raise ValueError(f"max_steps = {max_steps} < steps = {steps}")
