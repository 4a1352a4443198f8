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
      if spec.method in ("ode", "sde"):  # adaptive; the dial's own uniform-t grid
        assert "grid" not in o and "grid" not in sampling.sampler_options(spec.method), name
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


def test_tiny_grid_writes_table_and_plot(tmp_path):
  out = tmp_path / "cmp"
  options = compare.CompareOptions(
      samplers=("ddim", "ddpm", "ode"), nfe=(5, 20), ode_tols=(1e-3,), num_samples=200,
      reference_solver="tsit5", reference_tol=1e-7, repeats=1, projections=64)
  rows, summary = compare.run_comparison(options, progress=False)
  paths = compare.write_results(rows, summary, str(out))
  assert paths == {ext: str(out / f"results.{ext}") for ext in ("csv", "md", "png")}

  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0].keys()) == compare.COLUMNS
  assert [r["sampler"] for r in table] == ["reference", "ddim", "ddim", "ddpm", "ddpm", "ode"]
  md = (out / "results.md").read_text()
  assert "| " + " | ".join(compare.COLUMNS) + " |" in md
  assert md.count("\n| ddim |") == 2
  with open(out / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "ddim (NFE 20)" in compare.timing_line(rows, summary)

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
  assert 0 < summary["sliced_w1_floor"] < 0.3 and 0 <= summary["mode_tv_floor"] < 0.15


def test_dial_runs_once_per_w_on_the_rectified_flow_mixture():
  """`sde` expands into one line per w; w = 0 is the PF-ODE (pathwise error against the
  reference, shrinking with NFE), w > 0 stochastic; every w samples the mixture."""
  options = compare.CompareOptions(
      sde="rectified_flow", samplers=("sde",), w=(0.0, 0.5, 2.0), nfe=(11, 41),
      num_samples=400, reference_solver="tsit5", reference_tol=1e-7, repeats=1,
      projections=64, quality=False)
  jobs = compare.sampler_jobs(options)
  assert [(n, o["w"], o["steps"]) for n, _, o in jobs] == [
      ("sde_w0", 0.0, 10), ("sde_w0", 0.0, 40), ("sde_w0.5", 0.5, 10), ("sde_w0.5", 0.5, 40),
      ("sde_w2", 2.0, 10), ("sde_w2", 2.0, 40)]
  rows, summary = compare.run_comparison(options, progress=False)
  by = {(r["sampler"], r["nfe"]): r for r in rows}
  assert set(by) == {("reference", rows[0]["nfe"])} | {
      (f"sde_w{w}", n) for w in ("0", "0.5", "2") for n in (11, 41)}
  assert 0 < by["sde_w0", 41]["rmse_vs_reference"] < 0.5 * by["sde_w0", 11]["rmse_vs_reference"]
  assert by["sde_w0.5", 41]["rmse_vs_reference"] is None
  assert by["sde_w2", 41]["options"] == "solver=euler, w=2.0, steps=40"
  # The PF-ODE line at 40 steps samples the mixture (measured sliced W1 0.049, floor 0.061);
  # the stochastic lines get closer with NFE (w = 0.5: 1.48 -> 0.42; w = 2: 3.2 -> 0.13):
  # on rectified flow's uniform-t grid, g^2 = 2t / (1 - t) ~ 2000 at t_max makes the first
  # Euler-Maruyama steps overshoot for w > 0 (measured 0.18 / 0.096 at NFE 161).
  assert by["sde_w0", 41]["sliced_w1"] < 2 * summary["sliced_w1_floor"]
  for w in ("0.5", "2"):
    assert by[f"sde_w{w}", 41]["sliced_w1"] < 0.5 * by[f"sde_w{w}", 11]["sliced_w1"]


@pytest.mark.parametrize("w", [(-1.0,), (float("nan"),), (float("inf"),)])
def test_bad_w_list_raises_naming_it(w):
  with pytest.raises(ValueError, match=r"w must be finite numbers >= 0.*got \["):
    compare.CompareOptions(samplers=("sde",), w=w)
  with pytest.raises(ValueError, match="w is empty"):
    compare.CompareOptions(samplers=("sde", "ddim"), w=())


def test_bad_w_flag_is_one_error_line_and_status_2():
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "compare_samplers.py"),
                        "--samplers=sde", "--w=0,-0.5"], capture_output=True, text=True,
                       env=env, cwd=_ROOT, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "error: w must be finite numbers >= 0 (0: probability-flow ODE, 1: reverse SDE), got "
      "[0.0, -0.5]"]
