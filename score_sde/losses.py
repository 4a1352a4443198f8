"""Denoising score matching, with the weightings of score-based and diffusion models.

The continuous objective (Song et al. 2021) is

    J(theta) = 1 / (T - eps) int_eps^T lambda(t) E_{x_0, z} || s(x_t, t) + z / sigma(t) ||^2 dt,

x_t = alpha(t) x_0 + sigma(t) z, estimated with one t ~ U(eps, T) per example (T stands for
`sde.t_max`, the first time samplers start from: `sde.T` except for rectified flow and
TrigFlow, whose alpha vanishes at T). Weightings:

- `"sigma2"`: lambda = sigma(t)^2, the reference default; the loss is || sigma s + z ||^2.
- `"likelihood"`: lambda = g(t)^2, which makes J an upper bound on the negative log-likelihood
  (Song, Durkan, Murray & Ermon 2021). With `importance_sampling=True`, t is drawn from
  q(t) proportional to g(t)^2 / sigma(t)^2 and each term reweighted, an unbiased estimator of
  the same J with much lower variance.
- `"x0"`, `"v"`, `"edm"`: the squared error of the x0, v or EDM-denoiser prediction, i.e.
  lambda = sigma^2 w with w = exp(-2 log_snr) (x0: || x0_hat - x0 ||^2 = (sigma / alpha)^2
  || eps_hat - eps ||^2), w = 1 + exp(-2 log_snr) (v: || v_hat - v ||^2 = || eps_hat - eps ||^2
  / a^2, a^2 = alpha^2 / (alpha^2 + sigma^2)) and w = 1 + exp(-2 log_snr) / sigma_data^2 (EDM's
  lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on || D - x0 ||^2, in sigma_hat = sigma /
  alpha; it makes the loss of the raw output F unit-weighted). With the network predicting
  the same quantity, each is the plain MSE of its raw output (up to EDM's c_out).
- `"flow_matching"`: conditional flow matching (Lipman et al. 2023; Liu et al. 2023), the
  squared error of the velocity v = f x - g^2 / 2 s (the probability-flow drift) against the
  conditional velocity alpha' x_0 + sigma' z = f x - g^2 / 2 (-z / sigma): their difference
  is -g^2 / 2 (s + z / sigma), so lambda = (g^2 / 2)^2, i.e. (g^2 / (2 sigma))^2 per unit of
  || sigma s + z ||^2 (= ((alpha sigma' - sigma alpha') / alpha)^2: 1 / (1 - t)^2 for
  rectified flow). With a 'velocity' network it is the plain MSE of its raw output.
- `time_sampling="log_normal"`: instead of t ~ U(eps, T), draw log sigma_hat ~ N(p_mean,
  p_std^2) (EDM: -1.2, 1.2), clipped to the SDE's range [sigma_hat(eps), sigma_hat(t_max)], and
  map it to t by the SDE's inverse log-SNR, t = sde.t_from_log_snr(-log sigma_hat).
- `time_sampling="logit_normal"`: t = sigmoid(n), n ~ N(p_mean, p_std^2) (Stable Diffusion 3,
  Esser et al. 2024: 0, 1), clipped to [eps, t_max]; time itself, for any SDE.
- `"ddpm"` / `"smld"`: the discrete losses: an integer step i ~ U{0..N-1} of the SDE's discrete
  chain (DDPM for VP: this is L_simple of Ho et al. 2020, || eps - eps_hat ||^2; SMLD for VE),
  weighted by its std^2. Both names select the SDE's own chain.

Loss functions take a score function of parameters, `score_fn(params, x, t) -> score`, so they
work for any network (and for analytic models in tests); dropout keys etc. are bound by the
caller.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sde import SDE, batch_scalar

ParamScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, ParamScoreFn, Any, jax.Array], tuple[jax.Array, dict]]

WEIGHTINGS = ("sigma2", "likelihood", "x0", "v", "edm", "ddpm", "smld", "flow_matching")
TIME_SAMPLINGS = ("uniform", "log_normal", "logit_normal")
# (p_mean, p_std) of each non-uniform time sampling when not given: EDM's and SD3's.
TIME_SAMPLING_DEFAULTS = {"log_normal": (-1.2, 1.2), "logit_normal": (0.0, 1.0)}


def _snr_weight(sde: SDE, weighting: str, t: jax.Array, sigma_data: float) -> jax.Array:
  """w(t) of the x0 / v / edm weightings, per unit of || sigma s + z ||^2 (`[B]`)."""
  inv_snr = jnp.exp(-2.0 * sde.log_snr(t))  # sigma_hat^2 = (sigma / alpha)^2
  if weighting == "x0":
    return inv_snr
  if weighting == "v":
    return 1.0 + inv_snr
  return 1.0 + inv_snr / sigma_data**2


def _reduce(v: jax.Array, reduce_mean: bool) -> jax.Array:
  """Mean or sum over all but the batch axis: `[B, *D]` -> `[B]`."""
  v = v.reshape(v.shape[0], -1)
  return jnp.mean(v, axis=-1) if reduce_mean else jnp.sum(v, axis=-1)


class ImportanceSampler:
  """Draws t in [eps, t_max] with density q(t) proportional to g(t)^2 / sigma(t)^2.

  The density is tabulated once on a grid uniform in log t (where it is smooth: it behaves
  like 1/t near 0 for VP), joined with one uniform in log(t_max - t) (where rectified flow's
  2 / (t (1 - t)) is steep, 1 - t_max = 1e-3), and its CDF inverted by interpolation, so it
  works for any SDE. Static data only (numpy arrays), so it can be closed over by a jitted
  function.
  """

  def __init__(self, sde: SDE, eps: float, num_points: int = 4096):
    top = sde.t_max - np.geomspace(1e-5, sde.t_max - eps, num_points)
    t = np.unique(np.concatenate([np.geomspace(eps, sde.t_max, num_points), top[top > eps]]))
    log_t = np.log(t)
    _, g = sde.sde(jnp.zeros((len(t), 1)), jnp.asarray(t, jnp.float32))
    density = np.asarray(g, np.float64) ** 2 / np.asarray(sde.sigma(t), np.float64) ** 2
    # Trapezoid rule in log t: int q dt = int q t d(log t).
    integrand = density * t
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (integrand[1:] + integrand[:-1])
                                           * np.diff(log_t))])
    self.sde, self.eps = sde, eps
    self.normalizer = float(cdf[-1])  # Z = int_eps^t_max g^2 / sigma^2 dt
    self._cdf = (cdf / cdf[-1]).astype(np.float32)
    self._t = t.astype(np.float32)

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """Draws `[n]` times from q."""
    u = jax.random.uniform(key, (n,))
    return jnp.interp(u, self._cdf, self._t)

  def weight(self, t: jax.Array) -> jax.Array:
    """lambda(t) / ((t_max - eps) q(t)) for lambda = g^2, i.e. Z sigma(t)^2 / (t_max - eps):
    the factor that makes a draw t ~ q an unbiased estimate of the uniform-t objective."""
    return self.normalizer * self.sde.sigma(t) ** 2 / (self.sde.t_max - self.eps)


def get_loss_fn(sde: SDE, *, weighting: str = "sigma2", reduce_mean: bool = True,
                eps: float = 1e-5, importance_sampling: bool = False,
                time_sampling: str = "uniform", p_mean: float | None = None,
                p_std: float | None = None, sigma_data: float = 0.5) -> LossFn:
  """Builds a denoising score matching loss.

  Args:
    sde: the forward SDE.
    weighting: one of `WEIGHTINGS` (see the module docstring).
    reduce_mean: average the squared error over dimensions (True) or sum it (False, the
      reference's default for likelihood weighting).
    eps: smallest time of t ~ U(eps, sde.t_max), for the continuous weightings.
    importance_sampling: draw t from q(t) ~ g^2 / sigma^2; only with `weighting="likelihood"`.
    time_sampling: 'uniform' (t ~ U(eps, t_max)), 'log_normal' (EDM's log sigma_hat ~
      N(p_mean, p_std^2), mapped to t through the SDE's inverse log-SNR) or 'logit_normal'
      (SD3's t = sigmoid(n), n ~ N(p_mean, p_std^2)); continuous weightings only.
    p_mean, p_std: mean and std of log sigma_hat ('log_normal') or of logit t
      ('logit_normal'); None: `TIME_SAMPLING_DEFAULTS` (EDM's -1.2, 1.2; SD3's 0, 1).
    sigma_data: the data std of the 'edm' weighting (the `ScoreModel`'s).

  Returns:
    `loss_fn(key, score_fn, params, x0) -> (loss, aux)`: `score_fn(params, x, t)` returns a
    score shaped like x; `x0: [B, *D]` is a data batch (already scaled, e.g. to [-1, 1]);
    `loss` is the batch mean (a scalar) and `aux` a dict with the per-example losses `[B]`.

  Raises:
    ValueError: for an unknown weighting or time sampling, importance sampling without the
      likelihood weighting or with non-uniform times, eps outside (0, t_max), a non-positive
      p_std, or a discrete weighting on an SDE without a discrete chain.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown loss weighting {weighting!r}; valid: {WEIGHTINGS}")
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"Unknown time_sampling {time_sampling!r}; valid: {TIME_SAMPLINGS}")
  if time_sampling != "uniform":
    if importance_sampling or weighting in ("ddpm", "smld"):
      raise ValueError(f"time_sampling={time_sampling!r} needs a continuous weighting without "
                       f"importance sampling, got weighting={weighting!r}, "
                       f"importance_sampling={importance_sampling}")
    default_mean, default_std = TIME_SAMPLING_DEFAULTS[time_sampling]
    p_mean = default_mean if p_mean is None else p_mean
    p_std = default_std if p_std is None else p_std
    if not p_std > 0:
      raise ValueError(f"p_std must be positive, got {p_std}")
  if importance_sampling and weighting != "likelihood":
    raise ValueError("importance_sampling=True needs weighting='likelihood', "
                     f"got weighting={weighting!r}")
  if not 0 < eps < sde.t_max:
    raise ValueError(f"eps must lie in (0, t_max={sde.t_max}), got {eps}")
  if weighting in ("ddpm", "smld"):
    sde.discrete_marginal(jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32))  # raises if none
    return functools.partial(_discrete_loss, sde, reduce_mean)
  sampler = ImportanceSampler(sde, eps) if importance_sampling else None
  if time_sampling == "log_normal":
    sampler = LogNormalSampler(sde, eps, p_mean, p_std)
  if time_sampling == "logit_normal":
    sampler = LogitNormalSampler(sde, eps, p_mean, p_std)
  return functools.partial(_continuous_loss, sde, weighting, reduce_mean, eps, sampler,
                           sigma_data)


class LogNormalSampler:
  """Draws t with log sigma_hat(t) ~ N(p_mean, p_std^2) (EDM's training noise levels),
  sigma_hat = sigma / alpha = exp(-log_snr), clipped to [sigma_hat(eps), sigma_hat(t_max)].

  The loss is then an expectation over this t, not over U(eps, T): `weight` is 1.
  """

  def __init__(self, sde: SDE, eps: float, p_mean: float, p_std: float):
    ends = np.asarray(sde.log_snr(jnp.asarray([sde.t_max, eps], jnp.float32)), np.float64)
    self.sde, self.p_mean, self.p_std = sde, p_mean, p_std
    self._log_snr_range = (float(ends[0]), float(ends[1]))
    self.eps = eps

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """Draws `[n]` times in [eps, t_max]."""
    log_sigma_hat = self.p_mean + self.p_std * jax.random.normal(key, (n,))
    log_snr = jnp.clip(-log_sigma_hat, *self._log_snr_range)
    return jnp.clip(self.sde.t_from_log_snr(log_snr), self.eps, self.sde.t_max)


class LogitNormalSampler:
  """Draws t = sigmoid(n), n ~ N(p_mean, p_std^2) (Esser et al. 2024, Stable Diffusion 3: 0, 1),
  clipped to [eps, t_max]. The density of t is N(logit t; p_mean, p_std^2) / (t (1 - t)).

  The loss is then an expectation over this t, not over U(eps, t_max): `weight` is 1.
  """

  def __init__(self, sde: SDE, eps: float, p_mean: float, p_std: float):
    self.sde, self.eps, self.p_mean, self.p_std = sde, eps, p_mean, p_std

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """Draws `[n]` times in [eps, t_max]."""
    logit_t = self.p_mean + self.p_std * jax.random.normal(key, (n,))
    return jnp.clip(jax.nn.sigmoid(logit_t), self.eps, self.sde.t_max)


def _continuous_loss(sde, weighting, reduce_mean, eps, sampler, sigma_data, key, score_fn, params,
                     x0):
  k_t, k_z = jax.random.split(key)
  b = x0.shape[0]
  if sampler is None:
    t = jax.random.uniform(k_t, (b,), minval=eps, maxval=sde.t_max)
  else:
    t = sampler.sample(k_t, b)
  z = jax.random.normal(k_z, x0.shape, x0.dtype)
  mean, std = sde.marginal_prob(x0, t)
  x_t = mean + batch_scalar(std, x0) * z
  score = score_fn(params, x_t, t)
  # || s + z / sigma ||^2 = || sigma s + z ||^2 / sigma^2: computed without dividing by a tiny
  # sigma inside the norm.
  sq_err = _reduce((batch_scalar(std, x0) * score + z) ** 2, reduce_mean)
  if weighting == "sigma2":
    per_example = sq_err
  elif weighting in ("x0", "v", "edm"):
    per_example = sq_err * _snr_weight(sde, weighting, t, sigma_data)
  elif weighting == "flow_matching":
    # lambda = (g^2 / 2)^2 on || s + z / sigma ||^2 = || sigma s + z ||^2 / sigma^2.
    per_example = sq_err * (0.5 * sde.sde(x_t, t)[1] ** 2 / std) ** 2
  elif not isinstance(sampler, ImportanceSampler):
    per_example = sq_err * sde.sde(x_t, t)[1] ** 2 / std**2
  else:
    per_example = sq_err * sampler.weight(t) / std**2
  return jnp.mean(per_example), {"per_example_loss": per_example, "t": t}


def _discrete_loss(sde, reduce_mean, key, score_fn, params, x0):
  k_i, k_z = jax.random.split(key)
  b = x0.shape[0]
  timestep = jax.random.randint(k_i, (b,), 0, sde.N)
  t = timestep.astype(x0.dtype) * sde.T / (sde.N - 1)
  z = jax.random.normal(k_z, x0.shape, x0.dtype)
  mean, std = sde.discrete_marginal(x0, timestep)
  x_t = mean + batch_scalar(std, x0) * z
  score = score_fn(params, x_t, t)
  per_example = _reduce((batch_scalar(std, x0) * score + z) ** 2, reduce_mean)
  return jnp.mean(per_example), {"per_example_loss": per_example, "t": t}
