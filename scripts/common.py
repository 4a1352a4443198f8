"""What the command-line scripts share: the repository root on `sys.path`, config files by
path, and timing of compiled calls.

A script run as `python scripts/NAME.py` has `scripts/` first on `sys.path`, so it finds this
module with `import common`. Importing it puts the repository root on `sys.path` as well:
config files import `configs.default`, and a checkout that is not pip-installed finds
`score_sde`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402


def load_config(spec: str):
  """`get_config(arg)` of a config file given as `path/to/config.py[:arg]`.

  Raises:
    FileNotFoundError: no such file.
  """
  path, _, arg = spec.partition(":")
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No config file {str(path)!r}")
  module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def compile_timed(jitted, *args) -> tuple[Any, float]:
  """`(compiled, seconds)`: `jitted` (a `jax.jit` function) lowered and compiled for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def call_times(call: Callable[[], Any], runs: int) -> list[float]:
  """Wall seconds of each of `runs` calls of `call()`, each waited for with
  `jax.block_until_ready` on what it returns (compile and warm up before)."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def median_seconds(call: Callable[[], Any], runs: int) -> float:
  """Median wall seconds of `runs` calls of `call()` after one warm-up call (waited for as in
  `call_times`; what `call` returns may be JAX arrays or anything else, e.g. torch tensors)."""
  jax.block_until_ready(call())
  return statistics.median(call_times(call, runs))
