"""Wall-clock timing of compiled JAX programs, for the benchmarks and the sampler comparison.

Every timed call is waited for with `jax.block_until_ready` on what it returns (JAX arrays,
or anything else, e.g. torch tensors, which it passes through).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def compile_timed(jitted, *args) -> tuple[Any, float]:
  """`(compiled, seconds)`: `jitted` (a `jax.jit` function) lowered and compiled for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def call_times(call: Callable[[], Any], runs: int) -> list[float]:
  """Wall seconds of each of `runs` calls of `call()` (compile and warm up before)."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def median_seconds(call: Callable[[], Any], runs: int) -> float:
  """Median wall seconds of `runs` calls of `call()` after one warm-up call."""
  jax.block_until_ready(call())
  return statistics.median(call_times(call, runs))


def best_seconds(call: Callable[[], Any], runs: int) -> float:
  """Best (smallest) wall seconds of `runs` calls of `call()` (already compiled)."""
  return min(call_times(call, runs))
