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


def pytest_collection_modifyitems(config, items):
  """The `slow` tests first (each group in collection order). With `pytest -n 2` the workers
  then start on the long end-to-end tests and finish on the many short ones, which even
  them out, instead of one worker starting a minute-long test when the other is nearly done."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
