"""Paths through the diffusion, for pictures: a deterministic DDIM trajectory with its
clean-image estimates at every step, and spherical interpolation of noise codes.

    ts, xs, x0s = ddim_trajectory(score_fn, sde, x_T, steps=100, eps=1e-3)
    codes = slerp(z0, z1, jnp.linspace(0, 1, 9))          # [9, B, *D]

Pure functions of a process and a score function (`score_fn(x [B, *D], t [B]) -> [B, *D]`),
usable under `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from score_sde.sde import SDE, batch_scalar


def ddim_trajectory(score_fn, sde: SDE, x_T: jax.Array, steps: int, eps: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Deterministic DDIM (eta = 0) from T to `eps` on a uniform time grid, keeping every state.

  At grid time t the clean-image estimate is Tweedie's, x0_hat = (x_t + sigma^2 score) /
  alpha; the step to the next grid time s is x_s = alpha(s) x0_hat + sigma(s) eps_hat with
  eps_hat = (x_t - alpha(t) x0_hat) / sigma(t). The last step (to `eps`) is taken but its
  state not kept; no final denoising.

  Args:
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: a process with `alpha(t)`, `sigma(t)` and `T`.
    x_T: starting states `[B, *D]` at time T.
    steps: number of DDIM steps, >= 1.
    eps: the final time (> 0).

  Returns:
    `(ts [steps], xs [steps, B, *D], x0_hats [steps, B, *D])`: the grid times T, ..., (the
    one before eps), the state at each and its Tweedie estimate.
  """
  ts = jnp.linspace(sde.T, eps, steps + 1)

  def body(x, ts_pair):
    t, s = ts_pair
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x0 = (x + sigma**2 * score_fn(x, jnp.full(x.shape[:1], t))) / alpha
    eps_hat = (x - alpha * x0) / sigma
    return sde.alpha(s) * x0 + sde.sigma(s) * eps_hat, (x, x0)

  _, (xs, x0s) = jax.lax.scan(body, x_T, (ts[:-1], ts[1:]))
  return ts[:-1], xs, x0s


def slerp(z0: jax.Array, z1: jax.Array, w: jax.Array) -> jax.Array:
  """Spherical interpolation between codes, per example.

  slerp(z0, z1, w) = sin((1 - w) omega) / sin(omega) z0 + sin(w omega) / sin(omega) z1, with
  omega the angle between z0 and z1 (of the flattened example); w = 0 gives z0, w = 1 z1.

  Args:
    z0, z1: codes `[B, *D]` (not parallel: omega > 0).
    w: weights `[K]`, usually in [0, 1].

  Returns:
    `[K, B, *D]`.
  """
  flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
  cos = jnp.sum(flat0 * flat1, -1) / (jnp.linalg.norm(flat0, axis=-1)
                                      * jnp.linalg.norm(flat1, axis=-1))
  omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))  # [B]
  w = w[:, None]  # [K, 1]
  a = jnp.sin((1.0 - w) * omega) / jnp.sin(omega)  # [K, B]
  b = jnp.sin(w * omega) / jnp.sin(omega)
  return batch_scalar(a, z0[None]) * z0[None] + batch_scalar(b, z1[None]) * z1[None]
