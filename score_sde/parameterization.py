"""What a score network predicts, and how its output becomes a score.

Every SDE here has the kernel x_t = alpha x_0 + sigma z. A network may predict

- `"epsilon"`: the noise z (Ho et al. 2020); score = -eps / sigma. The VP / sub-VP default.
- `"x0"`: the clean data E[x_0 | x_t]; score = (alpha x0 - x) / sigma^2.
- `"v"`: v = a z - b x_0 (Salimans & Ho 2022) with (a, b) = (alpha, sigma) / r,
  r = sqrt(alpha^2 + sigma^2); for VP r = 1, so a = alpha and b = sigma exactly. The network
  sees x / r (x itself for VP).
- `"score"`: the score itself. The VE default (NCSN++ with `scale_by_sigma` divides by sigma
  inside the network).
- `"edm"`: EDM preconditioning (Karras et al. 2022), written in the sigma space of every SDE,
  x_hat = x / alpha, sigma_hat = sigma / alpha = exp(-log_snr): the denoiser is
  D = c_skip x_hat + c_out F(c_in x_hat) with c_skip = sd^2 / (sigma_hat^2 + sd^2),
  c_out = sigma_hat sd / sqrt(sigma_hat^2 + sd^2), c_in = 1 / sqrt(sigma_hat^2 + sd^2)
  (sd = sigma_data). c_in x_hat = x / sqrt(sigma^2 + alpha^2 sd^2): unit variance for data of
  std sd. c_noise is the SDE's own noise label (999 t for VP, sigma for VE), a monotone
  function of sigma_hat as EDM's 1/4 log sigma is; it matches the networks' embeddings.
- `"velocity"`: the velocity dx_t / dt = alpha' x_0 + sigma' z of the interpolant (flow
  matching, Lipman et al. 2023; rectified flow, Liu et al. 2023; SiT), for any SDE; primes are
  time derivatives (`sde.d_alpha(t)`, `sde.d_sigma(t)`). It is the probability-flow drift:
  E[alpha' x_0 + sigma' z | x_t] = f x - g^2 / 2 score, with f = alpha' / alpha and
  g^2 / 2 = sigma sigma' - f sigma^2. The conversions solve the 2x2 system
  (x, velocity) = (alpha x_0 + sigma z, alpha' x_0 + sigma' z), whose determinant
  alpha sigma' - sigma alpha' = -alpha sigma d(log-SNR)/dt is positive for every SDE here.
  The network sees x itself (as SD3 and SiT feed x_t).

`"auto"` picks the SDE's default (the reference codebase's behaviour). With sigma_data = 1
`"edm"` and `"v"` give the same denoiser (c_skip = a^2, c_out = b, F = -v); they differ in
the input scale when sigma_data != 1.

The conversions below are pure functions of the per-example `alpha`, `sigma` (already
broadcast against x) so that tests can check them as exact inverses; those of 'velocity' also
take `d_alpha`, `d_sigma` (broadcast the same way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("auto", "epsilon", "x0", "v", "score", "edm", "velocity")


def check_name(name: str, field: str = "parameterization") -> None:
  """Raises a ValueError naming the valid parameterizations if `name` is not one."""
  if name not in PARAMETERIZATIONS:
    raise ValueError(f"Unknown {field} {name!r}; valid: {PARAMETERIZATIONS}")


# --- conversions between the targets (x is x_t; alpha, sigma broadcast against x) ----------


def eps_to_score(eps: jax.Array, sigma: jax.Array) -> jax.Array:
  return -eps / sigma


def score_to_eps(score: jax.Array, sigma: jax.Array) -> jax.Array:
  return -sigma * score


def x0_to_score(x0: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (alpha * x0 - x) / sigma**2


def score_to_x0(score: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array
                ) -> jax.Array:
  """Tweedie's formula E[x_0 | x_t] = (x + sigma^2 score) / alpha."""
  return (x + sigma**2 * score) / alpha


def eps_to_x0(eps: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x - sigma * eps) / alpha


def x0_to_eps(x0: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x - alpha * x0) / sigma


