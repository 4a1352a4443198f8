"""Bad input through the command line's code path (`main.execute`): each row exits with status
2 and one `error:` line naming the field, compiles nothing, and leaves the workdir as it was.

The run these rows point at (`run_dir`) is made without training: an initialized tiny state
saved as checkpoints 2 and 4, and its `config.json`, as training writes them.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.io import checkpoints, datasets, logs
from score_sde.run import experiment, programs, train
from score_sde import main as main_lib
from score_sde.io import workdir as workdir_lib
from test_autoencoder import CASE, fixture_path
from test_train import REPO, tiny_config

# Programs obtained: backend compilations, and loads from the persistent compilation cache
# (tests/conftest.py turns it on; a hit is a program built, without a backend compilation).
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)
jax.monitoring.register_event_listener(
    lambda event, **kwargs: _COMPILES.append(event)
    if event == "/jax/compilation_cache/cache_hits" else None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  spec = experiment.run_spec(config)
  state = jax.jit(lambda k: programs.init_state(k, spec))(
      jax.random.PRNGKey(0))
  with checkpoints.get_manager(workdir, keep=3) as manager:
    for step in (2, 4):
      checkpoints.save(manager, step, state.replace(step=jnp.asarray(step, jnp.int32)))
  workdir_lib.save_config(experiment.config_to_plain(config), workdir)
  return workdir


def snapshot(path):
  """Every file under `path` with its size and content hash (None: no such path)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      files[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
  return files


def execute(capsys, config, workdir, mode, **kwargs):
  """`main.execute` -> (exit status, its last stderr line, backend compilations)."""
  capsys.readouterr()
  before = len(_COMPILES)
  status = main_lib.execute(config, workdir, mode, **kwargs)
  err = capsys.readouterr().err.strip().splitlines()
  return status, (err[-1] if err else ""), len(_COMPILES) - before


# (id, mode, config overrides, run() keyword arguments, workdir kind, expected text).
# Workdir kinds: "new" (does not exist), "run" (run_dir), "file" (a file), "mismatch" (run_dir
# with nf=16, the run's nf is 8).
ROWS = [
    # Rows of issue 16.
    ("predictor", "train", {"sampling.predictor": "heun"}, {}, "new",
     "Unknown config.sampling.predictor 'heun'"),
    ("corrector", "train", {"sampling.corrector": "hmc"}, {}, "new",
     "Unknown config.sampling.corrector 'hmc'"),
    ("solver", "train", {"sampling.method": "ode", "sampling.solver": "rk4"}, {}, "new",
     "Unknown config.sampling.solver 'rk4'"),
    ("order", "train", {"sampling.order": 5}, {}, "new", "Unknown config.sampling.order 5"),
    ("sampling_batch_0", "train", {"sampling.batch_size": 0}, {}, "new",
     "config.sampling.batch_size must be an integer in [1, inf), got 0"),
    ("eval_batch_neg", "eval", {"eval.batch_size": -2}, {}, "run",
     "config.eval.batch_size must be an integer in [1, inf), got -2"),
    ("lr_negative", "train", {"optim.lr": -0.01}, {}, "new",
     "config.optim.lr must be a number in (0, inf), got -0.01"),
    ("lr_nan", "train", {"optim.lr": float("nan")}, {}, "new",
     "config.optim.lr must be a number in (0, inf), got nan"),
    ("num_samples_0", "sample", {}, {"num_samples": 0}, "run", "--num_samples must be"),
    ("num_samples_neg", "sample", {}, {"num_samples": -3}, "run", "--num_samples must be"),
    ("workdir_file_train", "train", {}, {}, "file", "is a file, not a directory"),
    ("workdir_file_sample", "sample", {}, {}, "file", "is a file, not a directory"),
    ("mismatch_train", "train", {"model.nf": 16}, {}, "run",
     "model.nf (run: 8, given: 16)"),
    ("mismatch_sample", "sample", {"model.nf": 16}, {}, "run",
     "model.nf (run: 8, given: 16)"),
    ("mismatch_sample_allowed", "sample", {"model.nf": 16}, {"allow_config_change": True},
     "run", "holds another network than the config describes"),
    ("train_step_missing", "train", {}, {"step": 5}, "run", "available steps: [2, 4]"),
    # More of the same kind.
    ("steps_0", "sample", {"sampling.steps": 0}, {}, "run",
     "config.sampling.steps must be an integer in [1, inf), got 0"),
    ("pc_nothing", "sample", {"sampling.method": "pc", "sampling.predictor": "none"}, {}, "run",
     "config.sampling (method='pc'): predictor and corrector are both 'none'"),
    ("ema_rate", "train", {"model.ema_rate": 1.0}, {}, "new",
     "config.model.ema_rate must be a number in [0, 1), got 1.0"),
    ("num_samples_config", "eval", {"eval.num_samples": 0}, {}, "run",
     "config.eval.num_samples must be"),
    ("sample_no_run", "sample", {}, {}, "new", "No run in --workdir"),
    # Rows that already worked.
    ("sde", "train", {"training.sde": "vp"}, {}, "new", "Unknown config.training.sde 'vp'"),
    ("model", "train", {"model.name": "unet"}, {}, "new", "config.model (name='unet')"),
    ("method", "train", {"sampling.method": "euler"}, {}, "new",
     "Unknown config.sampling.method 'euler'"),
    ("weighting", "train", {"training.weighting": "snr"}, {}, "new",
     "Unknown config.training.weighting 'snr'"),
    ("optimizer", "train", {"optim.optimizer": "SGD"}, {}, "new",
     "Unknown config.optim.optimizer 'SGD'"),
    ("batch_indivisible", "train", {"training.batch_size": 3}, {}, "new",
     "config.training.batch_size=3 is not divisible by the number of devices (2)"),
    ("image_size", "train", {"data.image_size": 9, "model.ch_mult": (1, 2)}, {}, "new",
     "config.data.image_size=9"),
    ("attn", "train", {"model.attn_resolutions": (16,)}, {}, "new",
     "config.model.attn_resolutions [16]"),
    ("jitted_steps", "train", {"training.n_jitted_steps": 4}, {}, "new",
     "config.training.snapshot_freq=6 must be a multiple of"),
    ("missing_data", "train", {"data.dataset": "cifar10", "data.image_size": 32,
                               "data.num_channels": 3},
     {}, "new", "cifar10"),
    ("sample_step_missing", "sample", {}, {"step": 5}, "run", "available steps: [2, 4]"),
    ("mode", "bogus", {}, {}, "new", "Unknown --mode 'bogus'"),
    # Guidance (issue 11).
    ("cfg_unconditional", "sample", {"sampling.guidance": "cfg"}, {}, "run",
     "config.sampling.guidance='cfg' needs a class-conditional model"),
    ("class_label", "sample", {"sampling.guidance": "classifier", "sampling.class_label": 10},
     {}, "run", "config.sampling.class_label [10] out of range: valid 0..9"),
    ("no_classifier", "sample", {"sampling.guidance": "classifier"}, {}, "run",
     "No classifier in"),
    ("label_dropout", "train", {"training.label_dropout": 0.1}, {}, "new",
     "config.training.label_dropout=0.1 needs a class-conditional model"),
    # Mixed precision (issue 13).
    ("train_precision", "train", {"training.precision": "float16"}, {}, "new",
     "Unknown config.training.precision 'float16'; valid: ['bfloat16', 'float32']"),
    ("eval_precision", "eval", {"eval.precision": "bf16"}, {}, "run",
     "Unknown config.eval.precision 'bf16'; valid: ['bfloat16', 'float32']"),
    ("sample_precision", "sample", {"sampling.precision": "fp32"}, {}, "run",
     "Unknown config.sampling.precision 'fp32'; valid: ['bfloat16', 'float32']"),
    # Issue 27: values checked before work.
    ("guidance_nan", "sample", {"sampling.guidance_scale": float("nan")}, {}, "run",
     "config.sampling.guidance_scale must be a number, got nan"),
    ("guidance_inf", "train", {"sampling.guidance_scale": float("-inf")}, {}, "new",
     "config.sampling.guidance_scale must be a number, got -inf"),
    ("ch_mult_0", "train", {"model.ch_mult": (1, 0)}, {}, "new",
     "config.model.ch_mult must be a non-empty tuple of integers >= 1, got (1, 0)"),
    ("num_classes_neg", "train", {"model.num_classes": -1}, {}, "new",
     "config.model.num_classes must be an integer in [0, inf), got -1"),
    ("dropout_1", "train", {"model.dropout": 1.0}, {}, "new",
     "config.model.dropout must be a number in [0, 1), got 1.0"),
    ("seed_65_bits", "train", {"seed": 2 ** 63}, {}, "new",
     "config.seed must be a 64-bit integer, in [-2**63, 2**63) (what jax.random.PRNGKey "
     "takes), got 9223372036854775808"),
    # Issue 27 audit (docs/bad_input.md): fields accepted before whatever the SDE or method.
    ("sigma_min_0", "train", {"model.sigma_min": 0.0}, {}, "new",
     "config.model.sigma_min must be a number in (0, inf), got 0.0"),
    ("sigma_order", "train", {"model.sigma_max": 0.001}, {}, "new",
     "config.model.sigma_min=0.01 must be below config.model.sigma_max=0.001"),
    ("fourier_scale_nan", "train", {"model.fourier_scale": float("nan")}, {}, "new",
     "config.model.fourier_scale must be a number in (0, inf), got nan"),
    ("init_scale_neg", "train", {"model.init_scale": -1.0}, {}, "new",
     "config.model.init_scale must be a number in [0, inf), got -1.0"),
    ("p_std_0", "train", {"training.p_std": 0.0}, {}, "new",
     "config.training.p_std must be a number in (0, inf), got 0.0"),
    ("p_mean_nan", "eval", {"training.p_mean": float("nan")}, {}, "run",
     "config.training.p_mean must be a number, got nan"),
    ("fid_net", "eval", {"eval.enable_fid": True, "eval.fid_feature_net": "vgg"}, {}, "run",
     "Unknown config.eval.fid_feature_net 'vgg'; valid: ['auto', 'fmnist', 'inception']"),
    ("fid_split", "eval", {"eval.enable_fid": True, "eval.fid_split": "val"}, {}, "run",
     "Unknown config.eval.fid_split 'val'; valid: ['test', 'train']"),
    ("kid_subsets", "eval", {"eval.enable_fid": True, "eval.kid_subsets": 0}, {}, "run",
     "config.eval.kid_subsets must be an integer >= 1, got 0"),
    ("pr_k", "eval", {"eval.enable_fid": True, "eval.pr_k": -1}, {}, "run",
     "config.eval.pr_k must be an integer >= 1, got -1"),
    ("inception_missing", "eval", {"eval.enable_fid": True}, {}, "run",
     "Inception-v3 FID weights not found at None"),
    ("fid_stats_missing", "eval", {"eval.enable_fid": True, "eval.fid_feature_net": "fmnist",
                                   "eval.fid_stats": "/nonexistent/stats.npz"}, {}, "run",
     "config.eval.fid_stats=/nonexistent/stats.npz: no such file"),
    ("fid_stats_corrupt", "eval", {"eval.enable_fid": True, "eval.fid_feature_net": "fmnist",
                                   "eval.fid_stats": "CORRUPT"}, {}, "run",
     "is not a statistics file of scripts/reference_stats.py"),
    # Issue 25, bad latent pointers: not an autoencoder ("NOT_AE": an empty directory), no
    # such directory, and the fixture autoencoder (16x16x1 in) given 3-channel images.
    ("latent_not_ae", "train", {"data.latent": "NOT_AE"}, {}, "new",
     "not_ae is not an autoencoder: expected"),
    ("latent_missing", "train", {"data.latent": "/nonexistent/ae"}, {}, "new",
     "config.data.latent=/nonexistent/ae: no such autoencoder directory"),
    ("latent_channels", "train", {"data.latent": "FIXTURE_AE", "data.num_channels": 3}, {},
     "new", "does not fit the autoencoder config.data.latent="),
    # Issue 25: the classifier of classifier guidance is trained on pixels only; refused from
    # the config alone (the autoencoder named is never looked at).
    ("classifier_on_latents", "train_classifier", {"data.latent": "/nonexistent/ae"}, {},
     "new", "--mode=train_classifier needs a pixel-space config: the noise-conditional "
     "classifier is trained on noised images, for classifier guidance of a pixel-space run, "
     "and classifier guidance on latents is not supported; this config's data are latents "
     "(config.data.latent=/nonexistent/ae)"),
]


@pytest.mark.parametrize("name, mode, overrides, kwargs, kind, message", ROWS,
                         ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_and_changes_nothing(
    run_dir, tmp_path, capsys, name, mode, overrides, kwargs, kind, message):
  assert jax.device_count() == 2
  workdir = {"new": str(tmp_path / "new"), "run": run_dir, "file": str(tmp_path / "file")}[kind]
  if kind == "file":
    open(workdir, "w").write("not a directory")
  if overrides.get("eval.fid_stats") == "CORRUPT":
    overrides = {**overrides, "eval.fid_stats": str(tmp_path / "stats.npz")}
    open(overrides["eval.fid_stats"], "wb").write(b"PK\x03\x04 cut short")
  if overrides.get("data.latent") == "NOT_AE":
    os.makedirs(tmp_path / "not_ae")
    overrides = {**overrides, "data.latent": str(tmp_path / "not_ae")}
  if overrides.get("data.latent") == "FIXTURE_AE":
    overrides = {**overrides, "data.latent": str(fixture_path(CASE))}
  seed = overrides.get("seed")
  overrides = {k: v for k, v in overrides.items() if k != "seed"}
  config = tiny_config(**{"data.tfds_data_dir": str(tmp_path / "tfds"), **overrides})
  if seed is not None:
    config.seed = seed
  before = snapshot(workdir)
  status, line, compiles = execute(capsys, config, workdir, mode, **kwargs)
  assert status == 2, line
  assert line.startswith("error: ") and message in line, line
  assert compiles == 0
  assert snapshot(workdir) == before


# Script flags, checked while parsing (`cli.check_flag` with the shared checks): (id, script,
# flags, the expected line). "EXISTING" is replaced by a file that exists.
SCRIPT_ROWS = [
    ("import_format", "import_checkpoint.py", ["--checkpoint=EXISTING", "--workdir=W",
                                               "--format=bogus"],
     "error: flag --format=bogus: Unknown --format 'bogus'; valid: ['diffusers_vae', 'dit', "),
    ("import_missing_checkpoint", "import_checkpoint.py",
     ["--checkpoint=/nonexistent/ckpt.pth", "--workdir=W"],
     "error: flag --checkpoint=/nonexistent/ckpt.pth: no such file or directory"),
    ("import_missing_yaml", "import_checkpoint.py",
     ["--checkpoint=EXISTING", "--workdir=W", "--format=ldm_vae", "--yaml=/nonexistent/v1.yaml"],
     "error: flag --yaml=/nonexistent/v1.yaml: no such file or directory"),
    ("inpaint_scheme", "inpaint.py", ["--config=configs/fashion_mnist_vp.py", "--workdir=W",
                                      "--scheme=bogus"],
     "error: flag --scheme=bogus: Unknown --scheme 'bogus'; valid: "),
    ("inpaint_mask_name", "inpaint.py", ["--config=configs/fashion_mnist_vp.py", "--workdir=W",
                                         "--mask=lefthalf"],
     "error: flag --mask=lefthalf: Unknown --mask 'lefthalf'; valid: ['bottom_half', "),
    ("inpaint_mask_file", "inpaint.py", ["--config=configs/fashion_mnist_vp.py", "--workdir=W",
                                         "--mask=/nonexistent/m.npy"],
     "error: flag --mask=/nonexistent/m.npy: no such file or directory"),
    ("inpaint_num_images", "inpaint.py", ["--config=configs/fashion_mnist_vp.py",
                                          "--workdir=W", "--num_images=0"],
     "error: flag --num_images=0: "),
    ("export_output_dir", "export_checkpoint.py", ["--config=configs/fashion_mnist_vp.py",
                                                   "--workdir=W", "--output=/nonexistent/x.pth"],
     "error: flag --output=/nonexistent/x.pth: its directory /nonexistent does not exist"),
    ("panel_seed", "sampler_panel.py", ["--workdir=W", "--out=x.png", f"--seed={2 ** 64}"],
     f"error: flag --seed={2 ** 64}: --seed must be a 64-bit integer, in [-2**63, 2**63)"),
    ("compare_seed", "compare_samplers.py", ["--problem=mixture", f"--seed={-2 ** 63 - 1}"],
     f"error: flag --seed={-2 ** 63 - 1}: --seed must be a 64-bit integer"),
    ("panel_method", "sampler_panel.py", ["--workdir=W", "--out=x.png", "--methods=pc,odee"],
     "error: flag --methods=['pc', 'odee']: Unknown --methods 'odee'; valid: ['ddim', "),
    ("figures_no_sampler", "lecture_figures.py", ["--workdir=W", "--samplers="],
     "error: flag --samplers=[]: --samplers needs at least one value, of ['ddim', "),
]


@pytest.fixture(scope="module")
def parsed_script_flags(tmp_path_factory):
  """Every SCRIPT_ROWS command line parsed in one child process (tests/data/parse_script_flags.py):
  {id: (exit status, stderr)}."""
  existing = str(tmp_path_factory.mktemp("flags") / "existing.pth")
  open(existing, "wb").write(b"x")
  cases = [[os.path.join("scripts", script), *(a.replace("EXISTING", existing) for a in argv)]
           for _, script, argv, _ in SCRIPT_ROWS]
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "data",
                                                     "parse_script_flags.py"), json.dumps(cases)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
  results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(results) == len(SCRIPT_ROWS), out.stderr[-2000:]
  return {row[0]: (r["status"], r["err"]) for row, r in zip(SCRIPT_ROWS, results)}


@pytest.mark.parametrize("name, script, argv, message", SCRIPT_ROWS,
                         ids=[r[0] for r in SCRIPT_ROWS])
def test_script_flags_are_checked_while_parsing(parsed_script_flags, name, script, argv,
                                                message):
  status, err = parsed_script_flags[name]
  assert status == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), err


