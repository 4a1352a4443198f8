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
# a quarter of its share of the tests, in collection order, so one worker took most
# end-to-end tests at once and ended long after the other, and a module's tests (and its
# module fixtures: trained tiny runs, reference networks) were built on both workers. Here
# the work units are the test modules (`loadfile`), dealt one at a time, longest first (a
# greedy longest-processing-time schedule). (`loadgroup` with finer units does not work with
# pytest 9: xdist 3.8 writes its group suffix into a node attribute pytest no longer reads.)
# A module's expected seconds: the sum over its tests of those below for the known long ones
# (measured on a 2-core machine with a cold compilation cache; a test id prefix matches its
# parametrizations; a module fixture counts with its first user), else SLOW_SECONDS for a
# `slow` test and FAST_SECONDS for any other.
EXPECTED_SECONDS = {
    "tests/test_compilation_cache.py::test_second_process_loads_every_program": 36.0,
    # test_latent.py: trained_ae (built by its first user, the one-step check), the runs on it
    "tests/test_latent.py::test_autoencoder_step_against_a_direct_computation": 23.0,
    "tests/test_latent.py::test_latent_run_end_to_end": 26.0,
    "tests/test_latent.py::test_train_autoencoder_writes_and_resumes_bitwise": 8.0,
    "tests/test_latent.py::test_dit_and_autoencoder_pipeline": 8.0,
    "tests/test_distributed.py::test_two_processes_train_like_one_process": 22.0,
    # test_latent_runs.py: the fixture (with its first user), then the samplers on it
    "tests/test_latent_runs.py::test_latent_run_restores_on_other_devices": 16.0,
    "tests/test_latent_runs.py::test_cfg_on_a_latent_run": 8.0,
    "tests/test_latent_runs.py::test_sampler_panel_of_a_latent_run": 5.0,
    # test_train.py: the tiny run `trained` (with its first user) and the runs on it
    "tests/test_train.py::test_train_writes_checkpoints_samples_and_logs": 12.0,
    "tests/test_train.py::test_resume_after_sigkill_matches_uninterrupted_run": 12.0,
    "tests/test_train.py::test_eval_and_sample_modes": 9.0,
    "tests/test_train.py::test_two_devices_match_one_device": 13.0,
    "tests/test_train.py::test_cli_bad_input_is_a_clear_error": 4.0,
    "tests/test_precision.py::test_bfloat16_trains_like_float32": 17.0,
    "tests/test_reference_checkpoints.py::test_import_script_with_config_overrides": 11.0,
    "tests/test_notebooks.py::test_compare_samplers_notebook_runs": 17.0,
    "tests/test_controllable.py::test_classifier_mode_writes_checkpoint_and_meta": 11.0,
    "tests/test_features.py::test_eval_mode_writes_sample_quality": 9.0,
    "tests/test_pretrained.py::test_registered_models_load_and_denoise": 5.0,
}
SLOW_SECONDS, FAST_SECONDS = 10.0, 0.5


def pytest_configure(config):
  if getattr(config.option, "dist", "no") == "load":  # what `-n N` alone means
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # the order of pytest_collection_modifyitems


def _expected_seconds(item) -> float:
  for prefix, seconds in EXPECTED_SECONDS.items():
    if item.nodeid.startswith(prefix):
      return seconds
  return SLOW_SECONDS if item.get_closest_marker("slow") else FAST_SECONDS


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (by parametrized fixtures)
def pytest_collection_modifyitems(config, items):
  """The modules longest first, each one's tests in their order. Without xdist the same: the
  long end-to-end tests early."""
  modules = {}
  for item in items:
    modules.setdefault(item.nodeid.split("::")[0], []).append(item)
  order = sorted(modules.values(), key=lambda tests: -sum(map(_expected_seconds, tests)))
  items[:] = [item for tests in order for item in tests]
