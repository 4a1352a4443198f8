"""`ScoreModel`: a network, the process it was trained on, and what it predicts.

The forward process (`score_sde.sde`) says how data diffuse; this wrapper says how a network's
output becomes a score, as EDM's `*Precond` and k-diffusion's `Denoiser` wrap any backbone:

    sm = ScoreModel(network, sde, parameterization="v")
    score_fn = sm.score_fn(variables)          # (x [B, *D], t [B]) -> score [B, *D]
    denoise = sm.denoiser(variables)           # (x, t) -> E[x_0 | x_t]

Per call: `labels = noise_labels(t)`, `output = network.apply(variables, network_input(x, t),
labels, ...)`, `score = output_to_score(output, x, t)`. A new backbone is a Flax module with
the signature `apply(variables, x, labels, train=..., class_labels=..., rngs=...)`; a new
parameterization is a name in `score_sde.parameterization`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde import parameterization as param_lib
from score_sde import sde as sde_lib
from score_sde.sde import batch_scalar

Variables = dict[str, Any]
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

# The reference codebase's time label of continuous VP-type networks: 999 t.
VP_LABEL_SCALE = 999.0


def _batch_t(t, x: jax.Array) -> jax.Array:
  t = jnp.asarray(t, dtype=x.dtype)
  return jnp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t


def mean_output(output: jax.Array, x: jax.Array) -> jax.Array:
  """The part of a network output that predicts the mean: all of it, or the first C channels
  of a network with learned variance (DiT's `learn_sigma` returns 2C: mean, then the
  variance interpolation)."""
  channels = x.shape[-1]
  if output.shape[-1] == channels:
    return output
  if output.shape[-1] == 2 * channels:
    return output[..., :channels]
  raise ValueError(f"network output has {output.shape[-1]} channels for inputs of {channels}; "
                   f"expected {channels} (or {2 * channels} with learned variance)")


@functools.partial(jax.jit, static_argnames=("network", "train"))
def _apply_network(network: nn.Module, variables, x, labels, *, train: bool, class_labels,
                   rngs):
  """`network.apply` as one jitted function, for `ScoreModel.apply` while tracing: a program
  that calls the network several times at the same shapes (a diffrax solve traces its vector
  field four times) traces it once and reuses the jaxpr. Tracing is most of what a warm
  start still spends on a program (the persistent compilation cache stores compiled
  programs, not traces); XLA inlines the call, so the compiled program computes the same."""
  return network.apply(variables, x, labels, train=train, class_labels=class_labels,
                       rngs=rngs)


@dataclasses.dataclass(frozen=True)
class ScoreModel:
  """A score network of a forward process.

  Attributes:
    network: a Flax module, `network.apply(variables, x, labels, train=..., class_labels=...,
      rngs=...) -> output` shaped like x.
    sde: the forward process the network was trained on.
    parameterization: what the network predicts (`score_sde.parameterization`); 'auto' is
      the reference codebase's choice: the score for a process whose signal is never scaled
      (VE), epsilon otherwise.
    sigma_data: the data std assumed by 'edm' (and its loss weighting).
    continuous: continuous-time labels (999 t for VP-type processes, sigma(t) for VE) rather
      than the discrete step (VP) or noise-level (VE) index.

  Raises:
    ValueError: an unknown parameterization, sigma_data <= 0, or a parameterization written in
      continuous time (all but the native one) with `continuous=False`.
  """

  network: nn.Module
  sde: sde_lib.SDE
  parameterization: str = "auto"
  sigma_data: float = 0.5
  continuous: bool = True

  def __post_init__(self):
    param_lib.check_name(self.parameterization)
    if not self.sigma_data > 0:
      raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")
    if not self.continuous and not self.is_native:
      raise ValueError(
          f"parameterization {self.parameterization!r} needs continuous-time training "
          f"(training.continuous=True); with discrete labels use 'auto' "
          f"({self.native_parameterization!r} for {type(self.sde).__name__})")

  # --- what the network predicts ----------------------------------------------------------

  @property
  def native_parameterization(self) -> str:
    """What 'auto' means for `sde`: 'score' where alpha(t) = 1 (VE), else 'epsilon'."""
    return "score" if self.sde.constant_alpha else "epsilon"

  @property
  def resolved_parameterization(self) -> str:
    """`parameterization` with 'auto' replaced by the native one."""
    if self.parameterization == "auto":
      return self.native_parameterization
    return self.parameterization

  @property
  def is_native(self) -> bool:
    return self.resolved_parameterization == self.native_parameterization

  def with_network(self, network: nn.Module) -> "ScoreModel":
    """The same model with another network (e.g. the same one at another precision)."""
    return dataclasses.replace(self, network=network)

  # --- the three conversions ------------------------------------------------------------

  def noise_labels(self, t: jax.Array) -> jax.Array:
    """What the network is conditioned on at times `t` `[B]`, as in the reference codebase:
    continuous VP-type `999 t`, continuous VE sigma(t); discrete VP the step index
    round(t (N - 1) / T), discrete VE the noise-level index counted from the largest."""
    sde = self.sde
    if self.continuous:
      return sde.sigma(t) if sde.constant_alpha else t * VP_LABEL_SCALE
    if sde.constant_alpha:
      return jnp.round((sde.T - t) * (sde.N - 1) / sde.T)
    return jnp.round(t * (sde.N - 1) / sde.T)

  def _kernel(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = _batch_t(t, x)
    return batch_scalar(self.sde.alpha(t), x), batch_scalar(self.sde.sigma(t), x)

  def _derivatives(self, x: jax.Array, t: jax.Array) -> dict:
    """`d_alpha`, `d_sigma` (broadcast against x) where the parameterization needs them
    (the velocity); else nothing."""
    if self.resolved_parameterization != "velocity":
      return {}
    t = _batch_t(t, x)
    return dict(d_alpha=batch_scalar(self.sde.d_alpha(t), x),
                d_sigma=batch_scalar(self.sde.d_sigma(t), x))

  def network_input(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """What the network is fed for x_t: x itself, scaled by c_in for 'edm' and by
    1 / sqrt(alpha^2 + sigma^2) for 'v'."""
    if self.is_native:
      return x
    alpha, sigma = self._kernel(x, t)
    return param_lib.network_input(self.resolved_parameterization, x, alpha, sigma,
                                   self.sigma_data, **self._derivatives(x, t))

  def output_to_score(self, output: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """The score `[B, *D]` from the network's raw `output` at x_t = `x`, times `t` `[B]`.

    Native epsilon: -output / sigma(t) (with discrete labels, the std of the process's
    discrete chain); native score (VE): the output itself (NCSN++ with `scale_by_sigma`
    divides by sigma inside the network); the others through `score_sde.parameterization`.
    """
    name = self.resolved_parameterization
    if self.is_native and name == "score":
      return output
    t = _batch_t(t, x)
    if self.is_native:  # epsilon
      if self.continuous:
        std = self.sde.sigma(t)
      else:
        timestep = jnp.round(t * (self.sde.N - 1) / self.sde.T).astype(jnp.int32)
        _, std = self.sde.discrete_marginal(output, timestep)
      return -output / batch_scalar(std, output)
    alpha, sigma = self._kernel(x, t)
    return param_lib.output_to_score(name, output, x, alpha, sigma, self.sigma_data,
                                     **self._derivatives(x, t))

  def output_to_x0(self, output: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """The estimate of E[x_0 | x_t = x] from the raw `output` (Tweedie's formula for the
    score and epsilon predictions)."""
    alpha, sigma = self._kernel(x, t)
    name = self.resolved_parameterization
    if name in ("epsilon", "score"):
      score = self.output_to_score(output, x, t)
      return param_lib.score_to_x0(score, x, alpha, sigma)
    return param_lib.output_to_x0(name, output, x, alpha, sigma, self.sigma_data,
                                  **self._derivatives(x, t))

  # --- functions of the variables -------------------------------------------------------

  def apply(self, variables: Variables, x: jax.Array, t: jax.Array, *,
            class_labels: jax.Array | None = None, train: bool = False,
            rng: jax.Array | None = None) -> jax.Array:
    """The network's raw output at x_t = `x` `[B, *D]`, times `t` `[B]`.

    Args:
      variables: the network's variables (all collections).
      class_labels: `[B]` int labels (num_classes = the null label) of a class-conditional
        network, or None.
      train: training mode (dropout on; then `rng` is the dropout key).
    """
    t = _batch_t(t, x)
    rngs = {"dropout": rng} if rng is not None else None
    x_in, labels = self.network_input(x, t), self.noise_labels(t)
    if not isinstance(x_in, jax.core.Tracer):  # eager: op by op, as it always was
      return self.network.apply(variables, x_in, labels, train=train,
                                class_labels=class_labels, rngs=rngs)
    return _apply_network(self.network, variables, x_in, labels, train=train,
                          class_labels=class_labels, rngs=rngs)

  def score_fn(self, variables: Variables, *, class_labels: jax.Array | None = None,
               train: bool = False, rng: jax.Array | None = None) -> ScoreFn:
    """`score_fn(x [B, *D], t [B]) -> [B, *D]`, the network's estimate of grad log p_t."""

    def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
      output = self.apply(variables, x, t, class_labels=class_labels, train=train, rng=rng)
      return self.output_to_score(mean_output(output, x), x, t)

    return score_fn

  def variance_fn(self, variables: Variables, *, class_labels: jax.Array | None = None
                  ) -> ScoreFn:
    """`v(x [B, *D], t [B]) -> [B, *D]`: the variance half of a learned-variance network's
    output (DiT's `learn_sigma`; channels C..2C), the interpolation value v in [-1, 1] of
    Nichol & Dhariwal, for `sampling.ddpm_sample(variance='learned', var_interp_fn=...)`.

    Raises:
      ValueError (when called): the network's output has C channels (no learned variance).
    """

    def variance(x: jax.Array, t: jax.Array) -> jax.Array:
      output = self.apply(variables, x, t, class_labels=class_labels)
      channels = x.shape[-1]
      if output.shape[-1] != 2 * channels:
        raise ValueError(f"variance_fn needs a network with learned variance (2C = "
                         f"{2 * channels} output channels, e.g. DiT learn_sigma=True); this "
                         f"one outputs {output.shape[-1]}")
      return output[..., channels:]

    return variance

  def denoiser(self, variables: Variables, *, class_labels: jax.Array | None = None,
               train: bool = False, rng: jax.Array | None = None) -> ScoreFn:
    """`denoise(x [B, *D], t [B]) -> [B, *D]`, the network's estimate of E[x_0 | x_t]."""

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
      output = self.apply(variables, x, t, class_labels=class_labels, train=train, rng=rng)
      return self.output_to_x0(mean_output(output, x), x, t)

    return denoise
