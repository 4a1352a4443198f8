"""Many hosts, on one machine: two JAX processes (one CPU device each, Gloo collectives) train
a tiny config with `--distributed` and must reach the parameters of one process with two
devices over the same global batch.

The one process with two devices is this test process (tests/conftest.py gives it two CPU
devices): it trains in-process, through the function `--mode=train` calls, instead of in a
third command-line run, and loads its programs from the compilation cache when the tiny run of
tests/test_train.py compiled them first (same network, optimizer and batch)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import fashion_mnist_vp
from score_sde import main as main_lib
from score_sde.run import programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = {
    "data.dataset": "synthetic", "data.image_size": 8, "model.ch_mult": "1,2",
    "model.attn_resolutions": "4", "model.nf": 8, "training.batch_size": 4,
    "eval.batch_size": 4, "sampling.batch_size": 2, "sampling.steps": 3,
    "training.n_iters": 4, "training.snapshot_freq": 4,
    "training.snapshot_freq_for_preemption": 4, "training.eval_freq": 2,
    "training.log_freq": 2, "optim.warmup": 2, "training.snapshot_sampling": False,
}


def _config():
  config = fashion_mnist_vp.get_config("tiny")
  for path, value in OVERRIDES.items():
    section, field = path.split(".")
    if field in ("ch_mult", "attn_resolutions"):
      value = tuple(int(v) for v in value.split(","))
    config[section][field] = value
  return config


def _command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "score_sde.main", "--config=configs/fashion_mnist_vp.py:tiny",
          f"--workdir={workdir}", "--mode=train",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _env(devices: int) -> dict:
  # XLA's optimization level as in this process (tests/conftest.py): it halves compile times.
  return dict(os.environ, JAX_PLATFORMS="cpu", SCORE_SDE_CACHE_DIR="",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  single, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  assert jax.process_count() == 1 and jax.device_count() == 2
  assert main_lib.execute(_config(), single, "train") == 0

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

  config = _config()
  first, second = programs.restore_run(config, single), programs.restore_run(config, multi)
  reference, step_1 = first.state, first.step
  distributed, step_2 = second.state, second.step
  assert step_1 == step_2 == 4
  ref, dist = jax.device_get((reference.params, distributed.params))
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(dist),
                  strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
