"""The samplers of score_sde.sampling against the implementations people trust, in float64.

diffusers' schedulers (a test-only dependency) and EDM's Algorithm 2 (Karras et al. 2022,
written out below from the paper) are run on the same problem as ours: the exact score of a
Gaussian mixture, the same x_T, the same noise levels and, where a sampler draws noise, the
same per-step noise. Agreement is at round-off (relative 1e-10 or better, asserted at 1e-9).

Mapping diffusers' discrete timesteps to this codebase's continuous VP time: a diffusers
scheduler knows its noise levels through alpha_bar_k (`alphas_cumprod`, DDIM / DDPM) or
sigma_hat_k = sqrt((1 - alpha_bar_k) / alpha_bar_k) (`sigmas`, the multistep solvers), stored
in float32. We take those levels as they are, upcast them to float64 (on the scheduler too,
so that its arithmetic is float64), and map each to the VPSDE time with the same level,
t_k = sde.t_from_log_snr(-log sigma_hat_k): then alpha(t_k) and sigma(t_k) are diffusers'
alpha_k = 1 / sqrt(1 + sigma_hat_k^2) and sigma_k = sigma_hat_k alpha_k to ~1e-15, and the
explicit grid (t_k) runs our sampler on diffusers' schedule. The network output fed to
diffusers is the exact epsilon, -sigma_k score(x, t_k), of the same mixture. diffusers' last
step to sigma = 0 (`final_sigmas_type='zero'`, `set_alpha_to_one=True`) is first order,
x0_hat: our `denoise=True` Tweedie step at the grid's last time.

Deliberate differences, shown to be exactly that:
- DPM-Solver++ order 3: our D2 weight is 2 phi_3 (third order), diffusers' phi_3; with the
  published weight set (`sampling._DPM_SOLVER_D2_WEIGHT = 1`) ours equals diffusers.
- `lower_order_final`: diffusers lowers the order of its last steps by its own rules (DPM /
  DEIS below 15 steps, UniPC always, counting the final step to sigma = 0); ours below 10
  steps, counting steps to eps. Driving diffusers with our per-step orders (through its own
  warm-up counter `lower_order_nums`) makes the two equal, and with orders whose schedules
  coincide the plain schedulers agree too.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from score_sde import mixtures  # pylint: disable=g-import-not-at-top
from score_sde import sampling  # pylint: disable=g-import-not-at-top
from score_sde import sde as sde_lib  # pylint: disable=g-import-not-at-top

MIX = mixtures.three_gaussians_mixture()
# beta_max 21 rather than 20: then alpha(1)^2 = 2.8e-5 lies below diffusers' lowest
# alpha_bar (4.0e-5 at timestep 999 of its linear schedule), so that every diffusers level has
# a time in (0, 1]. Only the noise levels matter: any VP schedule covering them will do.
VP = sde_lib.VPSDE(beta_max=21.0)
VE = sde_lib.VESDE()
KEY = jax.random.key(0)
SHAPE = (6, 2)
TOL = 1e-9  # relative: max |ours - theirs| / max |theirs|
# DPMSolverMultistepScheduler.step casts the sample to float32 ("upcast"), whatever its dtype,
# so its round-off is float32's (~1e-8 relative over these runs).
DPM_TOL = 1e-6


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _x_T(sde=VP):
  return sde.prior_sampling(jax.random.key(7), SHAPE).astype(jnp.float64)


def _times_of_sigma_hats(sigma_hats) -> np.ndarray:
  """VPSDE times at which sigma / alpha takes the given values (float64)."""
  sigma_hats = jnp.asarray(np.asarray(sigma_hats, np.float64))
  return np.asarray(VP.t_from_log_snr(-jnp.log(sigma_hats)), np.float64)


def _times_of_alpha_bars(alpha_bars) -> np.ndarray:
  alpha_bars = np.asarray(alpha_bars, np.float64)
  return _times_of_sigma_hats(np.sqrt((1.0 - alpha_bars) / alpha_bars))


@jax.jit  # one program for every step of every test, t traced (eager: one per operation)
def _exact_epsilon(x, t):
  tb = jnp.full((x.shape[0],), t, jnp.float64)
  return -VP.sigma(tb)[:, None] * MIX.score(x, tb, VP)


def _epsilon(x: torch.Tensor, t: float) -> torch.Tensor:
  """The exact epsilon prediction -sigma(t) score(x, t) of the mixture under VP."""
  eps = _exact_epsilon(jnp.asarray(x.numpy()), jnp.asarray(t, jnp.float64))
  return torch.from_numpy(np.asarray(eps))


@functools.partial(jax.jit, static_argnums=2)  # one program per shape, the index traced
def _step_noise_flat(key, index, shape):
  key, _ = jax.random.split(key)
  return jax.random.normal(jax.random.fold_in(key, index),
                           (shape[0], int(np.prod(shape[1:]))), jnp.float64)


def _step_noise(key, index, shape):
  """The noise a sampler of score_sde.sampling draws for step `index` from its key: the key
  left after the split that draws x_T, folded with the index, a standard normal flattened
  to [B, prod(D)] (see `sampling._normal_like`)."""
  return np.asarray(_step_noise_flat(key, index, tuple(shape))).reshape(shape)


def _relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs))
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _run_diffusers(scheduler, x_T, times, *, orders=None, noises=None, **step_kwargs):
  """diffusers' sampling loop with the exact epsilon at the mapped times. `orders[k]`, if
  given, sets the multistep order of step k (through the scheduler's warm-up counter);
  `noises[k]` is the variance noise of step k."""
  x = torch.from_numpy(np.asarray(x_T, np.float64))
  for k, timestep in enumerate(scheduler.timesteps):
    if orders is not None:
      scheduler.lower_order_nums = int(orders[k]) - 1
    kwargs = dict(step_kwargs)
    if noises is not None:
      kwargs["variance_noise"] = torch.from_numpy(noises[k])
    x = scheduler.step(_epsilon(x, times[k]), timestep, x, **kwargs).prev_sample
  return x.numpy()


def _float64_sigmas(scheduler):
  """Upcasts a multistep scheduler's float32 sigma table, so that it computes in float64."""
  scheduler.sigmas = scheduler.sigmas.to(torch.float64)
  return scheduler.sigmas.numpy()


# --------------------------------------------------------------------------------------------
# DDIM and DDPM
# --------------------------------------------------------------------------------------------


def _alpha_bar_scheduler(cls, steps, **config):
  scheduler = cls(num_train_timesteps=1000, clip_sample=False, **config)
  scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
  scheduler.set_timesteps(steps)
  alpha_bars = scheduler.alphas_cumprod.numpy()[scheduler.timesteps.numpy()]
  return scheduler, _times_of_alpha_bars(alpha_bars)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(eta):
  scheduler, times = _alpha_bar_scheduler(diffusers.DDIMScheduler, 8, set_alpha_to_one=True)
  scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  x_T = _x_T()
  # diffusers' 8 steps: 7 between its timesteps, the last to alpha_bar = 1 (x0_hat).
  noises = [_step_noise(KEY, k, SHAPE) for k in range(8)]
  theirs = _run_diffusers(scheduler, x_T, times, noises=noises if eta else None, eta=eta)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="ddim", eta=eta,
                              grid=times, eps=float(times[-1]), x_T=x_T)
  assert nfe == 8
  assert _relative_error(ours, theirs) < TOL


