"""Forward SDEs of score-based generative modeling (Song et al., ICLR 2021).

Every SDE here has a Gaussian transition kernel from data:

    p_0t(x_t | x_0) = N(x_t; alpha(t) x_0, sigma(t)^2 I),

so the samplers and likelihoods only need a few scalar functions of time, which are methods
of the SDE: `alpha` (signal scale), `sigma` (noise std), `log_snr` (half log signal-to-noise
ratio, lambda = log(alpha / sigma)) and its inverse `t_from_log_snr`. Nothing outside this
module branches on the type of SDE.

Shapes: `x` is `[B, *D]`; `t` is `[B]` (a scalar is broadcast); per-example scalars such as
`diffusion` and `std` are `[B]`. All classes are frozen dataclasses: immutable, hashable, and
usable as static arguments of `jax.jit`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

# Cosine schedule (Nichol & Dhariwal 2021): its beta(t) diverges at t = 1, so SDE time t in
# [0, 1] is mapped to schedule time u = COSINE_T_MAX * t, where alpha(1)^2 ~ 7e-5 (the same
# end point as DPM-Solver's cosine schedule).
COSINE_T_MAX = 0.9946


def batch_scalar(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example scalar `[B]` (or a scalar) to broadcast against `x: [B, *D]`."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _batch_t(t, x: jax.Array) -> jax.Array:
  """Returns `t` as a `[B]` float array of x's dtype."""
  t = jnp.asarray(t, dtype=x.dtype)
  return jnp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t


def sum_except_batch(v: jax.Array) -> jax.Array:
  """Sums `[B, *D]` over all but the batch axis: `[B]`."""
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def _standard_normal_logp(z: jax.Array, scale: float) -> jax.Array:
  """log N(z; 0, scale^2 I) summed over all but the batch axis, in nats. Returns `[B]`."""
  d = np.prod(z.shape[1:])
  return (-0.5 * d * math.log(2 * math.pi * scale**2)
          - 0.5 * sum_except_batch(z**2) / scale**2)