# Files read, checked (issue 27): a CIFAR tarball, an inpainting mask, a safetensors file.
# (id, what to write at PATH, the reader, the expected ValueError / FileNotFoundError text).


def _cifar_tarball(path, members):
  import io
  import tarfile
  with tarfile.open(path, "w:gz") as tar:
    for name, raw in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def _tiny_autoencoder():
  from score_sde.models import autoencoder as ae_lib
  ae = ae_lib.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,),
                            latent_channels=2, norm_num_groups=4)
  return ae, {k: np.zeros(v[2], np.float32) for k, v in ae_lib.torch_layout(ae).items()}


def _write_safetensors(path, change):
  import safetensors.numpy
  ae, state = _tiny_autoencoder()
  key = "encoder.conv_in.weight"
  if change == "dtype":
    state[key] = state[key].astype(np.int32)
  elif change == "shape":
    state[key] = np.zeros((3, 1, 3, 3), np.float32)
  safetensors.numpy.save_file(state, path)
  if change == "truncated":
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])
  elif change == "header":
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:8] + b"{not json" + raw[17:])


def _read_safetensors(path):
  from score_sde.io import autoencoder_files
  from score_sde.models import autoencoder as ae_lib
  ae, _ = _tiny_autoencoder()
  ae_lib.params_from_diffusers(autoencoder_files.read_safetensors(path), ae, where=path)