@pytest.mark.parametrize("variance,variance_type", [("posterior", "fixed_small"),
                                                    ("beta", "fixed_large")])
def test_ddpm_equals_diffusers_ddpm_scheduler(variance, variance_type, monkeypatch):
  scheduler, times = _alpha_bar_scheduler(diffusers.DDPMScheduler, 7, variance_type=variance_type)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  x_T = _x_T()
  # DDPMScheduler draws its noise itself: hand it ours, step by step.
  draws = iter(_step_noise(KEY, k, SHAPE) for k in range(7))
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                      lambda *args, **kwargs: torch.from_numpy(next(draws)))
  theirs = _run_diffusers(scheduler, x_T, times)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="ddpm",
                              variance=variance, grid=times, eps=float(times[-1]), x_T=x_T)
  assert nfe == 7
  assert _relative_error(ours, theirs) < TOL


# --------------------------------------------------------------------------------------------
# Multistep solvers: DPM-Solver++, SDE-DPM-Solver++, UniPC, DEIS
# --------------------------------------------------------------------------------------------


def _sigma_scheduler(cls, steps, **config):
  scheduler = cls(num_train_timesteps=1000, **config)
  scheduler.set_timesteps(steps)
  sigmas = _float64_sigmas(scheduler)
  return scheduler, sigmas