@dataclasses.dataclass(frozen=True)
class SDE(abc.ABC):
  """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T] with a Gaussian kernel.

  Subclasses are dataclasses with a field `N` (number of discretization steps) and define
  `sde`, `log_alpha`, `sigma`, `t_from_log_snr`, `prior_sampling` and `prior_logp`;
  everything else follows. What a network trained on the process predicts is not the
  process's business: `score_sde.models.ScoreModel` owns that.
  """

  @property
  def T(self) -> float:
    """The end time (prior side)."""
    return 1.0

  @property
  def t_max(self) -> float:
    """The first time samplers and the likelihood start from; processes where the score is
    uninformative at T override it."""
    return self.T

  # --- the forward process -------------------------------------------------------------

  @abc.abstractmethod
  def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Drift `[B, *D]` and diffusion coefficient g(t) `[B]` of the forward SDE."""

  @abc.abstractmethod
  def log_alpha(self, t: jax.Array) -> jax.Array:
    """log alpha(t), the log signal scale of the kernel. Elementwise in t."""

  @abc.abstractmethod
  def sigma(self, t: jax.Array) -> jax.Array:
    """sigma(t), the noise std of the kernel p_0t. Elementwise in t."""

  @abc.abstractmethod
  def t_from_log_snr(self, log_snr: jax.Array) -> jax.Array:
    """Inverse of `log_snr`: the time at which log(alpha / sigma) equals `log_snr`."""

  @abc.abstractmethod
  def prior_sampling(self, key: jax.Array, shape) -> jax.Array:
    """Draws x_T from the prior p_T, shape `shape = (B, *D)`."""

  @abc.abstractmethod
  def prior_logp(self, z: jax.Array) -> jax.Array:
    """log p_T(z) in nats, summed over dimensions. `z: [B, *D]` -> `[B]`."""

  def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of the forward chain x_{i+1} = x_i + f_i + G_i z, with step 1/N.

    This default is Euler-Maruyama; VP and VE override it with the DDPM and SMLD chains.
    Returns `(f [B, *D], G [B])`.
    """
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * math.sqrt(dt)

  def discrete_marginal(self, x: jax.Array, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean `[B, *D]` and std `[B]` of step `timestep` (int `[B]`, 0..N-1) of the SDE's
    discrete chain (DDPM for VP, SMLD for VE), the noise levels of the discrete losses."""
    raise ValueError(f"{type(self).__name__} has no discrete chain (only VPSDE, the DDPM "
                     "chain, and VESDE, the SMLD chain, do); use a continuous loss weighting")

  # --- derived quantities --------------------------------------------------------------

  def alpha(self, t: jax.Array) -> jax.Array:
    """alpha(t), the signal scale: E[x_t | x_0] = alpha(t) x_0."""
    return jnp.exp(self.log_alpha(t))

  def log_snr(self, t: jax.Array) -> jax.Array:
    """Half log signal-to-noise ratio lambda(t) = log(alpha(t) / sigma(t)); decreasing in t."""
    return self.log_alpha(t) - jnp.log(self.sigma(t))

  def d_alpha(self, t: jax.Array) -> jax.Array:
    """d alpha / dt, elementwise in t (forward-mode derivative of `alpha`; subclasses with a
    simple closed form override it)."""
    t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
    return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

  def d_sigma(self, t: jax.Array) -> jax.Array:
    """d sigma / dt, elementwise in t (forward-mode derivative of `sigma`; subclasses with a
    simple closed form override it)."""
    t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
    return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

  def marginal_prob(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean `[B, *D]` and std `[B]` of p_0t(x_t | x_0 = x)."""
    t = _batch_t(t, x)
    return batch_scalar(self.alpha(t), x) * x, self.sigma(t)

  def prior_std(self) -> float:
    """Std of the (Gaussian, zero-mean) prior p_T."""
    return 1.0

  @property
  def constant_alpha(self) -> bool:
    """Whether alpha(t) = 1 for all t, i.e. the signal is never scaled (VE-like).

    Samplers ask it for their defaults (`eps` 1e-5 rather than 1e-3; the SMLD variance of
    ancestral sampling). Read off `log_alpha(T) == 0`, since alpha decreases in t; the SDEs
    here answer without computing (no device work on the config-checking path).
    """
    with jax.ensure_compile_time_eval():
      return float(self.log_alpha(jnp.asarray(self.T, jnp.float32))) == 0.0

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE (or probability-flow ODE) driven by `score_fn(x, t)`."""
    return ReverseSDE(self, score_fn, probability_flow)

@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """Reverse-time SDE dx = [f - g^2 score] dt + g dw-bar, or with `probability_flow` the ODE
  dx = [f - g^2 score / 2] dt, for a forward `SDE` and a score function."""

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def T(self) -> float:
    return self.forward.T

  @property
  def N(self) -> int:
    return self.forward.N

  def _scale(self) -> float:
    return 0.5 if self.probability_flow else 1.0

  def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Drift `[B, *D]` and diffusion `[B]` of the reverse SDE (diffusion 0 for the ODE)."""
    t = _batch_t(t, x)
    drift, diffusion = self.forward.sde(x, t)
    score = self.score_fn(x, t)
    drift = drift - batch_scalar(diffusion**2, x) * score * self._scale()
    diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
    return drift, diffusion

  def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The discretized reverse chain: `(rev_f [B, *D], rev_G [B])`."""
    t = _batch_t(t, x)
    f, G = self.forward.discretize(x, t)
    rev_f = f - batch_scalar(G**2, x) * self.score_fn(x, t) * self._scale()
    rev_G = jnp.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


@dataclasses.dataclass(frozen=True)
class _BetaSchedule(SDE):
  """A noise rate beta(t), shared by the VP and sub-VP SDEs; alpha(t) = exp(-B(t) / 2) with
  B(t) = int_0^t beta(s) ds, in closed form for every schedule:

  - 'linear': beta = b0 + t (b1 - b0) (Song et al.); B = b0 t + (b1 - b0) t^2 / 2.
  - 'quadratic': sqrt(beta) linear in t, beta = (sqrt(b0) + t (sqrt(b1) - sqrt(b0)))^2 (the
    DDPM code's 'quad'); B = ((sqrt(b0) + c t)^3 - b0^(3/2)) / (3 c), c = sqrt(b1) - sqrt(b0).
  - 'sigmoid': beta = b0 + (b1 - b0) sigmoid(k (2 t - 1)), k = SIGMOID_K = 6 (the discrete
    chain of sigmoid(linspace(-6, 6, N)), as in GeoDiff); B = b0 t + (b1 - b0)
    (softplus(k (2t - 1)) - softplus(-k)) / (2 k).
  - 'cosine': alpha(t)^2 = cos^2((u + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2),
    u = COSINE_T_MAX t, s = 0.008 (Nichol & Dhariwal), beta = -d log alpha^2 / dt.

  b0 = beta_min, b1 = beta_max (cosine ignores them). The discrete DDPM chain of 'linear',
  'quadratic' and 'sigmoid' has betas beta(i / (N - 1)) / N, i = 0..N-1 (DDPM's linspace /
  quad / sigmoid tables with beta_start = b0 / N, beta_end = b1 / N); cosine's is Nichol &
  Dhariwal's ratio of alpha-bars.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000
  schedule: str = "linear"
  cosine_s: float = 0.008

  SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
  SIGMOID_K = 6.0


  @property
  def constant_alpha(self) -> bool:
    return False

  def __post_init__(self):
    if self.schedule not in self.SCHEDULES:
      raise ValueError(f"Unknown beta schedule {self.schedule!r}; valid: {self.SCHEDULES}")
    if not 0 < self.beta_min < self.beta_max:
      raise ValueError(f"Need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
    if self.N < 1:
      raise ValueError(f"N must be a positive number of steps, got {self.N}")

  def _cos_arg(self, t):
    s = self.cosine_s
    return (COSINE_T_MAX * t + s) / (1.0 + s) * (math.pi / 2)

  def beta(self, t: jax.Array) -> jax.Array:
    """The noise rate beta(t) = -2 d log alpha / dt."""
    b0, b1 = self.beta_min, self.beta_max
    if self.schedule == "linear":
      return b0 + t * (b1 - b0)
    if self.schedule == "quadratic":
      return (math.sqrt(b0) + t * (math.sqrt(b1) - math.sqrt(b0))) ** 2
    if self.schedule == "sigmoid":
      return b0 + (b1 - b0) * jax.nn.sigmoid(self.SIGMOID_K * (2.0 * t - 1.0))
    return COSINE_T_MAX * math.pi / (1.0 + self.cosine_s) * jnp.tan(self._cos_arg(t))

  def integral_beta(self, t: jax.Array) -> jax.Array:
    """B(t) = int_0^t beta(s) ds = -2 log alpha(t)."""
    if self.schedule == "cosine":
      return -2.0 * self.log_alpha(t)
    b0, b1 = self.beta_min, self.beta_max
    if self.schedule == "linear":
      return b0 * t + 0.5 * (b1 - b0) * t**2
    if self.schedule == "quadratic":
      # Expanded, (a + c t)^3 - a^3 = 3 a^2 c t + 3 a c^2 t^2 + c^3 t^3: no cancellation.
      a, c = math.sqrt(b0), math.sqrt(b1) - math.sqrt(b0)
      return a * a * t + a * c * t**2 + c * c * t**3 / 3.0
    k = self.SIGMOID_K
    # softplus(d - k) - softplus(-k), d = 2 k t: as log1p(sigmoid(-k) expm1(d)), free of the
    # cancellation near t = 0 (float32 would lose 3 digits at t = 1e-5); the plain
    # difference further out, where expm1 would overflow.
    d = 2.0 * k * t
    near = jnp.log1p(jax.nn.sigmoid(-k) * jnp.expm1(jnp.minimum(d, 20.0)))
    far = jnp.logaddexp(0.0, d - k) - math.log1p(math.exp(-k))
    return b0 * t + (b1 - b0) * jnp.where(d < 20.0, near, far) / (2.0 * k)

  def log_alpha(self, t: jax.Array) -> jax.Array:
    """log alpha(t) = -1/2 int_0^t beta(s) ds (the reference's `log_mean_coeff`)."""
    if self.schedule != "cosine":
      return -0.5 * self.integral_beta(t)
    # log(cos(a0 + d) / cos(a0)) with a0 = the angle at t = 0. Near t = 0 the ratio is
    # 1 - 2 sin^2(d/2) - tan(a0) sin(d), whose log1p keeps float32 precision; further out
    # the plain difference of logs is accurate.
    a0 = self.cosine_s / (1.0 + self.cosine_s) * (math.pi / 2)
    d = COSINE_T_MAX * t / (1.0 + self.cosine_s) * (math.pi / 2)
    near = jnp.log1p(-2.0 * jnp.sin(0.5 * d) ** 2 - math.tan(a0) * jnp.sin(d))
    far = jnp.log(jnp.cos(self._cos_arg(t))) - math.log(math.cos(a0))
    return jnp.where(d < 0.5, near, far)

  def _t_from_log_alpha(self, log_alpha: jax.Array) -> jax.Array:
    """Inverse of `log_alpha`."""
    b0, b1 = self.beta_min, self.beta_max
    L = -2.0 * log_alpha  # = B(t)
    if self.schedule == "linear":
      # 1/2 t^2 (b1 - b0) + t b0 = L, solved without cancellation.
      return 2.0 * L / (b0 + jnp.sqrt(b0**2 + 2.0 * (b1 - b0) * L))
    if self.schedule == "quadratic":
      # (a + c t)^3 = a^3 + 3 c L; t = (u - a) / c = 3 L / (u^2 + u a + a^2) with u the cube
      # root, free of the cancellation in u - a.
      a, c = math.sqrt(b0), math.sqrt(b1) - math.sqrt(b0)
      u = jnp.cbrt(a**3 + 3.0 * c * L)
      return 3.0 * L / (u * u + u * a + a * a)
    if self.schedule == "sigmoid":
      # B is increasing and convex (beta increases), so Newton's method started above the
      # root converges monotonically. Start: t <= L / b0 (B >= b0 t) on [0, 1]; beyond
      # t = 1, B >= B(1) + beta(1) (t - 1).
      b_one = float(self.integral_beta(1.0))
      beta_one = float(self.beta(1.0))
      t = jnp.where(L <= b_one, jnp.minimum(L / b0, 1.0), 1.0 + (L - b_one) / beta_one)

      def newton(_, t):
        return t - (self.integral_beta(t) - L) / self.beta(t)

      return jax.lax.fori_loop(0, 40, newton, t)
    s = self.cosine_s
    log_cos0 = math.log(math.cos(s / (1 + s) * math.pi / 2))
    u = jnp.arccos(jnp.exp(log_alpha + log_cos0)) * 2.0 * (1.0 + s) / math.pi - s
    t = jnp.maximum(u / COSINE_T_MAX, 0.0)
    # arccos near 1 loses precision for small t: polish with Newton steps on
    # self.log_alpha(t) = log_alpha, whose derivative in t is -beta(t) / 2.
    for _ in range(2):
      t = t + (self.log_alpha(t) - log_alpha) / (0.5 * self.beta(t))
    return t

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z, 1.0)


@dataclasses.dataclass(frozen=True)
class VPSDE(_BetaSchedule):
  """Variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (the DDPM limit).

  alpha(t) = exp(-1/2 int beta), sigma(t) = sqrt(1 - alpha^2). `discretize` is the DDPM chain
  with betas beta_i = beta(t) / N on the N-step grid.
  """

  def sde(self, x, t):
    t = _batch_t(t, x)
    beta = self.beta(t)
    return -0.5 * batch_scalar(beta, x) * x, jnp.sqrt(beta)

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

  def log_snr(self, t):
    log_alpha = self.log_alpha(t)
    return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))

  def t_from_log_snr(self, log_snr):
    # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -1/2 softplus(-2 lambda).
    return self._t_from_log_alpha(-0.5 * jax.nn.softplus(-2.0 * log_snr))

  def discrete_betas(self) -> jax.Array:
    """The N betas of the DDPM chain, `[N]`."""
    if self.schedule == "linear":
      return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)
    if self.schedule != "cosine":  # beta(i / (N - 1)) / N: DDPM's 'quad' and 'sigmoid' tables
      return self.beta(jnp.linspace(0.0, 1.0, self.N)) / self.N
    # 1 - alpha_bar(t_i) / alpha_bar(t_{i-1}) on the grid t_i = (i + 1) / N, capped as in
    # Nichol & Dhariwal.
    grid = jnp.arange(self.N + 1) / self.N
    log_ab = 2.0 * self.log_alpha(grid)
    return jnp.minimum(-jnp.expm1(log_ab[1:] - log_ab[:-1]), 0.999)

  def discrete_marginal(self, x, timestep):
    # alpha_bar_i = prod_{j <= i} (1 - beta_j); x_i = sqrt(alpha_bar_i) x_0 + sqrt(1 - alpha_bar_i) z.
    log_ab = jnp.cumsum(jnp.log1p(-self.discrete_betas()))[timestep]
    return batch_scalar(jnp.exp(0.5 * log_ab), x) * x, jnp.sqrt(-jnp.expm1(log_ab))

  def discretize(self, x, t):
    t = _batch_t(t, x)
    timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
    beta = self.discrete_betas()[timestep]
    f = batch_scalar(jnp.sqrt(1.0 - beta), x) * x - x
    return f, jnp.sqrt(beta)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_BetaSchedule):
  """Sub-VP SDE dx = -1/2 beta x dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dw.

  alpha(t) as for VP, sigma(t) = 1 - alpha(t)^2 (always below the VP std).
  """

  def sde(self, x, t):
    t = _batch_t(t, x)
    beta = self.beta(t)
    # 1 - exp(-2 int beta) = 1 - alpha^4, computed with expm1 so it stays accurate at t -> 0.
    discount = -jnp.expm1(4.0 * self.log_alpha(t))
    return -0.5 * batch_scalar(beta, x) * x, jnp.sqrt(beta * discount)

  def sigma(self, t):
    return -jnp.expm1(2.0 * self.log_alpha(t))

  def log_snr(self, t):
    log_alpha = self.log_alpha(t)
    return log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha))

  def t_from_log_snr(self, log_snr):
    # alpha / sigma = e^lambda with sigma = 1 - alpha^2 gives
    # sigma = 2 / (1 + sqrt(1 + 4 e^{2 lambda})) and alpha = sigma e^lambda.
    sigma = 2.0 / (1.0 + jnp.sqrt(1.0 + 4.0 * jnp.exp(2.0 * log_snr)))
    # Where sigma is small (alpha ~ 1), log alpha = log(1 - sigma) / 2 keeps its precision.
    log_alpha = jnp.where(log_snr > 0, 0.5 * jnp.log1p(-sigma), jnp.log(sigma) + log_snr)
    return self._t_from_log_alpha(log_alpha)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance-exploding SDE dx = sqrt(d sigma^2 / dt) dw, sigma(t) = sigma_min (sigma_max /
  sigma_min)^t (the SMLD / NCSN limit).

  As in the reference codebase the kernel std is sigma(t) itself (the exact value,
  sqrt(sigma(t)^2 - sigma_min^2), differs by O(sigma_min^2)). `discretize` is the SMLD chain
  on N geometrically spaced noise levels.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000


  @property
  def constant_alpha(self) -> bool:
    return True

  def __post_init__(self):
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"Need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
    if self.N < 1:
      raise ValueError(f"N must be a positive number of steps, got {self.N}")

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def sde(self, x, t):
    t = _batch_t(t, x)
    drift = jnp.zeros_like(x)
    return drift, self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

  def log_alpha(self, t):
    return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32)))

  def sigma(self, t):
    return self.sigma_min * jnp.exp(t * self._log_ratio)

  def log_snr(self, t):
    return -(math.log(self.sigma_min) + t * self._log_ratio)

  def t_from_log_snr(self, log_snr):
    return (-log_snr - math.log(self.sigma_min)) / self._log_ratio

  def prior_std(self):
    return self.sigma_max

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _standard_normal_logp(z, self.sigma_max)

  def discrete_sigmas(self) -> jax.Array:
    """The N noise levels of the SMLD chain, increasing, `[N]`."""
    return jnp.exp(jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

  def discretize(self, x, t):
    t = _batch_t(t, x)
    timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
    sigmas = self.discrete_sigmas()
    sigma = sigmas[timestep]
    adjacent = jnp.where(timestep == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(timestep - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

  def discrete_marginal(self, x, timestep):
    return x, self.discrete_sigmas()[timestep]


@dataclasses.dataclass(frozen=True)
class _Interpolant(SDE):
  """An interpolant x_t = alpha(t) x_0 + sigma(t) z from the data (alpha = 1, sigma = 0 at
  t = 0) to pure noise (alpha = 0, sigma = 1 at t = T = 1), with prior N(0, I).

  As an SDE, dx = f(t) x dt + g(t) dw with the drift and diffusion implied by the kernel,
  f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2. Both diverge at t = 1, where
  alpha = 0 and the score -x carries no information about x_0: samplers and the likelihood
  start at `t_max` = 1 - 1e-3 instead (with the prior N(0, I) there; p_t_max is
  N(alpha x_0, sigma^2 I) with alpha = O(1e-3), sigma = 1 - O(1e-3)). `T` stays 1.
  Subclasses define the kernel (`log_alpha`, `sigma`, `t_from_log_snr`, `d_alpha`, `d_sigma`)
  and `_drift_coefficient` (f) and `_diffusion_squared` (g^2) in closed form.
  """

  N: int = 1000

  def __post_init__(self):
    if self.N < 1:
      raise ValueError(f"N must be a positive number of steps, got {self.N}")

  @property
  def t_max(self) -> float:
    """1 - 1e-3: at t = 1 (alpha = 0) the score carries no information and f, g^2 diverge."""
    return 1.0 - 1e-3

  @abc.abstractmethod
  def _drift_coefficient(self, t: jax.Array) -> jax.Array:
    """f(t) = d log alpha / dt (the drift is f(t) x), elementwise in t."""

  @abc.abstractmethod
  def _diffusion_squared(self, t: jax.Array) -> jax.Array:
    """g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2, elementwise in t."""

  def sde(self, x, t):
    t = _batch_t(t, x)
    return batch_scalar(self._drift_coefficient(t), x) * x, jnp.sqrt(self._diffusion_squared(t))

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z, 1.0)


def _float_t(t) -> jax.Array:
  return jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(_Interpolant):
  """Rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023; SiT's
  "linear" interpolant, Stable Diffusion 3): alpha(t) = 1 - t, sigma(t) = t.

  f = -1 / (1 - t), g^2 = 2 t / (1 - t); log-SNR lambda = log((1 - t) / t), so
  t = sigmoid(-lambda). The velocity alpha' x_0 + sigma' z is z - x_0.
  """


  @property
  def constant_alpha(self) -> bool:
    return False

  def log_alpha(self, t):
    return jnp.log1p(-_float_t(t))

  def alpha(self, t):
    return 1.0 - _float_t(t)

  def sigma(self, t):
    return _float_t(t)

  def log_snr(self, t):
    t = _float_t(t)
    return jnp.log1p(-t) - jnp.log(t)

  def t_from_log_snr(self, log_snr):
    return jax.nn.sigmoid(-log_snr)

  def d_alpha(self, t):
    return jnp.full_like(_float_t(t), -1.0)

  def d_sigma(self, t):
    return jnp.ones_like(_float_t(t))

  def _drift_coefficient(self, t):
    return -1.0 / (1.0 - t)

  def _diffusion_squared(self, t):
    return 2.0 * t / (1.0 - t)


@dataclasses.dataclass(frozen=True)
class TrigFlow(_Interpolant):
  """The trigonometric interpolant (SiT's "GVP"; Lu & Song 2024's TrigFlow, there in the
  angle pi t / 2 and with data scaled by sigma_data): alpha(t) = cos(pi t / 2), sigma(t) = sin(pi t / 2), so alpha^2 + sigma^2 = 1 (variance
  preserving).

  f = -pi/2 tan(pi t / 2), g^2 = pi tan(pi t / 2); lambda = -log tan(pi t / 2), so
  t = 2 / pi arctan(exp(-lambda)). Near t = 1 alpha is computed as sin(pi (1 - t) / 2), near
  t = 0 log alpha as log1p(-2 sin^2(pi t / 4)), so neither end loses float32 digits.
  """


  @property
  def constant_alpha(self) -> bool:
    return False

  def log_alpha(self, t):
    t = _float_t(t)
    near_zero = jnp.log1p(-2.0 * jnp.sin(0.25 * math.pi * t) ** 2)
    near_one = jnp.log(jnp.sin(0.5 * math.pi * (1.0 - t)))
    return jnp.where(t < 0.5, near_zero, near_one)

  def alpha(self, t):
    return jnp.sin(0.5 * math.pi * (1.0 - _float_t(t)))  # = cos(pi t / 2)

  def sigma(self, t):
    return jnp.sin(0.5 * math.pi * _float_t(t))

  def t_from_log_snr(self, log_snr):
    # tan(pi t / 2) = exp(-lambda); for lambda < 0, t = 1 - 2 / pi arctan(exp(lambda)) keeps
    # the digits of 1 - t.
    below = jnp.arctan(jnp.exp(-jnp.abs(log_snr))) * (2.0 / math.pi)
    return jnp.where(log_snr >= 0, below, 1.0 - below)

  def d_alpha(self, t):
    return -0.5 * math.pi * self.sigma(t)

  def d_sigma(self, t):
    return 0.5 * math.pi * self.alpha(t)

  def _drift_coefficient(self, t):
    return -0.5 * math.pi * self.sigma(t) / self.alpha(t)

  def _diffusion_squared(self, t):
    return math.pi * self.sigma(t) / self.alpha(t)


SDES: dict[str, type[SDE]] = {"vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE,
                              "rectified_flow": RectifiedFlow, "trigflow": TrigFlow}


def get_sde(name: str, **kwargs) -> SDE:
  """Builds an SDE from its name in `SDES` ('vpsde', 'subvpsde', 'vesde', 'rectified_flow',
  'trigflow') and its parameters."""
  if name not in SDES:
    raise ValueError(f"Unknown SDE {name!r}; valid: {sorted(SDES)}")
  return SDES[name](**kwargs)
