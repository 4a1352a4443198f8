"""Wall-clock timing, FLOP rates and peak memory of compiled JAX programs, for the benchmarks
and the sampler comparison.

Every timed call is waited for with `jax.block_until_ready` on what it returns (JAX arrays,
or anything else, e.g. torch tensors, which it passes through).
"""

from __future__ import annotations

import resource
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


def peak_memory() -> dict:
  """`{"peak_memory_bytes", "memory_source"}`: the first device's peak bytes in use where the
  backend reports them ('device'), else the process's max RSS ('process_max_rss')."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "memory_source": "device"}
  # ru_maxrss is in KiB on Linux.
  return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "memory_source": "process_max_rss"}


# Vendor peak dense matrix throughput (FLOP/s) by device kind and compute dtype, for the
# fraction-of-peak column; devices not listed (CPUs among them) get no fraction.
PEAK_FLOPS = {
    "H200": {"float32": 67e12, "bfloat16": 989e12},
    "H100": {"float32": 67e12, "bfloat16": 989e12},
    "A100": {"float32": 19.5e12, "bfloat16": 312e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
}


def utilization(compiled, seconds: float, device_kind: str, devices: int = 1,
                dtype: str = "float32") -> dict:
  """XLA's FLOP count of one call of `compiled` (all `devices` together: XLA counts one
  device's share of a partitioned program), the achieved FLOP/s at `seconds` per call, and
  the fraction of one device's peak where `PEAK_FLOPS` knows it."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  flops = float((analysis or {}).get("flops", 0.0)) * devices
  if flops <= 0:
    return {}
  out = {"gflops_per_call": round(flops / 1e9, 3),
         "achieved_tflops": round(flops / seconds / 1e12, 4)}
  for kind, peaks in PEAK_FLOPS.items():
    if kind.lower() in device_kind.lower() and dtype in peaks:
      out["peak_fraction"] = round(flops / devices / seconds / peaks[dtype], 4)
  return out