def _dpm_scheduler(steps, order, algorithm="dpmsolver++", **config):
  return _sigma_scheduler(diffusers.DPMSolverMultistepScheduler, steps, solver_order=order,
                          algorithm_type=algorithm, final_sigmas_type="zero", **config)


def _zero_final_grid(sigmas):
  """Our grid for a schedule that ends at sigma = 0: its positive levels (the last step to
  0 is our denoising step)."""
  assert sigmas[-1] == 0
  return _times_of_sigma_hats(sigmas[:-1])


def _forced_orders(steps, order, lower_order_final):
  """Our per-step orders on a grid of `steps` steps, then 1 for the final step to sigma = 0."""
  return np.append(sampling._dpm_orders(steps, order, lower_order_final), 1)  # pylint: disable=protected-access


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_equals_diffusers_dpmsolver_pp(order):
  """diffusers' own order schedule; ours without lower_order_final has the same one (order 2:
  diffusers lowers only its final step to sigma = 0, which is our Tweedie step)."""
  scheduler, sigmas = _dpm_scheduler(8, order)
  times = _zero_final_grid(sigmas)
  x_T = _x_T()
  theirs = _run_diffusers(scheduler, x_T, times)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="dpm_solver",
                              order=order, grid=times, eps=float(times[-1]), x_T=x_T,
                              lower_order_final=False)
  assert nfe == 8
  assert _relative_error(ours, theirs) < DPM_TOL


@pytest.mark.parametrize("order", [1, 2])
def test_stochastic_dpm_solver_equals_diffusers_sde_dpmsolver_pp(order):
  scheduler, sigmas = _dpm_scheduler(8, order, algorithm="sde-dpmsolver++")
  times = _zero_final_grid(sigmas)
  x_T = _x_T()
  noises = [_step_noise(KEY, k, SHAPE) for k in range(8)]
  theirs = _run_diffusers(scheduler, x_T, times, noises=noises)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="dpm_solver",
                              order=order, stochastic=True, grid=times, eps=float(times[-1]),
                              x_T=x_T, lower_order_final=False)
  assert nfe == 8
  assert _relative_error(ours, theirs) < DPM_TOL
  # The noise matters: another key gives other samples.
  other, _ = sampling.sample(jax.random.key(1), MIX.score_fn(VP), VP, SHAPE,
                             method="dpm_solver", order=order, stochastic=True, grid=times,
                             eps=float(times[-1]), x_T=x_T, lower_order_final=False)
  assert _relative_error(other, theirs) > 1e-3


@pytest.mark.parametrize("stochastic", [False, True])
def test_dpm_solver_lower_order_final_differs_only_by_its_orders(stochastic):
  """On a short grid ours lowers the order of its last steps differently from diffusers;
  run with our orders, diffusers agrees, and the plain schedulers do differ."""
  algorithm = "sde-dpmsolver++" if stochastic else "dpmsolver++"
  x_T = _x_T()
  noises = [_step_noise(KEY, k, SHAPE) for k in range(6)]
  scheduler, sigmas = _dpm_scheduler(6, 2, algorithm, lower_order_final=False)
  times = _zero_final_grid(sigmas)
  ours, _ = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="dpm_solver", order=2,
                            stochastic=stochastic, grid=times, eps=float(times[-1]), x_T=x_T)
  forced = _run_diffusers(scheduler, x_T, times, noises=noises if stochastic else None,
                          orders=_forced_orders(5, 2, True))
  assert _relative_error(ours, forced) < DPM_TOL
  scheduler, _ = _dpm_scheduler(6, 2, algorithm)
  plain = _run_diffusers(scheduler, x_T, times, noises=noises if stochastic else None)
  assert _relative_error(ours, plain) > 1e-6


