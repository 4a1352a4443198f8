"""Training, checkpoints, evaluation and the command line, on a tiny network and synthetic data.

One run (`trained`) is shared: it is the uninterrupted reference of the resume tests and the
checkpoint that eval / sample read. It is trained once per test run, by whichever pytest
process (xdist worker) asks first; the others wait on a file lock and read it. Its directory is
read-only by convention: a test that writes into a run copies it first.
"""

import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fashion_mnist_vp
from score_sde.io import checkpoints, datasets, images
from score_sde import models
from score_sde.run import evaluate, experiment, programs
from score_sde import main as main_lib
from score_sde.io import parallel
from score_sde.run import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny experiment, as config overrides (shared by in-process runs and the CLI). One
# resolution (no down- or upsampling; the middle block's attention stays): what these tests
# check (checkpoints, resume, devices, eval, sample, the command line) does not depend on the
# network's shape, and its train step compiles in about half the time of a two-resolution
# U-Net's. The layers themselves are tested in tests/test_models.py and
# tests/test_reference_checkpoints.py.
TINY = {
    "data.dataset": "synthetic", "data.image_size": 8, "model.ch_mult": (1,),
    "model.attn_resolutions": (), "model.nf": 8, "training.batch_size": 4,
    "eval.batch_size": 4, "sampling.batch_size": 2, "sampling.steps": 3,
    "training.n_iters": 6, "training.snapshot_freq": 6,
    "training.snapshot_freq_for_preemption": 2, "training.eval_freq": 2,
    "training.log_freq": 1, "optim.warmup": 2,
}


def tiny_config(**overrides):
  config = fashion_mnist_vp.get_config("tiny")
  for path, value in {**TINY, **overrides}.items():
    section, field = path.split(".")
    config[section][field] = value
  return config


def cli_flags(**overrides):
  # A tuple as a Python literal: "(1,)", "()" (ml_collections parses it with literal_eval).
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def params_of(workdir, step=None):
  config = tiny_config()
  run = programs.restore_run(config, workdir, step)
  return jax.device_get(run.state.params), run.step


