"""The bias of the inpainting / colorization schemes against an exact conditional
(`scripts/inpainting_bias.py`, docs/guidance.md).

On a Gaussian mixture, p_0(x_unknown | x_known) is again a Gaussian mixture (its weights
reweighted by how well each component explains the known values), so a sampler's mode
weights and mean of the unknown coordinates can be compared with exact values. The two
problems (`PROBLEMS`): `inpaint` (2x2 one-channel images, two modes, the top row known) and
`colorize` (1x2 RGB images, two modes, the gray level known). Both are built so that the
known values are informative (the exact conditional's weights are far from the prior's
0.5 / 0.5). `bias_table` measures every scheme and sampler of `CASES`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import guidance, mixtures, sampling
from score_sde import sde as sde_lib


@dataclasses.dataclass(frozen=True)
class Problem:
  """Data `mix`, known values `known` (one example) and which coordinates are known, in the
  channel basis `basis` (None: pixels)."""

  name: str
  mix: mixtures.GaussianMixture
  known: np.ndarray
  known_mask: np.ndarray
  basis: np.ndarray | None = None

  def decoupled(self, x: np.ndarray) -> np.ndarray:
    """Examples `[n, *D]` -> flat coordinates in the basis: `[n, prod(D)]`."""
    x = np.asarray(x, np.float64)
    if self.basis is not None:
      x = x @ self.basis
    return x.reshape(x.shape[0], -1)

  def exact(self) -> mixtures.GaussianMixture:
    """The exact conditional mixture over the unknown coordinates (in the basis)."""
    means = self.decoupled(np.asarray(self.mix.means).reshape((-1,) + self.mix.event_shape))
    mix = mixtures.GaussianMixture(self.mix.weights, tuple(map(tuple, means)), self.mix.stds,
                                   (means.shape[1],))
    known = self.decoupled(self.known[None])[0]
    return mixtures.conditional_on_known(mix, self.known_mask.reshape(-1), known)

  def run(self, key, score_fn, sde, n, method, scheme, options):
    """Samples n completions; returns (x [n, *D], nfe)."""
    shape = (n,) + self.mix.event_shape
    if self.basis is None:
      known = jnp.broadcast_to(jnp.asarray(self.known, jnp.float32), shape)
      mask = jnp.asarray(self.known_mask, jnp.float32)
      return guidance.inpaint(key, score_fn, sde, known, mask, method=method, scheme=scheme,
                              **options)
    gray = jnp.broadcast_to(jnp.asarray(self.known.mean(-1, keepdims=True), jnp.float32),
                            shape[:-1] + (1,))
    return guidance.colorize(key, score_fn, sde, gray, method=method, scheme=scheme,
                             **options)


def inpaint_problem() -> Problem:
  mix = mixtures.GaussianMixture(weights=(0.5, 0.5),
                                 means=((-0.8, -0.8, 0.6, 0.2), (0.2, 0.0, -0.6, 0.8)),
                                 stds=(0.3, 0.3), event_shape=(2, 2, 1))
  known = np.array([-0.35, -0.4, 0.0, 0.0]).reshape(2, 2, 1)
  return Problem("inpaint", mix, known, np.array([1, 1, 0, 0], bool).reshape(2, 2, 1))


def colorize_problem() -> Problem:
  mix = mixtures.GaussianMixture(
      weights=(0.5, 0.5), means=((0.8, -0.5, -0.3, 0.1, 0.6, -0.2),
                                 (-0.4, 0.3, 0.6, -0.5, 0.2, 0.5)),
      stds=(0.25, 0.25), event_shape=(1, 2, 3))
  known = np.array([0.8, -0.5, -0.3, 0.1, 0.6, -0.2]).reshape(1, 2, 3) + 0.1
  mask = np.tile(np.array([1, 0, 0], bool), 2).reshape(1, 2, 3)
  return Problem("colorize", mix, known, mask, guidance.gray_basis(3))


PROBLEMS = {"inpaint": inpaint_problem, "colorize": colorize_problem}

# (label, method, scheme, options)
CASES = (
    ("pc reimpose, RD", "pc", "reimpose", dict(predictor="reverse_diffusion", steps=200)),
    ("pc reimpose, RD + Langevin", "pc", "reimpose",
     dict(predictor="reverse_diffusion", corrector="langevin", steps=200)),
    ("pc reimpose, RD + 5 Langevin", "pc", "reimpose",
     dict(predictor="reverse_diffusion", corrector="langevin", n_steps=5, steps=200)),
    ("pc score, RD", "pc", "score", dict(predictor="reverse_diffusion", steps=200)),
    ("ddpm score", "ddpm", "score", dict(steps=200)),
    ("ddim score", "ddim", "score", dict(steps=100)),
    ("heun score", "heun", "score", dict(steps=30)),
    ("dpm_solver score", "dpm_solver", "score", dict(steps=30)),
    ("ode score", "ode", "score", {}),
)


def measure(problem: Problem, x) -> dict:
  """Mode-0 weight and mean error (max over coordinates, in component stds) of the unknown
  coordinates of samples x against the exact conditional, with the weight's standard error.

  The mode-0 weight is the mean responsibility of mode 0, E[p(mode 0 | u)], which equals the
  exact weight for exact samples (counting nearest modes would not: the modes overlap)."""
  exact = problem.exact()
  u = problem.decoupled(x)[:, ~problem.known_mask.reshape(-1)]
  n = u.shape[0]
  r0 = np.asarray(exact.responsibilities(jnp.asarray(u, jnp.float32))[:, 0], np.float64)
  w0 = float(np.mean(r0))
  exact_mean = np.sum(np.asarray(exact.weights)[:, None] * np.asarray(exact.means), 0)
  mean_error = float(np.max(np.abs(u.mean(0) - exact_mean)) / np.mean(exact.stds))
  w_exact = exact.weights[0]
  return dict(w0=w0, w0_exact=w_exact, weight_error=w0 - w_exact,
              weight_se=float(np.std(r0) / math.sqrt(n)), mean_error=mean_error)


def exact_control(problem: Problem, sde, n: int, key) -> dict:
  """The same measure on samples of the exact conditional (ddim on its own exact score):
  the size of the error when there is no bias."""
  exact = problem.exact()
  u, _ = sampling.sample(key, exact.score_fn(sde), sde, (n, exact.dim), method="ddim",
                         steps=100)
  full = np.zeros((n, problem.known_mask.size))
  full[:, ~problem.known_mask.reshape(-1)] = np.asarray(u)
  basis = problem.basis
  x = full.reshape((n,) + problem.mix.event_shape)
  if basis is not None:
    x = x @ basis.T
  return measure(problem, x)


def bias_table(sde: sde_lib.SDE, n: int, *, log: Callable[[str], None] = print) -> str:
  """The Markdown table of docs/guidance.md: per problem, the exact-conditional control and
  every case of `CASES` with `n` completions each (mode-0 weight against the exact one, its
  error +- one standard error, the mean error in component stds, NFE); `log` gets each row
  as it is measured, with its wall time."""
  lines = ["| problem | scheme / sampler | NFE | mode-0 weight (exact) | weight error "
           "(+- 1 s.e.) | mean error / std |", "|---|---|---|---|---|---|"]
  for name, make in PROBLEMS.items():
    problem = make()
    control = exact_control(problem, sde, n, jax.random.key(7))
    lines.append(f"| {name} | exact conditional (control) | 101 | {control['w0']:.3f} "
                 f"({control['w0_exact']:.3f}) | {control['weight_error']:+.3f} +- "
                 f"{control['weight_se']:.3f} | {control['mean_error']:.3f} |")
    for label, method, scheme, options in CASES:
      start = time.perf_counter()
      x, nfe = problem.run(jax.random.key(1), problem.mix.score_fn(sde), sde, n,
                           method, scheme, options)
      m = measure(problem, x)
      lines.append(f"| {name} | {label} | {int(nfe)} | {m['w0']:.3f} ({m['w0_exact']:.3f}) | "
                   f"{m['weight_error']:+.3f} +- {m['weight_se']:.3f} | "
                   f"{m['mean_error']:.3f} |")
      log(f"{lines[-1]} ({time.perf_counter() - start:.1f} s)")
  return "\n".join(lines)