def test_dpm_solver_order_3_differs_only_by_the_d2_weight(monkeypatch):
  """diffusers' third-order update weights D2 by phi_3 (the published update); ours by
  2 phi_3. With the published weight, ours equals diffusers; with ours, it does not."""
  scheduler, sigmas = _dpm_scheduler(8, 3, lower_order_final=False)
  times = _zero_final_grid(sigmas)
  x_T = _x_T()
  theirs = _run_diffusers(scheduler, x_T, times, orders=_forced_orders(7, 3, False))
  run = lambda: sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="dpm_solver", order=3,
                                grid=times, eps=float(times[-1]), x_T=x_T,
                                lower_order_final=False)[0]
  ours = run()
  monkeypatch.setattr(sampling, "_DPM_SOLVER_D2_WEIGHT", 1.0)
  published = run()
  assert _relative_error(published, theirs) < DPM_TOL
  assert _relative_error(ours, theirs) > 1e-6


UNIPC_CASES = [(order, variant, corrector) for order in (1, 2, 3) for variant in ("bh1", "bh2")
               for corrector in (True, False)]


@pytest.mark.parametrize("order,variant,corrector", UNIPC_CASES)
def test_unipc_equals_diffusers_unipc_scheduler(order, variant, corrector):
  """Every order, variant and corrector setting, with our short-grid orders handed to
  diffusers (their UniPC lowers its last orders on every grid, ours below 10 steps).

  'bh2' ends at sigma = 0 (our denoising step, taken from the last, uncorrected point as
  diffusers' first-order final step does). 'bh1' ends at the lowest training level
  (`final_sigmas_type='sigma_min'`, our grid's last time, no denoising): diffusers' bh1 step
  to sigma = 0 is NaN, B(h) = -h = -inf times a zero correction."""
  to_zero = variant == "bh2"
  scheduler, sigmas = _sigma_scheduler(
      diffusers.UniPCMultistepScheduler, 8, solver_order=order, solver_type=variant,
      final_sigmas_type="zero" if to_zero else "sigma_min", lower_order_final=False,
      disable_corrector=[] if corrector else list(range(8)))
  times = _zero_final_grid(sigmas) if to_zero else _times_of_sigma_hats(sigmas)
  orders = (_forced_orders(7, order, True) if to_zero
            else sampling._dpm_orders(8, order, True))  # pylint: disable=protected-access
  x_T = _x_T()
  theirs = _run_diffusers(scheduler, x_T, times, orders=orders)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="unipc", order=order,
                              variant=variant, corrector=corrector, grid=times,
                              eps=float(times[-1]), x_T=x_T, denoise=to_zero)
  assert nfe == 8
  assert _relative_error(ours, theirs) < TOL
  if order > 1:  # the corrector matters (at order 1 too, but this shows it for the others)
    other, _ = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="unipc", order=order,
                               variant=variant, corrector=not corrector, grid=times,
                               eps=float(times[-1]), x_T=x_T, denoise=to_zero)
    assert _relative_error(other, theirs) > 1e-6


def test_unipc_plain_schedulers_agree_where_the_orders_do():
  """Order 2 on 12 steps: diffusers' lower_order_final (min(order, steps left)) and ours
  (none at 11 steps to eps) give the same orders; the plain schedulers agree."""
  scheduler, sigmas = _sigma_scheduler(diffusers.UniPCMultistepScheduler, 12, solver_order=2,
                                       final_sigmas_type="zero")
  times = _zero_final_grid(sigmas)
  x_T = _x_T()
  theirs = _run_diffusers(scheduler, x_T, times)
  ours, _ = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="unipc", order=2,
                            grid=times, eps=float(times[-1]), x_T=x_T)
  assert _relative_error(ours, theirs) < TOL


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_diffusers_deis_scheduler(order):
  """DEISMultistepScheduler's default schedule ends at the lowest training level (not 0):
  our grid is all its levels, without denoising. Below 10 steps both lower the last orders
  the same way, so the plain scheduler is compared."""
  scheduler, sigmas = _sigma_scheduler(diffusers.DEISMultistepScheduler, 8, solver_order=order)
  times = _times_of_sigma_hats(sigmas)
  x_T = _x_T()
  theirs = _run_diffusers(scheduler, x_T, times)
  ours, nfe = sampling.sample(KEY, MIX.score_fn(VP), VP, SHAPE, method="deis", order=order,
                              grid=times, eps=float(times[-1]), x_T=x_T, denoise=False)
  assert nfe == 8
  assert _relative_error(ours, theirs) < TOL


