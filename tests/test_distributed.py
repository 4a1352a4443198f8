"""Many hosts, on one machine: two JAX processes (one CPU device each, Gloo collectives) train
a tiny config with `--distributed` and must reach the parameters of one process with two
devices over the same global batch.

The one process with two devices is the shared tiny run of tests/test_train.py (`trained`:
`train.train` in a pytest process, which tests/conftest.py gives two CPU devices, as
`--mode=train` runs it), read at its step-4 checkpoint: the two processes train the same
config for 4 steps (the learning rate, the data and the keys depend on the step, not on
`training.n_iters`), so no third training is needed."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_sde.run import programs
from test_train import REPO, cli_flags, params_of, tiny_config, trained  # noqa: F401 (a fixture)

# The tiny run's config, stopped at step 4 (its checkpoints 2 and 4), without the snapshot
# samples (snapshot_freq=6 is not reached).
OVERRIDES = {"training.n_iters": 4, "training.snapshot_sampling": False}


def _command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "score_sde.main", "--config=configs/fashion_mnist_vp.py:tiny",
          f"--workdir={workdir}", "--mode=train", *cli_flags(**OVERRIDES)]


def _env(devices: int) -> dict:
  # XLA's flags as in this process (tests/conftest.py), but for the device count: they halve
  # compile times. No persistent cache: both processes compile their collectives at once.
  return dict(os.environ, JAX_PLATFORMS="cpu", SCORE_SDE_CACHE_DIR="",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0 "
                        "--xla_cpu_use_fusion_emitters=false")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(trained, tmp_path):
  multi = str(tmp_path / "two_processes")
  assert jax.process_count() == 1 and jax.device_count() == 2
  reference, step_1 = params_of(trained[0], step=4)  # one process, two devices

  port = _free_port()
  env = dict(_env(1), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
  procs = [subprocess.Popen(
      _command(multi) + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    results = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]

  second = programs.restore_run(tiny_config(**OVERRIDES), multi)
  assert step_1 == second.step == 4
  dist = jax.device_get(second.state.params)
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(dist),
                  strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