def _read_mask(path):
  from score_sde.run import guided
  guided.load_mask(path, (8, 8, 1))


def _read_cifar(path):
  datasets.load_cifar10_tarball(path, "test")


def _write(path, kind):
  if kind == "cifar_truncated":
    _cifar_tarball(path, {"cifar-10-batches-py/test_batch": b"x" * 5000})
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])
  elif kind == "cifar_members":
    _cifar_tarball(path, {"mnist/train-images-idx3-ubyte": b"x"})
  elif kind == "cifar_not_gzip":
    open(path, "wb").write(b"PK\x03\x04 a zip, not a tarball")
  elif kind == "mask_shape":
    np.save(path, np.ones((5, 5, 1), np.float32))
  elif kind == "mask_not_npy":
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n not an array")
  elif kind == "mask_values":
    np.save(path, np.full((8, 8, 1), 0.5, np.float32))
  elif kind == "mask_strings":
    np.save(path, np.array([["a"]]))
  else:
    _write_safetensors(path, kind.removeprefix("safetensors_"))


FILE_ROWS = [
    ("cifar_truncated", "cifar-10-python.tar.gz", _read_cifar,
     "cifar-10-python.tar.gz: not a readable gzipped tarball, cut short or corrupt"),
    ("cifar_not_gzip", "cifar-10-python.tar.gz", _read_cifar,
     "cifar-10-python.tar.gz: not a readable gzipped tarball"),
    ("cifar_members", "cifar-10-python.tar.gz", _read_cifar,
     "cifar-10-python.tar.gz: no file cifar-10-batches-py/test_batch in the tarball (it holds "
     "['mnist/train-images-idx3-ubyte'])"),
    ("mask_shape", "m.npy", _read_mask, "mask of shape (5, 5, 1) in PATH does not match the "
     "images of shape (8, 8, 1)"),
    ("mask_not_npy", "m.npy", _read_mask, "mask file PATH is not a readable .npy array"),
    ("mask_values", "m.npy", _read_mask, "mask in PATH must hold only 0 (unknown) and 1 (known)"),
    ("mask_strings", "m.npy", _read_mask, "mask in PATH must be a numeric array of 0 and 1, got "
     "dtype <U1"),
    ("safetensors_truncated", "w.safetensors", _read_safetensors,
     "PATH is not a readable safetensors file"),
    ("safetensors_header", "w.safetensors", _read_safetensors,
     "PATH is not a readable safetensors file"),
    ("safetensors_dtype", "w.safetensors", _read_safetensors,
     "PATH: key 'encoder.conv_in.weight' has dtype int32; the weights of a diffusers "
     "AutoencoderKL"),
    ("safetensors_shape", "w.safetensors", _read_safetensors,
     "PATH: key 'encoder.conv_in.weight' has shape (3, 1, 3, 3), a diffusers AutoencoderKL"),
]