def shared_dir(tmp_path_factory, name: str) -> str:
  """A directory every pytest process of this test run sees: under the xdist workers' common
  base temporary directory (`.../pytest-N/`), or this process's own one without xdist."""
  base = tmp_path_factory.getbasetemp()
  return str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """`(workdir, params)` of the tiny run: the parameters `train.train` returned (saved next to
  the run, so a process that did not train compares the checkpoint with them too)."""
  root = shared_dir(tmp_path_factory, "tiny_run")
  os.makedirs(root, exist_ok=True)
  workdir, saved = os.path.join(root, "run"), os.path.join(root, "params.npz")
  with open(os.path.join(root, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not os.path.exists(saved):
      state = train.train(tiny_config(), workdir, progress=False)
      leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
      np.savez(saved + ".tmp.npz", *leaves)
      os.replace(saved + ".tmp.npz", saved)
  structure = jax.tree_util.tree_structure(params_of(workdir)[0])
  with np.load(saved) as f:
    params = jax.tree_util.tree_unflatten(structure, [f[f"arr_{i}"] for i in range(len(f.files))])
  return workdir, params


# ----------------------------------------------------------------------------------------
# Pieces.


def test_learning_rate_warmup_and_clipping():
  config = tiny_config(**{"optim.lr": 1e-3, "optim.warmup": 4, "optim.grad_clip": 1.0})
  schedule = experiment.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(i) for i in (0, 1, 2, 4, 100)],
                             [0, 2.5e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
  opt = experiment.make_optimizer(config)
  params = {"w": jnp.zeros(3)}
  updates, state = opt.update({"w": jnp.full(3, 100.0)}, opt.init(params), params)
  # clip_by_global_norm(1) then Adam: the first moment holds (1 - b1) * the clipped gradient.
  adam_state = state[1][0]
  assert isinstance(adam_state, optax.ScaleByAdamState)
  np.testing.assert_allclose(adam_state.mu["w"], 0.1 * np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
  np.testing.assert_array_equal(updates["w"], 0.0)  # lr 0 at step 0 (warmup)


def test_sampler_settings_maps_reference_names():
  config = tiny_config(**{"sampling.method": "pc", "sampling.n_steps_each": 3,
                          "sampling.noise_removal": False, "sampling.corrector": "langevin"})
  method, options = experiment.sampler_settings(config)
  assert method == "pc"
  assert options["n_steps"] == 3 and options["denoise"] is False
  assert options["corrector"] == "langevin" and options["steps"] == 3
  assert "rtol" not in options and "order" not in options  # other methods' options
  config.sampling.method = "ode"
  _, options = experiment.sampler_settings(config)
  assert set(options) <= {"solver", "rtol", "atol", "steps", "denoise", "eps"}


@pytest.mark.parametrize("override, message", [
    ({"training.sde": "vp"}, "Unknown config.training.sde 'vp'; valid: ['rectified_flow', "
                             "'subvpsde', 'trigflow', 'vesde', 'vpsde']"),
    ({"model.name": "unet"}, "Unknown model 'unet'"),
    ({"sampling.method": "euler"}, "Unknown config.sampling.method 'euler'"),
    ({"training.weighting": "snr"}, "Unknown config.training.weighting 'snr'"),
    ({"optim.optimizer": "SGD"}, "Unknown config.optim.optimizer 'SGD'"),
    ({"training.batch_size": 3}, "batch_size=3 is not divisible by the number of devices (2)"),
    ({"data.image_size": 9, "model.ch_mult": (1, 2)},
     "image_size=9 is not divisible by 2**(len(ch_mult) - 1) = 2"),
    ({"model.attn_resolutions": (16,)}, "attn_resolutions [16] are not resolutions"),
    ({"training.n_jitted_steps": 4}, "snapshot_freq=6 must be a multiple of"),
])
def test_check_config_names_the_bad_value(override, message):
  assert jax.device_count() == 2
  with pytest.raises(ValueError) as e:
    experiment.check_config(tiny_config(**override))
  assert message in str(e.value)


def test_image_grid_layout():
  x = np.stack([np.full((2, 3, 1), v) for v in (0.0, 0.5, 1.0)])
  grid = images.image_grid(x, nrow=2, padding=1, pad_value=0.25)
  assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[4, 1, 0] == 255
  assert grid[0, 0, 0] == 64 and grid[4, 5, 0] == 64  # border and the empty fourth cell
  with pytest.raises(ValueError, match="images must be"):
    images.image_grid(np.zeros((2, 4, 4, 2)))


class _LinearScore(nn.Module):
  """A tiny network with the score networks' calling convention (fast to compile)."""

  @nn.compact
  def __call__(self, x, labels, train=False, class_labels=None):
    h = nn.Dense(x[0].size)(jnp.concatenate([x.reshape(len(x), -1), labels[:, None] / 999],
                                            axis=-1))
    return h.reshape(x.shape)


@pytest.mark.parametrize("ema_warmup", [False, True])
def test_train_step_ema_follows_its_formula(ema_warmup):
  config = tiny_config(**{"optim.warmup": 0})
  sde, model = experiment.make_sde(config), _LinearScore()
  optimizer = experiment.make_optimizer(config)
  x = jnp.zeros((1, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), x, jnp.ones((1,)))["params"]
  state = programs.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params),
                              ema_params=jax.tree_util.tree_map(jnp.copy, params),
                              constants={})
  mesh = parallel.make_mesh()
  spec = experiment.RunSpec(score_model=models.ScoreModel(model, sde), image_shape=(8, 8, 1),
                            loss_fn=experiment.make_loss_fn(config, sde), optimizer=optimizer,
                            ema_rate=0.9, ema_warmup=ema_warmup)
  step_fn = programs.make_train_step(spec, mesh=mesh)
  data = experiment.make_dataset(config, "train")
  trajectory = [jax.device_get(params)]
  for i in range(3):
    batch = {k: v[None] for k, v in data.batch(i).items()}
    state, _ = step_fn(state, jax.random.PRNGKey(1), parallel.shard_batch(batch, mesh, axis=1))
    trajectory.append(jax.device_get(state.params))
  expected = trajectory[0]
  for n in range(3):
    rate = min(0.9, (1 + n) / (10 + n)) if ema_warmup else 0.9
    expected = jax.tree_util.tree_map(lambda e, p: rate * e + (1 - rate) * p, expected,
                                      trajectory[n + 1])
  for a, b in zip(jax.tree_util.tree_leaves(expected),
                  jax.tree_util.tree_leaves(jax.device_get(state.ema_params))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert not np.allclose(trajectory[3]["Dense_0"]["kernel"], trajectory[0]["Dense_0"]["kernel"])


# ----------------------------------------------------------------------------------------
# Data parallelism.


@pytest.mark.slow
def test_two_devices_match_one_device():
  """The same global batches on a 1-device and a 2-device mesh: same losses and parameters
  after 3 steps. The run's own spec and one step per call (the tiny config's n_jitted_steps),
  so the 2-device step is the program of the tiny run (`trained`, the SIGKILL test's
  children): compiled once per test run, then loaded from the compilation cache."""
  config = tiny_config()
  assert int(config.training.n_jitted_steps) == 1
  spec = experiment.run_spec(config)
  data = experiment.make_dataset(config, "train")
  batches = [{k: data.batch(i)[k][None] for k in ("image", "label")} for i in range(3)]
  initial = jax.device_get(programs.init_state(jax.random.PRNGKey(0), spec))  # on the host
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = parallel.make_mesh(devices)
    state = jax.device_put(initial, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step_fn = programs.make_train_step(spec, mesh=mesh)
    key = jax.device_put(jax.random.PRNGKey(1),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    metrics = []
    for batch in batches:
      state, m = step_fn(state, key, parallel.shard_batch(batch, mesh, axis=1))
      metrics.append(m)
    metrics = {k: np.concatenate([jax.device_get(m[k]) for m in metrics]) for k in metrics[0]}
    results.append((metrics, jax.device_get(state)))
  (m1, s1), (m2, s2) = results
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert int(s2.step) == 3 and not np.allclose(m1["loss"][0], m1["loss"][2])
  # The warm-up (optim.warmup=2) starts at a zero learning rate; the later steps moved them.
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(initial.params),
                                                   jax.tree_util.tree_leaves(s2.params)))


# ----------------------------------------------------------------------------------------
# Runs: outputs, resume after SIGKILL, non-finite loss, eval and sample.


def test_train_writes_checkpoints_samples_and_logs(trained):
  workdir, params = trained
  # Preemption checkpoints every 2 steps keep the latest 2; the snapshot (6) is kept.
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit()) == [4, 6]
  restored, step = params_of(workdir)
  assert step == 6
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  samples = np.load(os.path.join(workdir, "samples", "step_6.npz"))["samples"]
  assert samples.shape == (2, 8, 8, 1) and 0 <= samples.min() and samples.max() <= 1
  assert os.path.exists(os.path.join(workdir, "samples", "step_6.png"))
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in records if "loss" in r)
  assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6]
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(os.path.join(workdir, "tensorboard")))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved == experiment.config_to_plain(tiny_config())


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(trained, tmp_path):
  ref_workdir, ref_params = trained
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "score_sde.main", "--config=configs/fashion_mnist_vp.py:tiny",
         f"--workdir={workdir}", "--mode=train", *cli_flags()]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(os.path.join(ckpt, "2")):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert steps and steps[-1] < 6, steps  # killed partway
  # The resumed run in this process, as `--mode=train` runs it (its programs are the tiny
  # run's, already built here or in the compilation cache: no second start-up to pay).
  assert main_lib.run(tiny_config(), workdir, "train") == {"step": 6}
  params, step = params_of(workdir)
  assert step == 6
  for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(b, a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
  real = datasets.get_dataset

  def poisoned(spec, split="train", **kwargs):
    data = real(spec, split, **kwargs)
    if split == "train":
      clean = data.batch

      def batch(step):
        b = clean(step)
        if step >= 3:  # the 4th optimizer step sees a NaN pixel
          b["image"] = b["image"].copy()
          b["image"][0, 0, 0, 0] = np.nan
        return b
      data.batch = batch
    return data

  monkeypatch.setattr(datasets, "get_dataset", poisoned)
  workdir = str(tmp_path)
  # Exit status 3; the step is numbered as in the log (step k takes the state to k).
  assert main_lib.execute(tiny_config(**{"training.snapshot_sampling": False}), workdir,
                          "train") == 3
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert re.search(r"at step 4;.*Last good checkpoint: step 2", error), error
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit()) == [2]
  params, _ = params_of(workdir)
  assert all(np.all(np.isfinite(p)) for p in jax.tree_util.tree_leaves(params))
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_resume_skips_an_unreadable_checkpoint(trained, tmp_path):
  """Checkpoint 6 overwritten: training resumes from 4, moves 6 aside (kept), and reaches
  the uninterrupted run's parameters bit for bit; the old snapshot samples stay."""
  ref_workdir, ref_params = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_workdir, workdir)
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "6")):
    for name in names:
      path = os.path.join(root, name)
      open(path, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(path)))
  old_samples = open(os.path.join(workdir, "samples", "step_6.npz"), "rb").read()
  state = train.train(tiny_config(), workdir, progress=False)
  assert int(state.step) == 6
  assert os.listdir(os.path.join(workdir, checkpoints.SET_ASIDE_DIR)) == ["6.unreadable"]
  params, step = params_of(workdir)
  assert step == 6
  for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(b, a)
  assert open(os.path.join(workdir, "samples", "step_6.npz"), "rb").read() == old_samples
  assert os.path.exists(os.path.join(workdir, "samples", "step_6.1.npz"))


