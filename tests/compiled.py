"""Compiling a test's computation as one program, once.

Almost all the time of the library's tests is XLA compilation, not running: an eager `jnp`
call on CPU compiles one program per operation and shape, and an eager `lax.scan` (a
sampler's loop) is compiled again at every call (its body is a new closure each time). A
test that jits its whole computation compiles it once, as one program, and a second call with
other arrays of the same shapes (another key, another w) runs without compiling.

    run = compiled(lambda key: sampling.sample(key, score_fn, sde, shape, "pc", ...)[0], KEY)
    x = run(KEY)

`level` sets XLA's CPU optimization level for that one program (tests/conftest.py sets 0 for
the whole run: the programs are small and compile about twice as fast). A program that runs
thousands of stochastic steps (a corrector-only sampler: 500 steps of 5 Langevin steps) runs
about five times faster at level 1 for a compile about 1.5 times as long (tests/
test_sampling.py's corrector-only image case, wall seconds on the shared 2-core machine:
1.4 s compile + 3.8 s run at level 0, 2.2 s + 0.75 s at level 1). A sampler of 40-500
steps on 2,000 points is faster at level 0 (its run is shorter than the extra compile)."""

from __future__ import annotations

from typing import Callable

import jax


def compiled(fn: Callable, *args, level: int | None = None) -> Callable:
  """`jax.jit(fn)` lowered for `args` (arrays and keys; closures carry everything static) and
  compiled, at XLA's CPU optimization level `level` (None: the run's own, see conftest).

  The result takes arrays of the same shapes and dtypes as `args` and runs the one program."""
  lowered = jax.jit(fn).lower(*args)
  if level is None:
    return lowered.compile()
  return lowered.compile(compiler_options={"xla_backend_optimization_level": int(level)})