@pytest.mark.parametrize("name, filename, read, message", FILE_ROWS,
                         ids=[r[0] for r in FILE_ROWS])
def test_bad_files_are_one_line_naming_the_file(tmp_path, name, filename, read, message):
  path = str(tmp_path / filename)
  _write(path, name)
  before = snapshot(str(tmp_path))
  with pytest.raises((ValueError, FileNotFoundError)) as raised:
    read(path)
  text = main_lib._one_line(raised.value)
  assert message.replace("PATH", path) in text, text
  assert path in text, text
  assert snapshot(str(tmp_path)) == before


def test_unreadable_checkpoints_all_tried(run_dir, tmp_path, capsys):
  workdir = str(tmp_path / "broken")
  shutil.copytree(run_dir, workdir)
  rng = np.random.default_rng(0)
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints")):
    for name in names:
      path = os.path.join(root, name)
      # A leading 0xff keeps every file invalid UTF-8 / JSON: a metadata file that happens to
      # be valid JSON of another type gives the other error (io/checkpoints.py).
      open(path, "wb").write(b"\xff" + rng.bytes(os.path.getsize(path)))
  before = snapshot(workdir)
  for mode in ("sample", "train"):
    status, line, compiles = execute(capsys, tiny_config(), workdir, mode)
    assert status == 2 and "No intact checkpoint" in line, line
    assert "tried step 4: " in line and "step 2: " in line and compiles == 0
    assert snapshot(workdir) == before