def test_train_step_flag_resumes_an_older_checkpoint(trained, tmp_path):
  """`--step=4` for training: restores 4 and moves the newer 6 aside (nothing deleted)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], os.path.join(workdir), ignore=shutil.ignore_patterns("samples"))
  config = tiny_config()
  spec = experiment.run_spec(config)
  with checkpoints.get_manager(workdir, keep=2, keep_period=6) as manager:
    state = train._start_state(manager, config, spec, parallel.make_mesh(), workdir, step=4)
    assert int(state.step) == 4 and list(manager.all_steps()) == [4]
  assert os.listdir(os.path.join(workdir, checkpoints.SET_ASIDE_DIR)) == [
      "6.after_resume_from_4"]


def test_eval_and_sample_modes(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  config = tiny_config(**{"eval.enable_bpd": True, "eval.bpd_num_examples": 6,
                          "eval.bpd_rtol": 1e-3, "eval.bpd_atol": 1e-3,
                          "eval.enable_sampling": True, "eval.num_samples": 3})
  metrics = main_lib.run(config, workdir, "eval")
  assert metrics["step"] == 6 and np.isfinite(metrics["test_loss"])
  # Uniform noise images under a barely trained model: finite, positive bits/dim.
  assert metrics["bpd_num_examples"] == 6 and 0 < metrics["bpd"] < 100
  assert metrics["metrics_json"] == os.path.join(workdir, "eval", "step_6", "metrics.json")
  saved = json.load(open(metrics["metrics_json"]))
  assert saved["bpd"] == pytest.approx(metrics["bpd"])
  eval_samples = glob.glob(os.path.join(workdir, "eval", "step_6", "samples_*_n3.npz"))
  assert [np.load(f)["samples"].shape for f in eval_samples] == [(3, 8, 8, 1)]
  # --mode=sample: two methods from the same noise; an old step on request.
  results = {}
  for method in ("ddim", "dpm_solver"):
    config = tiny_config(**{"sampling.method": method, "sampling.steps": 4})
    results[method] = main_lib.run(config, workdir, "sample", step=4, num_samples=2)
    assert results[method]["step"] == 4 and results[method]["nfe"] == 5
  assert os.path.basename(results["dpm_solver"]["npz"]) == (
      "dpm_solver_step_4_order2-steps4_n2.npz")
  x = {m: np.load(r["npz"])["samples"] for m, r in results.items()}
  # DPM-Solver++ order 1 is DDIM; order 2 from the same x_T lands close to it.
  np.testing.assert_allclose(x["dpm_solver"], x["ddim"], atol=0.2)
  # As the command line does it: the run's config.json (the file's defaults differ: nf=16,
  # 28x28 images) with the command-line overrides on top; the same draws, a fresh file name.
  before = open(results["ddim"]["npz"], "rb").read()
  given = fashion_mnist_vp.get_config("tiny")
  given.sampling.method, given.sampling.steps = "ddim", 4
  again = main_lib.run(given, workdir, "sample", step=4, num_samples=2,
                       overrides=["sampling.method", "sampling.steps"])
  assert again["npz"] == results["ddim"]["npz"][:-len(".npz")] + ".1.npz"
  np.testing.assert_array_equal(np.load(again["npz"])["samples"], x["ddim"])
  assert open(results["ddim"]["npz"], "rb").read() == before
  with pytest.raises(FileNotFoundError, match="available steps: \\[4, 6\\]"):
    main_lib.run(tiny_config(), workdir, "sample", step=5)


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*train first"):
    evaluate.evaluate(tiny_config(), str(tmp_path))


def test_checkpoint_roundtrip_ignores_partial_save(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
  with checkpoints.get_manager(tmp_path, keep=1) as manager:
    checkpoints.save(manager, 3, state)
  # A save killed midway leaves only orbax's temporary directory behind.
  os.makedirs(os.path.join(tmp_path, "checkpoints", "5.orbax-checkpoint-tmp-123", "default"))
  with checkpoints.get_manager(tmp_path, read_only=True) as manager:
    restored, step = checkpoints.restore(manager, jax.eval_shape(lambda: state))
  assert step == 3
  np.testing.assert_array_equal(restored["w"], state["w"])


# ----------------------------------------------------------------------------------------
# The command line.


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "score_sde.main", *args], cwd="/",
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config.training.sde=vp"], "Unknown config.training.sde 'vp'"),
    (["--config.data.dataset=cifar10", "--config.data.image_size=32",
      "--config.data.num_channels=3", "--config.model.attn_resolutions=8"],
     "cifar10"),
    (["--config.training.batch_size=5"], "not divisible by the number of devices"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, args, message):
  out = run_cli(f"--config={REPO}/configs/fashion_mnist_vp.py:tiny",
                f"--workdir={tmp_path}", "--mode=train",
                f"--config.data.tfds_data_dir={tmp_path}/tfds", *args)
  assert out.returncode == 2, out.stderr[-2000:]
  error = out.stderr[out.stderr.rindex("error: "):]
  assert message in error and "Traceback" not in out.stderr