def v_coefficients(alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(a, b, r)`: a = alpha / r, b = sigma / r, r = sqrt(alpha^2 + sigma^2) (a^2 + b^2 = 1)."""
  r = jnp.sqrt(alpha**2 + sigma**2)
  return alpha / r, sigma / r, r


def eps_x0_to_v(eps: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """v = a eps - b x0."""
  a, b, _ = v_coefficients(alpha, sigma)
  return a * eps - b * x0


def v_to_x0(v: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """x0 = a (x / r) - b v, since x / r = a x0 + b eps."""
  a, b, r = v_coefficients(alpha, sigma)
  return a * (x / r) - b * v


def v_to_eps(v: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """eps = b (x / r) + a v."""
  a, b, r = v_coefficients(alpha, sigma)
  return b * (x / r) + a * v


def edm_coefficients(alpha: jax.Array, sigma: jax.Array, sigma_data: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(c_skip, c_out, c_in)` of EDM in x-space: D = c_skip x + c_out F(c_in x), where
  c_skip = alpha sd^2 / (sigma^2 + alpha^2 sd^2) (EDM's c_skip / alpha, acting on x rather
  than x_hat), c_out = sigma sd / sqrt(sigma^2 + alpha^2 sd^2) (EDM's, sigma_hat = sigma /
  alpha) and c_in = 1 / sqrt(sigma^2 + alpha^2 sd^2) (EDM's c_in / alpha)."""
  sd2 = sigma_data**2
  norm2 = sigma**2 + alpha**2 * sd2
  return alpha * sd2 / norm2, sigma * sigma_data * jax.lax.rsqrt(norm2), jax.lax.rsqrt(norm2)


def velocity_determinant(alpha: jax.Array, sigma: jax.Array, d_alpha: jax.Array,
                         d_sigma: jax.Array) -> jax.Array:
  """W = alpha sigma' - sigma alpha' (> 0): minus the determinant of the map (x_0, z) ->
  (velocity, x). W = 1 for rectified flow, pi / 2 for TrigFlow, sigma' for VE."""
  return alpha * d_sigma - sigma * d_alpha


def eps_x0_to_velocity(eps: jax.Array, x0: jax.Array, d_alpha: jax.Array, d_sigma: jax.Array
                       ) -> jax.Array:
  """velocity = alpha' x0 + sigma' eps."""
  return d_alpha * x0 + d_sigma * eps


def x0_to_velocity(x0: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                   d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """velocity = (sigma' x - W x0) / sigma, with eps = (x - alpha x0) / sigma."""
  w = velocity_determinant(alpha, sigma, d_alpha, d_sigma)
  return (d_sigma * x - w * x0) / sigma


def eps_to_velocity(eps: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                    d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """velocity = (alpha' x + W eps) / alpha, with x0 = (x - sigma eps) / alpha."""
  w = velocity_determinant(alpha, sigma, d_alpha, d_sigma)
  return (d_alpha * x + w * eps) / alpha


def score_to_velocity(score: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                      d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """velocity = f x - g^2 / 2 score = (alpha' x - W sigma score) / alpha: the probability-flow
  drift (f = alpha' / alpha, g^2 / 2 = sigma W / alpha = sigma sigma' - f sigma^2)."""
  w = velocity_determinant(alpha, sigma, d_alpha, d_sigma)
  return (d_alpha * x - w * sigma * score) / alpha


def velocity_to_x0(velocity: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                   d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """x0 = (sigma' x - sigma velocity) / W."""
  w = velocity_determinant(alpha, sigma, d_alpha, d_sigma)
  return (d_sigma * x - sigma * velocity) / w


def velocity_to_eps(velocity: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                    d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """eps = (alpha velocity - alpha' x) / W."""
  w = velocity_determinant(alpha, sigma, d_alpha, d_sigma)
  return (alpha * velocity - d_alpha * x) / w


def velocity_to_score(velocity: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                      d_alpha: jax.Array, d_sigma: jax.Array) -> jax.Array:
  """score = -eps / sigma = (alpha' x - alpha velocity) / (W sigma)."""
  return -velocity_to_eps(velocity, x, alpha, sigma, d_alpha, d_sigma) / sigma


def _derivatives(name: str, d_alpha, d_sigma) -> tuple[jax.Array, jax.Array]:
  """(d_alpha, d_sigma), or a ValueError naming the missing ones."""
  missing = [k for k, v in (("d_alpha", d_alpha), ("d_sigma", d_sigma)) if v is None]
  if missing:
    raise ValueError(f"parameterization {name!r} needs d_alpha and d_sigma (the time "
                     "derivatives of alpha and sigma at t, e.g. sde.d_alpha(t) and "
                     f"sde.d_sigma(t), broadcast against x); missing: {missing}")
  return d_alpha, d_sigma


# --- the network's side ---------------------------------------------------------------------


def network_input(name: str, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
                  sigma_data: float, *, d_alpha: jax.Array | None = None,
                  d_sigma: jax.Array | None = None) -> jax.Array:
  """What the network sees for `x = x_t`: c_in x for 'edm', x / r for 'v', else x (also for
  'velocity', which takes `d_alpha`, `d_sigma` like the other functions here but does not
  need them for its input)."""
  del d_alpha, d_sigma
  if name == "edm":
    return edm_coefficients(alpha, sigma, sigma_data)[2] * x
  if name == "v":
    return x / v_coefficients(alpha, sigma)[2]
  return x


def output_to_x0(name: str, output: jax.Array, x: jax.Array, alpha: jax.Array,
                 sigma: jax.Array, sigma_data: float, *, d_alpha: jax.Array | None = None,
                 d_sigma: jax.Array | None = None) -> jax.Array:
  """The network's estimate of x_0 from its raw `output` (any parameterization).

  Raises:
    ValueError: 'velocity' without `d_alpha` and `d_sigma`; an unknown or unresolved name.
  """
  if name == "x0":
    return output
  if name == "velocity":
    return velocity_to_x0(output, x, alpha, sigma, *_derivatives(name, d_alpha, d_sigma))
  if name == "v":
    return v_to_x0(output, x, alpha, sigma)
  if name == "edm":
    c_skip, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    return c_skip * x + c_out * output
  if name == "epsilon":
    return eps_to_x0(output, x, alpha, sigma)
  if name == "score":
    return score_to_x0(output, x, alpha, sigma)
  check_name(name)
  raise ValueError(f"parameterization {name!r} must be resolved by the SDE first")


def output_to_score(name: str, output: jax.Array, x: jax.Array, alpha: jax.Array,
                    sigma: jax.Array, sigma_data: float, *, d_alpha: jax.Array | None = None,
                    d_sigma: jax.Array | None = None) -> jax.Array:
  """The score from the network's raw `output`. For the data predictions ('x0', 'v',
  'edm') score = (alpha x0_hat - x) / sigma^2; for 'velocity' (which needs `d_alpha`,
  `d_sigma`) `velocity_to_score`.

  Raises:
    ValueError: 'velocity' without `d_alpha` and `d_sigma`; an unknown or unresolved name.
  """
  if name == "velocity":
    return velocity_to_score(output, x, alpha, sigma, *_derivatives(name, d_alpha, d_sigma))
  if name == "epsilon":
    return eps_to_score(output, sigma)
  if name == "score":
    return output
  return x0_to_score(output_to_x0(name, output, x, alpha, sigma, sigma_data), x, alpha, sigma)


def target(name: str, x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array,
           sigma_data: float, *, d_alpha: jax.Array | None = None,
           d_sigma: jax.Array | None = None) -> jax.Array:
  """The regression target of the raw output for x_t = alpha x0 + sigma eps (for tests and
  for losses written in the network's own units); 'velocity' needs `d_alpha`, `d_sigma`.

  Raises:
    ValueError: 'velocity' without `d_alpha` and `d_sigma`; an unknown or unresolved name.
  """
  if name == "velocity":
    return eps_x0_to_velocity(eps, x0, *_derivatives(name, d_alpha, d_sigma))
  x = alpha * x0 + sigma * eps
  if name == "epsilon":
    return eps
  if name == "x0":
    return x0
  if name == "v":
    return eps_x0_to_v(eps, x0, alpha, sigma)
  if name == "score":
    return eps_to_score(eps, sigma)
  if name == "edm":
    c_skip, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    return (x0 - c_skip * x) / c_out
  check_name(name)
  raise ValueError(f"parameterization {name!r} must be resolved by the SDE first")
