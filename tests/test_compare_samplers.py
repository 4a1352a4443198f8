"""Tests of the sampler comparison (`score_sde.run.compare`, behind
scripts/compare_samplers.py) and of the metrics it uses (`metrics.sliced_wasserstein1`,
`mixtures.mode_weight_tv`): the metrics against closed forms, a tiny end-to-end run, and the
script's exit status on a bad flag."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import metrics, mixtures, sampling
from score_sde import sde as sde_lib
from score_sde.io import workdir as workdir_lib
from score_sde.run import compare, experiment

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sliced_w1_of_a_shift_is_its_mean_absolute_projection():
  # Shifting a sample by m shifts every sorted projection by theta . m, so the sliced W1 is
  # E|theta . m| = |m| E|cos(phi)| = |m| 2 / pi for directions uniform on the circle.
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (300, 2)))
  m = np.array([0.3, -0.4])  # |m| = 0.5
  sw = metrics.sliced_wasserstein1(jax.random.PRNGKey(1), a, a + m, projections=20000)
  np.testing.assert_allclose(sw, 0.5 * 2 / math.pi, rtol=0.02)
  assert metrics.sliced_wasserstein1(jax.random.PRNGKey(1), a, a) == 0.0
  # The order of the samples does not matter (sorted projections).
  assert metrics.sliced_wasserstein1(jax.random.PRNGKey(1), a, a[::-1]) == pytest.approx(
      0.0, abs=1e-12)
  with pytest.raises(ValueError, match="equal-size"):
    metrics.sliced_wasserstein1(jax.random.PRNGKey(1), a, a[:10])
  with pytest.raises(ValueError, match="projections"):
    metrics.sliced_wasserstein1(jax.random.PRNGKey(1), a, a, projections=0)


def test_sliced_w1_in_1d_is_the_w1_of_shifted_gaussians():
  # In 1-D every direction is +-1: sliced W1 = W1, and W1(N(0, 1), N(mu, 1)) = |mu|. With the
  # same standard-normal draws shifted, the sorted differences are exactly mu.
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (500, 1)), np.float64)
  sw = metrics.sliced_wasserstein1(jax.random.PRNGKey(3), z, z + 0.7, projections=7)
  np.testing.assert_allclose(sw, 0.7, rtol=1e-12)
  # Independent draws: within the finite-sample error of W1 (~ 1 / sqrt(n)).
  y = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (500, 1)), np.float64) - 1.5
  assert abs(metrics.sliced_wasserstein1(jax.random.PRNGKey(3), z, y, 3) - 1.5) < 0.15


def test_mode_weight_tv():
  mixture = mixtures.three_gaussians_mixture()  # weights 0.5, 0.3, 0.2
  means = np.asarray(mixture.means)
  exact = np.repeat(means, [5, 3, 2], axis=0)
  assert mixtures.mode_weight_tv(mixture, exact) == pytest.approx(0.0, abs=1e-12)
  only_first = np.repeat(means[:1], 10, axis=0)
  assert mixtures.mode_weight_tv(mixture, only_first) == pytest.approx(0.5)
  # By hand: frequencies (0.2, 0.4, 0.4) -> 0.5 (|0.2 - 0.5| + |0.4 - 0.3| + |0.4 - 0.2|) = 0.3.
  by_hand = np.repeat(means, [2, 4, 4], axis=0)
  assert mixtures.mode_weight_tv(mixture, by_hand) == pytest.approx(0.3)


def test_checkpoint_problem_fails_clearly_without_a_run(tmp_path):
  with pytest.raises(ValueError, match="workdir"):
    compare.CompareOptions(problem="checkpoint")
  with pytest.raises(FileNotFoundError, match="config.json"):
    compare.build_problem(compare.CompareOptions(problem="checkpoint", workdir=str(tmp_path)))
  # A run directory with its config but no checkpoint yet.
  from configs import fashion_mnist_vp
  config = fashion_mnist_vp.get_config("tiny")
  workdir_lib.save_config(experiment.config_to_plain(config), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*checkpoints"):
    compare.build_problem(compare.CompareOptions(problem="checkpoint", workdir=str(tmp_path)))


@pytest.mark.parametrize("field, value, match", [
    ("samplers", ("ddim", "rk45"), "ddim"), ("mixture", "moons", "three_gaussians"),
    ("sde", "bm", "vpsde"), ("num_samples", 0, "num_samples"), ("nfe", (0, 5), "NFE"),
    ("reference_dtype", "float16", "float64")])
def test_bad_options_raise_naming_the_value(field, value, match):
  with pytest.raises(ValueError, match=match):
    compare.CompareOptions(**{field: value})


def test_bad_grid_raises_naming_the_valid_ones():
  with pytest.raises(ValueError, match="cosine") as info:
    compare.CompareOptions(grid="cosine")
  for name in sampling.GRIDS:
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("flag, message", [
    ("--samplers=ddim,rk45",
     "error: Unknown sampler(s) ['rk45']; valid: " + str(sorted(compare.SAMPLER_GRID))),
    ("--grid=cosine", None)])
def test_bad_flag_is_one_error_line_and_status_2(flag, message):
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "compare_samplers.py"),
                        flag], capture_output=True, text=True, env=env, cwd=_ROOT, timeout=120)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  if message is not None:
    assert lines == [message]
  else:  # absl's enum check names the value and the valid grids
    assert "cosine" in lines[0] and all(name in lines[0] for name in sampling.GRIDS), lines


def test_grid_goes_to_every_fixed_step_sampler():
  everything = tuple(compare.SAMPLER_GRID)
  own = compare.sampler_jobs(compare.CompareOptions(samplers=everything, nfe=(10,)))
  assert all("grid" not in o for _, _, o in own)  # each method's default grid
  for grid in sampling.GRIDS:
    jobs = compare.sampler_jobs(compare.CompareOptions(samplers=everything, nfe=(10,),
                                                       grid=grid))
    assert [(n, {k: v for k, v in o.items() if k != "grid"}) for n, _, o in jobs] == [
        (n, o) for n, _, o in own]
    for name, spec, o in jobs:
      if spec.method == "ode":  # adaptive: no grid
        assert "grid" not in o, name
      else:
        assert o["grid"] == grid and "grid" in sampling.sampler_options(spec.method), name
        sampling.check_options(sde_lib.VPSDE(), spec.method, o)  # a valid combination


def test_one_grid_for_all_samplers_on_the_mixture():
  # DDIM, UniPC and DEIS at NFE 10 on the exact mixture score, all on the log-SNR grid: each
  # row is what `sampling.sample` gives on that grid (DDIM checked against a direct call,
  # which differs from DDIM on its own uniform grid), and the multistep methods beat DDIM.
  samplers = ("ddim", "unipc", "deis")
  n, projections = 100, 32
  rows, summary = compare.run_comparison(compare.CompareOptions(
      samplers=samplers, nfe=(10,), grid="log_snr", num_samples=n, reference_solver="tsit5",
      reference_tol=1e-7, repeats=1, projections=projections), progress=False)
  assert summary["grid"] == "log_snr"
  assert "time grid: log_snr" in compare.markdown_table(rows, summary)
  by = {r["sampler"]: r for r in rows}
  assert set(by) == {"reference", *samplers}
  for name in samplers:
    assert "grid=log_snr" in by[name]["options"] and by[name]["nfe"] == 10, by[name]
    assert 0 < by[name]["rmse_vs_reference"] < 0.5, by[name]
  for name in ("unipc", "deis"):
    assert by[name]["rmse_vs_reference"] < by["ddim"]["rmse_vs_reference"], name

  # The same DDIM run by hand, with x_T, the truth draws and the projections as
  # run_comparison draws them: the same sliced W1 on the log-SNR grid, not on DDIM's own.
  mixture, sde = mixtures.three_gaussians_mixture(), sde_lib.VPSDE()
  k_prior, k_sample, k_truth, _, k_proj = jax.random.split(jax.random.PRNGKey(0), 5)
  x_T = sde.prior_sampling(k_prior, (n, 2)).astype(jnp.float32)
  truth = np.asarray(mixture.sample(k_truth, n)[0], np.float64)
  x = {grid: np.asarray(sampling.sample(k_sample, mixture.score_fn(sde), sde, (n, 2), "ddim",
                                        x_T=x_T, steps=9, eta=0.0, grid=grid)[0], np.float64)
       for grid in ("log_snr", "time_uniform")}
  np.testing.assert_allclose(
      by["ddim"]["sliced_w1"], metrics.sliced_wasserstein1(k_proj, x["log_snr"], truth,
                                                           projections), rtol=1e-4)
  assert compare.rmse(x["log_snr"], x["time_uniform"]) > 1e-2
