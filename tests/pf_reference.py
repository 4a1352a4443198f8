"""An independent probability-flow ODE solve, the reference of the sampler tests' errors."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp


def pf_ode_reference(sde, score_fn, t0: float, eps: float, tol: float, n: int = 32):
  """`(x_T [n, 2] float64, x at eps)`: x_T a prior draw (key 1), carried from `t0` down to
  `eps` by diffrax's Dopri8 at rtol = atol = `tol` on dx/dt = f - g^2 / 2 score, in float64,
  as one compiled program. Call under `jax.enable_x64()`."""

  def vector_field(t, x, args):
    del args
    tb = jnp.full(x.shape[:1], t, x.dtype)
    drift, diffusion = sde.sde(x, tb)
    return drift - 0.5 * (diffusion**2)[:, None] * score_fn(x, tb)

  @jax.jit
  def solve():
    x_T = sde.prior_sampling(jax.random.key(1), (n, 2)).astype(jnp.float64)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0, eps, -1e-3, x_T,
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), max_steps=100_000)
    return x_T, solution.ys[0]

  return solve()
