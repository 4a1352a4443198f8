"""Test set-up before JAX starts: two simulated CPU devices (for the data-parallel tests),
and XLA's CPU backend at optimization level 0, which roughly halves compile times of the
network tests (the programs are tiny; compiling, not running, dominates)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
