"""A checkpoint written before the three-layer move (commit f6870d4) restores today.

`tests/data/premove_run/` is a workdir trained by f6870d4's own CLI (a 2,801-parameter
DDPM++, 4x4 synthetic data, 4 steps; tests/data/README.md says exactly how), and
`premove_run_values.npz` holds what f6870d4's API read from it: the parameters and EMA
parameters, and the score of the network at fixed (x, t) through its `models.get_score_fn`.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from score_sde.run import programs

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="module")
def recorded():
  with np.load(os.path.join(DATA, "premove_run_values.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("premove") / "run")
  shutil.copytree(os.path.join(DATA, "premove_run"), workdir)  # restoring never writes here
  return programs.load_run(workdir)


def test_load_run_restores_the_premove_checkpoint(run, recorded):
  assert run.step == int(recorded["step"]) == 4
  assert run.spec.image_shape == (4, 4, 1) and run.score_model.resolved_parameterization == "v"
  for name, ema in (("ema", True), ("params", False)):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(run.variables(ema=ema)))[0]
    got = {f"{name}{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}
    want = {k: v for k, v in recorded.items() if k.startswith(name + "[")}
    assert sorted(got) == sorted(want) and len(got) > 10
    for key, value in want.items():  # bit for bit: nothing is recomputed
      assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_the_premove_checkpoint_gives_the_recorded_score(run, recorded):
  x, t = recorded["x"], recorded["t"]
  # One compiled program for both weight sets (op-by-op dispatch is slower).
  scores = jax.jit(lambda x, t: [run.score_fn(ema=ema)(x, t) for ema in (True, False)])(x, t)
  for name, score in zip(("ema", "params"), scores):
    score = np.asarray(score)
    # Recorded op by op by f6870d4's get_score_fn (bitwise today's, op by op); compiled, XLA
    # rounds differently by up to 4.8e-7. Reading the network as 'epsilon' is off by 2.3.
    np.testing.assert_allclose(score, recorded[f"score_{name}"], rtol=1e-5, atol=1e-6)
    assert np.abs(score).max() > 0.1