def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
  with checkpoints.get_manager(tmp_path, keep=3) as manager:
    for step in (2, 4, 6):
      checkpoints.save(manager, step, jax.tree_util.tree_map(lambda a: a + step, state))
  # 6: truncated files; 4: its array data overwritten.
  for root, _, names in os.walk(os.path.join(tmp_path, "checkpoints", "6")):
    for name in names:
      path = os.path.join(root, name)
      open(path, "r+b").truncate(os.path.getsize(path) // 2)
  for root, _, names in os.walk(os.path.join(tmp_path, "checkpoints", "4", "default")):
    for name in names:
      if os.sep + "d" + os.sep in os.path.join(root, name):
        path = os.path.join(root, name)
        open(path, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(path)))
  with caplog.at_level(logging.WARNING), \
      checkpoints.get_manager(tmp_path, read_only=True) as manager:
    restored, step, skipped = checkpoints.restore_intact(manager, jax.eval_shape(lambda: state))
  assert step == 2 and skipped == [6, 4]
  np.testing.assert_array_equal(restored["w"], state["w"] + 2)
  assert "checkpoints/6 is unreadable" in caplog.text and "skipped: 6, 4" in caplog.text
  with checkpoints.get_manager(tmp_path, read_only=True) as manager:
    with pytest.raises(checkpoints.CheckpointMismatchError, match="another network"):
      checkpoints.restore(manager, {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})


