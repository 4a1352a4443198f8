"""Tests of scripts/compare_samplers.py: its metrics by hand, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import jax
import numpy as np
import pytest

from score_sde import mixtures

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def cs():
  # As `python scripts/compare_samplers.py` would, put scripts/ on the path (for scripts/common.py).
  if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
  spec = importlib.util.spec_from_file_location(
      "compare_samplers", os.path.join(_SCRIPTS, "compare_samplers.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_sliced_w1_of_a_shift_is_its_mean_absolute_projection(cs):
  # Shifting a sample by m shifts every sorted projection by theta . m, so the sliced W1 is
  # E|theta . m| = |m| E|cos(phi)| = |m| 2 / pi for directions uniform on the circle.
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (300, 2)))
  m = np.array([0.3, -0.4])  # |m| = 0.5
  sw = cs.sliced_wasserstein1(jax.random.PRNGKey(1), a, a + m, projections=20000)
  np.testing.assert_allclose(sw, 0.5 * 2 / math.pi, rtol=0.02)
  assert cs.sliced_wasserstein1(jax.random.PRNGKey(1), a, a) == 0.0
  with pytest.raises(ValueError, match="equal-size"):
    cs.sliced_wasserstein1(jax.random.PRNGKey(1), a, a[:10])


def test_mode_weight_tv(cs):
  mixture = mixtures.three_gaussians_mixture()  # weights 0.5, 0.3, 0.2
  means = np.asarray(mixture.means)
  exact = np.repeat(means, [5, 3, 2], axis=0)
  assert cs.mode_weight_tv(mixture, exact) == pytest.approx(0.0, abs=1e-12)
  only_first = np.repeat(means[:1], 10, axis=0)
  assert cs.mode_weight_tv(mixture, only_first) == pytest.approx(0.5)


def test_checkpoint_loading_fails_clearly_without_checkpoints(cs, tmp_path):
  from configs import fashion_mnist_vp
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*checkpoints"):
    cs.load_score_fn_from_checkpoint(fashion_mnist_vp.get_config("tiny"), str(tmp_path))
  with pytest.raises(ValueError, match="workdir"):
    cs.main(["--problem=checkpoint", f"--out={tmp_path}"])


def test_unknown_sampler_name_raises(cs, tmp_path):
  with pytest.raises(ValueError, match="ddim"):
    cs.main(["--samplers=ddim,rk45", "--num_samples=8", f"--out={tmp_path}"])


def test_tiny_grid_writes_table_and_plot(cs, tmp_path):
  out = tmp_path / "cmp"
  rows = cs.main(["--samplers=ddim,ddpm,ode", "--nfe=5,20", "--ode_tols=1e-3",
                  "--num_samples=200", "--reference_solver=tsit5", "--reference_tol=1e-7",
                  "--repeats=1", "--projections=64", f"--out={out}"])

  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0].keys()) == cs.COLUMNS
  assert [r["sampler"] for r in table] == ["reference", "ddim", "ddim", "ddpm", "ddpm", "ode"]
  md = (out / "results.md").read_text()
  assert "| " + " | ".join(cs.COLUMNS) + " |" in md
  assert md.count("\n| ddim |") == 2
  with open(out / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  by = {(r["sampler"], r["nfe"]): r for r in rows}
  ddim5, ddim20 = by[("ddim", 5)], by[("ddim", 20)]
  # Deterministic error shrinks with NFE; stochastic samplers get no pathwise error.
  assert 0 < ddim20["rmse_vs_reference"] < 0.5 * ddim5["rmse_vs_reference"]
  assert by[("ddpm", 20)]["rmse_vs_reference"] is None
  assert next(r for r in table if r["sampler"] == "ddpm")["rmse_vs_reference"] == "n/a"
  ode = next(r for r in rows if r["sampler"] == "ode")
  assert ode["nfe"] > 20 and ode["rmse_vs_reference"] < ddim20["rmse_vs_reference"]
  for r in rows[1:]:
    assert r["ms_per_sample"] > 0 and r["ms_per_nfe"] > 0 and r["ratio_to_bare_score"] > 0
    assert 0 < r["sliced_w1"] < 5 and 0 <= r["mode_tv"] <= 1
  # The exact reference solve samples the mixture: its distance is near the finite-sample
  # floor (200 points, 2-D), far below that of 5-step DDIM.
  assert rows[0]["sliced_w1"] < 0.2 and rows[0]["mode_tv"] < 0.15
  assert rows[0]["sliced_w1"] < ddim5["sliced_w1"]
