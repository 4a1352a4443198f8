"""Log-likelihoods and bits/dim through the probability-flow ODE (Song et al. 2021, Sec. 4.3).

For the probability-flow ODE dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2, the
instantaneous change of variables (Chen et al. 2018) gives d log p_t(x_t) / dt = -div f~(x_t, t),
hence, integrating from the data side t = eps to the prior side t_max = `sde.t_max` (T for
VP / sub-VP / VE, 1 - 1e-3 for rectified flow and TrigFlow, where f and g diverge at T),

    log p_eps(x) = log p_t_max(z) + int_eps^t_max div f~(x_t, t) dt,      z = x_t_max,

with p_t_max replaced by the SDE's prior (N(0, I) for the interpolants).

`log_likelihood` solves the ODE for x together with the divergence integral in one diffrax
solve (one compiled program), with the divergence either estimated by the Hutchinson-Skilling
trick, div f~ = E_v[v^T (df~/dx) v] for probes with E[v v^T] = I (Rademacher or Gaussian), or
computed exactly as the trace of the Jacobian (D Jacobian-vector products; small D only).

Units: log-likelihoods are in nats per example; `bits_per_dim` turns them into bits per
dimension of 8-bit data (see its docstring for the offset convention). Only `sde.reverse`,
`sde.prior_logp` and `sde.t_max` are used, so any SDE of `score_sde.sde` works.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import solvers
from score_sde.sde import SDE, ScoreFn, sum_except_batch

DIVERGENCES = ("rademacher", "gaussian", "exact")


def log_likelihood(key: jax.Array, score_fn: ScoreFn, sde: SDE, x: jax.Array, *,
                   divergence: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5, solver: str = "tsit5", max_steps: int = 16384,
                   return_result: bool = False) -> tuple:
  """log p_eps(x) by the probability-flow ODE, in nats per example.

  Solves the probability-flow ODE of `sde` driven by `score_fn` from t = eps (data) to
  t = sde.t_max (prior side), together with the divergence integral, with an adaptive diffrax
  solver (`PIDController(rtol, atol)`, first step 0.01 (t_max - eps); the error norm is the RMS over the
  whole batch state, as in the reference's scipy solve). Pure and jittable (`sde`, `score_fn`, and the keyword
  options must be static under `jax.jit`).

  Args:
    key: PRNG key; the Hutchinson probe is drawn from it once per solve (unused for
      divergence='exact').
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`, an estimate of grad_x log p_t(x).
    sde: a forward SDE from `score_sde.sde`.
    x: data `[B, *D]`, scaled as the score model expects (e.g. [-1, 1] for centered data).
    divergence: 'rademacher' or 'gaussian' (Hutchinson-Skilling estimate with one probe per
      example, unbiased), or 'exact' (trace of the full Jacobian: D JVPs per ODE evaluation,
      batched with vmap; for small D).
    rtol, atol: tolerances of the adaptive step-size controller.
    eps: the data-side end time; the result is log p_eps(x).
    solver: an adaptive solver of `solvers.SOLVERS` ('tsit5', 'dopri5', 'dopri8', 'bosh3',
      'heun').
    max_steps: the solver's step budget (the solve fails loudly beyond it).
    return_result: solve with diffrax's `throw=False` (no run-time check, so no host callback
      in the compiled program: it can be stored in the persistent compilation cache) and
      return the solver's result (a `diffrax.RESULTS` item) as a fourth output; check it on
      the host with `solvers.check_result` (logp and z are not meaningful when it failed).

  Returns:
    logp: `[B]`, log p_eps(x) = sde.prior_logp(z) + int_eps^t_max div f~ dt, in nats.
    z: `[B, *D]`, the latent x_t_max.
    nfe: int scalar, the number of ODE-function evaluations (`solvers.function_evaluations`).
      One ODE-function evaluation is one evaluation of the drift and of its divergence on
      the whole batch: one call of `score_fn` inside a forward-mode JVP (Hutchinson; about
      2-3x the cost of a bare score evaluation), or one vmapped batch of D JVPs (exact).

  Raises:
    ValueError: on an unknown `divergence` or `solver` name, or eps outside (0, t_max).
  """
  import diffrax  # here, not with the module: see `score_sde.solvers`

  if divergence not in DIVERGENCES:
    raise ValueError(f"Unknown divergence {divergence!r}; valid: {list(DIVERGENCES)}")
  solvers.check_solver(solver, adaptive=True)
  if not 0 < eps < sde.t_max:
    raise ValueError(f"eps must lie in (0, t_max = {sde.t_max}), got {eps}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point data scaled for the model, got {x.dtype}")
  shape = x.shape
  batch = shape[0]
  dim = int(np.prod(shape[1:]))
  rsde = sde.reverse(score_fn, probability_flow=True)

  def drift(y, t):
    return rsde.sde(y, jnp.full((batch,), t, dtype=y.dtype))[0]

  if divergence == "exact":
    # Column i of every example's Jacobian is the JVP with the i-th unit vector (the drift
    # acts on each example separately, so one batched JVP gives all B columns at once).
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + shape[1:])
    basis = jnp.broadcast_to(basis, (dim,) + shape)

    def drift_and_div(y, t):
      def column(e):
        return jax.jvp(lambda u: drift(u, t), (y,), (e,))
      dy, cols = jax.vmap(column, out_axes=(None, 0))(basis)
      # Diagonal entries d(dy)_i / dy_i: the i-th coordinate of column i.
      div = jnp.sum((cols * basis).reshape(dim, batch, dim), axis=(0, 2))
      return dy, div
  else:
    if divergence == "rademacher":
      probe = jax.random.rademacher(key, shape, dtype=x.dtype)
    else:
      probe = jax.random.normal(key, shape, dtype=x.dtype)

    def drift_and_div(y, t):
      dy, jv = jax.jvp(lambda u: drift(u, t), (y,), (probe,))
      return dy, sum_except_batch(jv * probe)

  def vector_field(t, state, args):
    del args
    y, _ = state
    dy, div = drift_and_div(y, t)
    return dy, div

  erk = solvers.make_solver(solver)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), erk, t0=eps, t1=sde.t_max, dt0=0.01 * (sde.t_max - eps),
      y0=(x, jnp.zeros((batch,), x.dtype)),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=not return_result)
  z, delta_logp = sol.ys[0][0], sol.ys[1][0]
  logp = sde.prior_logp(z) + delta_logp
  nfe = solvers.function_evaluations(erk, sol.stats["num_steps"])
  if return_result:
    return logp, z, nfe, sol.result
  return logp, z, nfe


def bits_per_dim(logp: jax.Array, event_shape, offset: float = 8.0) -> jax.Array:
  """Converts log-densities in nats per example to bits per dimension of 8-bit data.

  bpd = -logp / (D ln 2) + offset, with D = prod(event_shape).

  The offset turns the density of the model's (continuous, rescaled) data into the density of
  dequantized 8-bit data y = k + u in [0, 256)^D (k the integer pixel, u ~ U[0, 1)), the unit
  in which bits/dim are published (Theis et al. 2016; Song et al. 2021, Table 2):
    * data in [0, 1] (`dequantize`: x = y / 256): p_y(y) = p_x(y / 256) / 256^D, so
      -log2 p_y / D = -log2 p_x / D + log2 256, i.e. offset = 8;
    * centered data in [-1, 1] (x = 2 y / 256 - 1 = y / 128 - 1): p_y = p_x / 128^D, so
      offset = log2 128 = 7.
  For instance the uniform density on [0, 1]^D (logp = 0) and on [-1, 1]^D (logp = -D ln 2)
  both give 8 bits/dim: the entropy of uniform 8-bit pixels. Use offset = 0 for the density of
  the continuous data themselves. (The reference codebase uses the same offsets:
  7 - inverse_scaler(-1).)

  Args:
    logp: `[B]` (or any shape) log-densities in nats, e.g. from `log_likelihood`.
    event_shape: the shape of one example, e.g. `x.shape[1:]`; D = prod(event_shape).
    offset: bits added per dimension for the data scaling (8 for [0, 1], 7 for [-1, 1]).

  Returns:
    bits per dimension, shaped like `logp`.
  """
  dim = int(np.prod(event_shape))
  return -logp / (dim * math.log(2.0)) + offset


def dequantize(key: jax.Array, x: jax.Array, *, dtype=jnp.float32) -> jax.Array:
  """Uniform dequantization of 8-bit data to [0, 1): returns (k + u) / 256 with u ~ U[0, 1).

  k is the integer pixel value in {0, ..., 255}: `x` itself for integer input (uint8 images),
  or round(255 x) for float input in [0, 1] stored as k / 255 (what tfds images scaled by
  1/255 and `score_sde.io.datasets` give). This is the reference codebase's
  `(x * 255 + U[0, 1)) / 256`. The result has density 256^D times the probability of k under a
  model of the 8-bit data, which is what `bits_per_dim(..., offset=8)` assumes.

  Args:
    key: PRNG key for the uniform noise.
    x: `[B, *D]` integer pixels in [0, 255], or floats k / 255 in [0, 1].
    dtype: the float dtype of the result.

  Returns:
    `[B, *D]` dequantized data in [0, 1).
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    k = x.astype(dtype)
  else:
    k = jnp.round(x.astype(dtype) * 255.0)
  u = jax.random.uniform(key, x.shape, dtype=dtype)
  return (k + u) / 256.0


def bits_per_dim_of_batch(key: jax.Array, score_fn: ScoreFn, sde: SDE, x01: jax.Array, *,
                          centered: bool, uniform_dequantization: bool = True,
                          return_result: bool = False, **likelihood_options) -> tuple:
  """Bits/dim of a batch of 8-bit data, the number published for image models.

  Dequantizes (when `uniform_dequantization`), scales to [-1, 1] when `centered`, runs
  `log_likelihood` and converts with the matching offset (8 or 7). Without dequantization the
  data are used as given (x01 in [0, 1]) and the same offsets apply.

  Args:
    key: PRNG key (split for the dequantization noise and the Hutchinson probe).
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]` on the model's data scale.
    sde: the forward SDE of the model.
    x01: `[B, *D]` 8-bit data: uint8 pixels or floats k / 255 in [0, 1].
    centered: whether the model works on data in [-1, 1] (`config.data.centered`).
    uniform_dequantization: add U[0, 1) / 256 noise as in `dequantize` (recommended; the
      reference's `bpd` evaluation does so only when `config.data.uniform_dequantization`).
    return_result: as for `log_likelihood`: also return the solver's result (third output).
    **likelihood_options: keyword options of `log_likelihood` (divergence, rtol, atol, eps,
      solver, max_steps).

  Returns:
    bpd: `[B]` bits per dimension.
    nfe: int scalar, ODE-function evaluations of the solve.
    (with `return_result`) result: the solver's `diffrax.RESULTS` item.
  """
  k_deq, k_probe = jax.random.split(key)
  x01 = jnp.asarray(x01)
  if uniform_dequantization:
    x = dequantize(k_deq, x01)
  elif jnp.issubdtype(x01.dtype, jnp.integer):
    x = x01.astype(jnp.float32) / 255.0
  else:
    x = x01
  if centered:
    x = 2.0 * x - 1.0
  logp, _, nfe, *result = log_likelihood(k_probe, score_fn, sde, x,
                                         return_result=return_result, **likelihood_options)
  bpd = bits_per_dim(logp, x.shape[1:], offset=7.0 if centered else 8.0)
  return (bpd, nfe, *result)