@pytest.mark.parametrize("source, message", [
    ("missing", "no such config file"),
    ("def get_config(:\n", "SyntaxError: invalid syntax"),
    ("def get_config(arg=None):\n  raise ValueError('no variant ' + str(arg))\n",
     "get_config raised ValueError: no variant tiny"),
    ("def get_config(arg=None):\n  return {'training': {}}\n",
     "get_config returned a dict, not an ml_collections.ConfigDict"),
])
def test_config_file_errors_are_one_line(tmp_path, source, message):
  path = tmp_path / "config.py"
  if source != "missing":
    path.write_text(source)
  out = subprocess.run([sys.executable, "-m", "score_sde.main", f"--config={path}:tiny",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
  assert out.stderr.startswith(f"error: --config={path}:tiny: ") and message in out.stderr
  assert not os.path.exists(tmp_path / "run")


def test_eval_config_is_the_runs_with_overrides_on_top(run_dir):
  given = tiny_config(**{"model.nf": 16, "training.n_iters": 99, "sampling.method": "ddim"})
  config = experiment.config_for_run(given, run_dir, overrides=["sampling.method"])
  assert config.model.nf == 8 and config.training.n_iters == 6  # the run's
  assert config.sampling.method == "ddim" and tuple(config.model.ch_mult) == (1,)
  with pytest.raises(ValueError, match=r"model\.nf \(run: 8, given: 16\)"):
    experiment.config_for_run(given, run_dir, overrides=["sampling.method", "model.nf"])
  allowed = experiment.config_for_run(given, run_dir, overrides=["model.nf"], allow_change=True)
  assert allowed.model.nf == 16


def test_config_json_is_never_replaced_silently(tmp_path):
  workdir = str(tmp_path)
  plain = experiment.config_to_plain
  assert workdir_lib.save_config(plain(tiny_config()), workdir) is None
  assert workdir_lib.save_config(plain(tiny_config()), workdir) is None  # same: untouched
  moved = workdir_lib.save_config(plain(tiny_config(**{"training.n_iters": 8})), workdir)
  assert moved == os.path.join(workdir, "config.1.json")
  assert json.load(open(moved))["training"]["n_iters"] == 6
  assert json.load(open(os.path.join(workdir, "config.json")))["training"]["n_iters"] == 8


def test_metrics_jsonl_stays_json_with_non_finite_values(tmp_path):
  writer = train.MetricsWriter(str(tmp_path))
  writer.scalars(3, "train", {"loss": float("nan"), "lr": float("inf"), "grad_norm": 1.5})
  writer.scalars(3, "eval", {"loss": 0.5})
  writer.close()

  def strict(constant):
    raise ValueError(f"not JSON: {constant}")

  lines = [json.loads(line, parse_constant=strict)
           for line in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 3, "loss": None, "lr": None, "grad_norm": 1.5},
                   {"step": 3, "eval_loss": 0.5}]


_WRITER_CHILD = r"""
import importlib.util, struct, sys, glob
from score_sde.io import logs
with logs.summary_writer(sys.argv[1]) as writer:
  writer.add_scalar("train/loss", 0.25, 7)
assert "torch" not in sys.modules, "tensorboardX imported torch"
assert importlib.util.find_spec("torch") is not None  # hidden only while tensorboardX loads
from tensorboardX.proto import event_pb2
(path,) = glob.glob(sys.argv[1] + "/events.out.tfevents.*")
data, values = open(path, "rb").read(), []
while data:  # TFRecord framing: length (8 bytes), its CRC, the record, its CRC
  (n,) = struct.unpack("<Q", data[:8])
  event = event_pb2.Event.FromString(data[12:12 + n])
  values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  data = data[16 + n:]
print(values)
"""


def test_tensorboard_writer_logs_without_importing_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", _WRITER_CHILD, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[(7, 'train/loss', 0.25)]"


def test_metrics_jsonl_lines_are_whole_even_when_killed(tmp_path, monkeypatch, caplog):
  """Each line is one os.write on an O_APPEND descriptor; a process appending lines and
  killed at a random moment leaves whole lines, except perhaps the last (a write cut between
  pages by the kill), which is a prefix of its record; a torn last line is ended by the next
  writer and skipped by `read_metrics` with a warning."""
  writes, real_write = [], os.write
  monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(data) or
                      real_write(fd, data))
  path = str(tmp_path / "metrics.jsonl")
  logs.append_line(path, json.dumps({"step": 1, "loss": 0.5}))
  assert writes == [b'{"step": 1, "loss": 0.5}\n']
  monkeypatch.undo()

  killed = str(tmp_path / "killed.jsonl")
  child = subprocess.Popen([sys.executable, "-c", (
      "import json\n"
      "from score_sde.io import logs\n"
      "print('ready', flush=True)\n"
      "for i in range(10**7):\n"
      f"  logs.append_line({killed!r}, json.dumps({{'step': i, 'pad': 'x' * (i % 5000)}}))\n")],
      stdout=subprocess.PIPE)
  assert child.stdout.readline().strip() == b"ready"
  time.sleep(random.uniform(0.05, 0.3))
  child.kill()
  child.wait()
  lines = open(killed, "rb").read().split(b"\n")
  assert len(lines) > 2
  # Every line before the last is whole and in order; the last is empty (the file ends with
  # a newline) or a torn prefix of the next record.
  assert [json.loads(line)["step"] for line in lines[:-1]] == list(range(len(lines) - 1))
  i = len(lines) - 1
  whole = json.dumps({"step": i, "pad": "x" * (i % 5000)}).encode() + b"\n"
  assert whole.startswith(lines[-1]) and len(lines[-1]) < len(whole) - 1

  with open(path, "ab") as f:
    f.write(b'{"step": 2, "lo')  # torn
  writer = train.MetricsWriter(str(tmp_path))
  writer.scalars(3, "train", {"loss": 0.25})
  writer.close()
  with caplog.at_level(logging.WARNING):
    assert logs.read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 3, "loss": 0.25}]
  assert f"{path}: line 2 is not a complete JSON record" in caplog.text


