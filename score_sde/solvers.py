"""The diffrax ODE solvers, by name, and the exact number of evaluations of a solve.

The probability-flow ODE is integrated with diffrax by `sampling.ode_sample` (x only) and by
`likelihood.log_likelihood` (x and the divergence integral); both pick the solver here by name
and report the number of vector-field evaluations with `function_evaluations` (diffrax reports
steps, not evaluations).

Failed solves. By default diffrax checks its result at run time with a host callback (an
equinox runtime error), and JAX does not store a program with host callbacks in the persistent
compilation cache. With `return_result=True` both functions solve with `throw=False` instead,
so the compiled program has no callback, and return diffrax's result code (a
`diffrax.RESULTS` item); `check_result` turns a failed one into a clear error on the host.
A program that must return plain arrays (one stored by `io.executable_cache`) returns
`result_code(result)` instead, which `check_result` takes as well.

diffrax is imported where a solve is built (`make_solver`, and the functions of `sampling`
and `likelihood` that solve), not with this module: a warm start that loads a compiled
sampler from `io.executable_cache` never builds one, and the import is 0.3 s of its start-up
(2-core CPU). A successful result is recognised by its code, `SUCCESSFUL`, without diffrax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from score_sde.checks import check_choice

if TYPE_CHECKING:
  import diffrax

# Solver name -> its diffrax class (`make_solver` builds one).
SOLVERS: dict[str, str] = {
    "tsit5": "Tsit5",
    "dopri5": "Dopri5",
    "dopri8": "Dopri8",
    "bosh3": "Bosh3",
    "heun": "Heun",
    "euler": "Euler",
}
# `diffrax.RESULTS.successful`'s code (tests/test_compilation_cache.py checks it).
SUCCESSFUL = 0
# The solvers with an embedded error estimate, which an adaptive step-size controller needs.
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8", "bosh3", "heun")


def check_solver(name: str, adaptive: bool = False) -> None:
  """Raises ValueError naming the valid solvers if `name` is not one (of the adaptive ones)."""
  valid = ADAPTIVE_SOLVERS if adaptive else tuple(SOLVERS)
  check_choice("solver", name, valid)


def make_solver(name: str) -> diffrax.AbstractSolver:
  """The diffrax solver `name` of `SOLVERS` (ValueError naming the valid ones otherwise)."""
  import diffrax
  check_solver(name)
  return getattr(diffrax, SOLVERS[name])()


def check_result(result, what: str = "the ODE solve") -> None:
  """Raises RuntimeError with diffrax's message if `result` is not `RESULTS.successful`.

  Args:
    result: the `diffrax.RESULTS` item a `return_result=True` solve returned, or its
      `result_code`, as a concrete (host or fully addressable) value, i.e. after the
      compiled call.
    what: what was solved, for the message (e.g. "the probability-flow ODE sample").

  Raises:
    RuntimeError: naming `what` and diffrax's reason (e.g. the maximum number of solver steps
      was reached: raise `max_steps` or loosen rtol/atol).
  """
  (code,) = jax.tree_util.tree_leaves(result)
  if int(np.asarray(code)) != SUCCESSFUL:
    raise RuntimeError(f"{what} failed: {_message(code)}")


def _message(code) -> str:
  import diffrax
  return diffrax.RESULTS[result_item(code)]


def successful() -> diffrax.RESULTS:
  """`diffrax.RESULTS.successful`: the result of a solve that cannot fail (fixed steps)."""
  import diffrax
  return diffrax.RESULTS.successful


def result_code(result) -> jax.Array:
  """The int32 scalar code of a `diffrax.RESULTS` item: a plain array, for a compiled
  program whose outputs must be plain (tuples, dicts and arrays); `result_item` inverts it."""
  (code,) = jax.tree_util.tree_leaves(result)
  return jnp.asarray(code)


def result_item(code) -> diffrax.RESULTS:
  """The `diffrax.RESULTS` item of a `result_code`."""
  import diffrax
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(diffrax.RESULTS.successful),
                                      [code])


def is_fsal(solver: diffrax.AbstractSolver) -> bool:
  """Whether the solver's last stage is the next step's first ("first same as last")."""
  tableau = getattr(solver, "tableau", None)
  return bool(tableau is not None and tableau.fsal)


def function_evaluations(solver: diffrax.AbstractSolver, num_steps: jax.Array) -> jax.Array:
  """The exact number of vector-field evaluations of a diffrax solve.

  Given an explicit first step `dt0` (so no evaluations are spent choosing one), an explicit
  Runge-Kutta tableau with s stages evaluates the vector field
    * FSAL (Tsit5, Dopri5, Dopri8, Bosh3): once for f(y0), then s - 1 times per step attempt,
      accepted or rejected (a rejected step keeps the stored first stage):
      1 + (s - 1) num_steps;
    * otherwise (Heun; Euler, s = 1): s num_steps.
  `tests/test_likelihood.py` and `tests/test_sampling.py` check this count against host-side
  counters.

  Args:
    solver: a diffrax solver from `SOLVERS`.
    num_steps: `solution.stats["num_steps"]` (accepted + rejected step attempts), int scalar.

  Returns:
    int scalar: the number of vector-field evaluations.
  """
  tableau = getattr(solver, "tableau", None)
  stages = 1 if tableau is None else tableau.num_stages  # Euler has no tableau
  fsal = is_fsal(solver)
  return int(fsal) + (stages - int(fsal)) * num_steps