# --------------------------------------------------------------------------------------------
# EDM's Algorithm 2 (Karras et al. 2022), written out from the paper
# --------------------------------------------------------------------------------------------


def _edm_algorithm_2(denoiser, x_hat_0, sigma_max, sigma_min, n, rho, s_churn, s_tmin, s_tmax,
                     s_noise, noises):
  """EDM's stochastic sampler (Algorithm 2) with sigma(t) = t, s(t) = 1, in numpy float64.

  t_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
  i < N, t_N = 0. For i = 0..N-1: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in
  [S_tmin, S_tmax] else 0; t_hat = t_i + gamma_i t_i; x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps_i,
  eps_i ~ N(0, S_noise^2 I); d_i = (x_hat - D(x_hat; t_hat)) / t_hat;
  x_{i+1} = x_hat + (t_{i+1} - t_hat) d_i; if t_{i+1} != 0, the second-order correction
  d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}, x_{i+1} = x_hat + (t_{i+1} - t_hat)
  (d_i / 2 + d'_i / 2).
  """
  i = np.arange(n)
  ts = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
        ) ** rho
  ts = np.append(ts, 0.0)
  x = x_hat_0
  for i in range(n):
    t_i, t_next = ts[i], ts[i + 1]
    gamma = min(s_churn / n, np.sqrt(2) - 1) if s_tmin <= t_i <= s_tmax else 0.0
    t_hat = t_i + gamma * t_i
    x_hat = x + np.sqrt(t_hat**2 - t_i**2) * s_noise * noises[i]
    d = (x_hat - denoiser(x_hat, t_hat)) / t_hat
    x = x_hat + (t_next - t_hat) * d
    if t_next != 0:
      d_prime = (x - denoiser(x, t_next)) / t_next
      x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
  return x


EDM_SETTINGS = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)


@pytest.mark.parametrize("sde_name,settings", [
    ("vp", {}), ("vp", EDM_SETTINGS), ("ve", {}), ("ve", EDM_SETTINGS)])
def test_heun_equals_edm_algorithm_2(sde_name, settings):
  """Our heun in x_hat = x / alpha, sigma_hat = sigma / alpha is EDM's sampler with the
  denoiser D(x_hat; sigma_hat) = E[x_0 | x_t = alpha x_hat] at the time of that sigma_hat."""
  sde = VP if sde_name == "vp" else VE
  steps, rho = 12, 7.0
  settings = dict(dict(s_churn=0.0, s_tmin=0.0, s_tmax=np.inf, s_noise=1.0), **settings)
  eps = sampling.default_eps(sde)
  x_T = _x_T(sde)
  score_fn = MIX.score_fn(sde)

  def denoiser(x_hat, sigma_hat):
    t = sde.t_from_log_snr(-jnp.log(jnp.asarray(sigma_hat, jnp.float64)))
    tb = jnp.full((SHAPE[0],), t, jnp.float64)
    alpha, sigma = sde.alpha(tb)[:, None], sde.sigma(tb)[:, None]
    x = alpha * jnp.asarray(x_hat)
    return np.asarray((x + sigma**2 * score_fn(x, tb)) / alpha)

  sigma_hat = lambda t: float(jnp.exp(-sde.log_snr(jnp.asarray(t, jnp.float64))))
  noises = [_step_noise(KEY, k, SHAPE) for k in range(steps)]
  x_hat_0 = np.asarray(x_T) / float(sde.alpha(jnp.asarray(sde.t_max, jnp.float64)))
  theirs = _edm_algorithm_2(denoiser, x_hat_0, sigma_hat(sde.t_max), sigma_hat(eps), steps, rho,
                            noises=noises, **settings)
  ours, nfe = sampling.sample(KEY, score_fn, sde, SHAPE, method="heun", steps=steps, rho=rho,
                              x_T=x_T, **settings)
  assert nfe == 2 * steps - 1
  assert _relative_error(ours, theirs) < TOL