def test_quiet_logs_drop_tpu_probe_and_orbax_read_only():
  def record(message, pathname, level=logging.WARNING):
    return logging.LogRecord("x", level, pathname, 1, message, None, None)

  quiet = logs.QuietLogs()
  assert not quiet.filter(record("Unable to initialize backend 'tpu': no TPU", "/jax/x.py",
                                 logging.INFO))
  assert not quiet.filter(record("Given directory is read only=/w", "/site/orbax/m.py"))
  assert not quiet.filter(record("saving step 3", "/site/orbax/m.py", logging.INFO))
  assert not quiet.filter(record("Failed to read Metadata file: /w/6/_CHECKPOINT_METADATA",
                                 "/site/orbax/m.py", logging.ERROR))
  assert quiet.filter(record("Checkpoint /w/6 is unreadable", "/score_sde/checkpoints.py"))
  assert quiet.filter(record("something failed", "/site/orbax/m.py", logging.ERROR))


def test_output_names_never_repeat(tmp_path):
  stem = workdir_lib.fresh_stem(str(tmp_path), "pc_step_4_x_n4", (".npz", ".png"))
  assert stem == str(tmp_path / "pc_step_4_x_n4")
  open(stem + ".png", "w").close()
  assert workdir_lib.fresh_stem(str(tmp_path), "pc_step_4_x_n4", (".npz", ".png")) == (
      stem + ".1")
