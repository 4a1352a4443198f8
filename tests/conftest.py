"""Test set-up before JAX starts: two simulated CPU devices (for the data-parallel tests),
and XLA's CPU backend at optimization level 0, which roughly halves compile times of the
network tests (the programs are tiny; compiling, not running, dominates), with the older
elemental fusion emitter instead of the MLIR fusion emitters (it builds no MLIR context per
fused kernel: tests/test_sampling.py took 64 s against 95 s with them, measured quiet).

One persistent compilation cache for the whole test run: the pytest processes (both xdist
workers) and the command-line runs they start read and write the same directory, so a
program compiled once (the tiny run's train step, its init, eval and sampler) is loaded from
disk by every later process that builds it again (the same XLA flags are part of the key).
Counting compilations? A cache hit is not a backend compilation: count
`/jax/compilation_cache/cache_hits` events too (as tests/test_bad_input.py does).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The command-line runs the tests start share one compilation cache, not the user's.
os.environ.setdefault("SCORE_SDE_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                          "score_sde_test_jax_cache"))

from score_sde.io import compilation_cache  # noqa: E402  (after the environment above)

compilation_cache.enable()


import pytest  # noqa: E402

# `pytest -n N` (scripts/test.sh): xdist's `load` scheduler hands each worker a first chunk of
# about a quarter of its share of the tests, in collection order, so one worker took most
# end-to-end tests at once and ended long after the other. Here the work is `loadgroup`
# units dealt one at a time, longest first (a greedy longest-processing-time schedule):
# - a test module whose tests share a module- or session-scoped fixture of its own (a trained
#   tiny run, a loaded reference network) is one unit, so one worker builds that fixture once;
# - any other test is a unit of its own.
# A unit's expected seconds: those below for the known long tests (measured on a quiet
# 2-core machine, cold compilation cache; a test id prefix matches its parametrizations),
# else SLOW_SECONDS for a `slow` test and FAST_SECONDS for any other.
EXPECTED_SECONDS = {
}
SLOW_SECONDS, FAST_SECONDS = 10.0, 0.5


def pytest_configure(config):
  if getattr(config.option, "dist", "no") == "load":  # what `-n N` alone means
    config.option.dist = "loadgroup"
    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems


def _expected_seconds(item) -> float:
  for prefix, seconds in EXPECTED_SECONDS.items():
    if item.nodeid.startswith(prefix):
      return seconds
  return SLOW_SECONDS if item.get_closest_marker("slow") else FAST_SECONDS


def _shares_a_fixture(item) -> bool:
  """Whether the test uses a fixture wider than one test that its own module defines."""
  info = getattr(item, "_fixtureinfo", None)
  module = item.nodeid.split("::")[0]
  for definitions in (info.name2fixturedefs.values() if info else ()):
    last = definitions[-1]
    if last.scope != "function" and last.baseid.split("::")[0] == module:
      return True
  return False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
  """The work units above, longest first; without `loadgroup` (no `-n`, or another `--dist`)
  the same order: the long end-to-end tests first."""
  units = {}
  for item in items:
    unit = item.nodeid.split("::")[0] if _shares_a_fixture(item) else item.nodeid
    units.setdefault(unit, []).append(item)
  order = sorted(units.values(), key=lambda unit: -sum(map(_expected_seconds, unit)))
  # A worker has `dist` "no" and `loadgroup` set; a run without xdist has neither.
  grouped = bool(getattr(config.option, "loadgroup", False)) or getattr(
      config.option, "dist", "no") == "loadgroup"
  items[:] = []
  for unit in order:
    if grouped and len(unit) > 1:
      for item in unit:
        item.add_marker(pytest.mark.xdist_group(unit[0].nodeid.split("::")[0]))
    items.extend(unit)
