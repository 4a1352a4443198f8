"""Tests of reading, mapping and writing score_sde_pytorch checkpoints.

The fixtures (`shared/fixtures/score_sde_pytorch/`, beside the repository; override with
`SCORE_SDE_FIXTURES=<dir holding score_sde_pytorch/>`) are checkpoints written by the
reference implementation for four small networks, with the reference network's outputs on
fixed inputs. Each converted network must reproduce them within 1e-4 relative (max |error| /
max |reference|), through `model.apply` and through `ScoreModel.score_fn`.
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import models
from score_sde.io import torch_zip
from score_sde.run import reference as rc
from score_sde.run import experiment, networks, programs
from test_models import REFERENCE_PARAM_COUNTS, TINY_OVERRIDES

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("SCORE_SDE_FIXTURES",
                                       ROOT.parent / "shared" / "fixtures")) / "score_sde_pytorch"
CASES = ("ve_ncsnpp_continuous", "ve_ncsnpp_output_skip", "vp_ddpmpp_continuous", "vp_ddpm")
RTOL = 1e-4

# The fixture's reference config -> this project's config of the same experiment. The FFHQ
# network has no config here: it is cifar10_ve with the FFHQ model fields (allowed below).
BASE_CONFIGS = {"ve/cifar10_ncsnpp_continuous.py": "cifar10_ve",
                "ve/ffhq_ncsnpp_continuous.py": "cifar10_ve",
                "vp/cifar10_ddpmpp_continuous.py": "cifar10_vp",
                "vp/ddpm/cifar10.py": "cifar10_ddpm"}
FFHQ_FIELDS = {"progressive", "progressive_input", "sigma_max", "num_scales", "ema_rate",
               "dropout"}
# Reference model fields with no counterpart here, and the only values supported.
FIXED_FIELDS = {"normalization": "GroupNorm", "nonlinearity": "swish"}
# Reference DDPM configs leave these at the reference defaults; the DDPM U-Net ignores them.
DDPM_UNUSED = {"embedding_type"}


def fixture_path(name: str) -> pathlib.Path:
  path = FIXTURES / name
  if not path.exists():
    pytest.fail(f"Missing fixture {path}: the score_sde_pytorch fixtures belong in "
                f"shared/fixtures/ beside the repository (or set SCORE_SDE_FIXTURES)")
  return path


def load_index() -> dict:
  return json.loads(fixture_path("index.json").read_text())


def load_config(name: str, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def fixture_config(case: str):
  """This project's config for a fixture: its base config plus the index's overrides."""
  info = load_index()[case]
  base = BASE_CONFIGS[info["reference_config"]]
  config = load_config(base)
  for field, value in info["overrides"].items():
    section = config.data if field in config.data else config.model
    section[field] = tuple(value) if isinstance(value, list) else value
  # The rest of the reference's network fields must already agree (our configs mirror the
  # reference's), except the FFHQ-only ones.
  for field, value in info["reference_model_config"].items():
    if field in FIXED_FIELDS:
      assert value == FIXED_FIELDS[field], (case, field, value)
      continue
    if config.model.name == "ddpm" and field in DDPM_UNUSED:
      continue
    value = tuple(value) if isinstance(value, list) else value
    if config.model[field] != value:
      assert base == "cifar10_ve" and field in FFHQ_FIELDS, (case, field, config.model[field],
                                                             value)
      config.model[field] = value
  for field, value in info["reference_data_config"].items():
    assert config.data[field] == value, (case, field)
  t = info["reference_training_config"]
  assert (config.training.sde, config.training.continuous) == (t["sde"], t["continuous"])
  return config


def relative_error(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


# --- the layout against the networks -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(pathlib.Path(p).stem for p in
                                        glob.glob(str(ROOT / "configs" / "cifar10_*.py"))))
def test_layout_matches_full_size_network(name):
  """Key and shape lists of the reference's network for every CIFAR-10 config, against
  `jax.eval_shape` of this project's network: every variable mapped once, same size. The
  class-conditional configs have no reference network: refused, naming the field."""
  config = load_config(name)
  if config.model.num_classes:
    with pytest.raises(ValueError, match="config.model.num_classes"):
      rc.layout(config)
    return
  entries = rc.layout(config)
  rc.check_layout(config, entries)  # raises on any difference
  # The reference's published parameter counts (Fourier features included).
  mapped = sum(int(np.prod(e.shape)) for e in entries if e.collection is not None)
  assert mapped == REFERENCE_PARAM_COUNTS[name]
  assert entries[0].key == "sigmas" and entries[0].shape == (config.model.num_scales,)
  assert len({e.key for e in entries}) == len(entries)


OPTION_CASES = ([("cifar10_ve", o) for o in TINY_OVERRIDES if not o.get("num_classes")]
                + [("cifar10_ddpm", {}), ("cifar10_ddpm", {"resamp_with_conv": False,
                                                           "attn_resolutions": (8,)})])


@pytest.mark.parametrize("name,overrides", OPTION_CASES, ids=lambda o: (
    ",".join(f"{k}={v}" for k, v in o.items()) or "base") if isinstance(o, dict) else o)
def test_layout_matches_every_option_combination(name, overrides):
  """Small networks with each option the reference has (DDPM blocks with FIR, plain
  resampling, both pyramids with 'cat' and 'sum', residual pyramids, positional labels,
  unconditional; the DDPM U-Net), against `jax.eval_shape`."""
  config = load_config(name, "tiny")
  config.model.update(overrides)
  rc.check_layout(config)


def published_config(name: str):
  path, overrides = rc.PUBLISHED[name]
  config = load_config(pathlib.Path(path).stem)
  for field, value in overrides.items():
    section, key = field.split(".")
    config[section][key] = value
  return config


@pytest.mark.parametrize("name", sorted(rc.PUBLISHED))
def test_published_checkpoint_configs_are_valid(name):
  """Every published row's config exists, passes the config checks, and has a layout."""
  assert (ROOT / rc.PUBLISHED[name][0]).is_file()
  config = published_config(name)
  experiment.check_config(config)
  assert rc.layout(config)[0].key == "sigmas"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ve/cifar10_ncsnpp", "ve/ffhq_256_ncsnpp_continuous",
                                  "ve/ffhq_1024_ncsnpp_continuous"])
def test_layout_matches_published_networks_of_other_shapes(name):
  rc.check_layout(published_config(name))


# --- the fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CASES)
def case(request):
  name = request.param
  config = fixture_config(name)
  checkpoint = torch_zip.load(fixture_path(f"{name}.pth"))
  with np.load(fixture_path(f"{name}.outputs.npz")) as f:
    outputs = dict(f)
  return name, config, checkpoint, outputs


def test_fixture_keys_follow_the_reference_order(case):
  name, config, checkpoint, _ = case
  info = load_index()[name]
  keys = ["module." + e.key for e in rc.layout(config)]
  assert list(checkpoint["model"]) == keys
  assert len(keys) == info["model_keys"]
  assert checkpoint["step"] == info["step"]
  for key, entry in zip(keys, rc.layout(config)):
    assert checkpoint["model"][key].shape == entry.shape, key
  n_parameters = sum(int(np.prod(e.shape)) for e in rc.layout(config) if e.key != "sigmas")
  assert n_parameters == info["n_parameters"]


def test_fixture_outputs_through_apply_and_score_fn(case):
  """The converted network reproduces the reference outputs (model and EMA weights), and
  `ScoreModel.score_fn` the score the reference derives from them."""
  name, config, checkpoint, outputs = case
  weights = rc.import_state(config, checkpoint)
  assert weights.step == 7
  model = networks.get_model(config)
  x = jnp.asarray(nhwc(outputs["x_nchw"]))
  labels = np.asarray(outputs["labels"])
  sde = experiment.make_sde(config)
  continuous = bool(config.training.continuous)
  score_model = models.ScoreModel(model, sde, continuous=continuous)
  m = config.model

  # The times whose noise labels are the fixture's labels, and the reference's score from
  # its network output (closed forms in float64, independent of this project's SDE code).
  labels64 = labels.astype(np.float64)
  if config.training.sde == "vesde":  # labels = sigma(t); the output is the score
    t = np.log(labels64 / m.sigma_min) / np.log(m.sigma_max / m.sigma_min)
    to_score = lambda out: out  # noqa: E731
  elif continuous:  # labels = 999 t; score = -output / std(t)
    t = labels64 / 999.0
    log_mean = -0.25 * t**2 * (m.beta_max - m.beta_min) - 0.5 * t * m.beta_min
    std = np.sqrt(1.0 - np.exp(2.0 * log_mean))
    to_score = lambda out: -out / std[:, None, None, None]  # noqa: E731
  else:  # DDPM: labels = step index i = t (N - 1); std from the discrete chain
    n = int(m.num_scales)
    t = labels64 / (n - 1)
    betas = np.linspace(m.beta_min / n, m.beta_max / n, n)
    std = np.sqrt(1.0 - np.cumprod(1.0 - betas))[labels.astype(int)]
    to_score = lambda out: -out / std[:, None, None, None]  # noqa: E731
  np.testing.assert_allclose(np.asarray(score_model.noise_labels(jnp.asarray(t, jnp.float32))),
                             labels, rtol=1e-5)

  # The network and its score as one compiled program for both weight sets (op by op, the
  # full-size fixture networks dispatch thousands of small programs).
  @jax.jit
  def out_and_score(variables, x, labels, t):
    return model.apply(variables, x, labels), score_model.score_fn(variables)(x, t)

  for which, params in (("model", weights.params), ("ema", weights.ema_params)):
    variables = {"params": params, **weights.constants}
    reference = nhwc(outputs[f"out_{which}_nchw"])
    out, score = out_and_score(variables, x, jnp.asarray(labels), jnp.asarray(t, jnp.float32))
    assert relative_error(out, reference) < RTOL, (name, which)
    assert relative_error(score, to_score(reference)) < RTOL, (name, which)
  # The two weight sets differ, so the EMA test is not the model test again.
  assert relative_error(nhwc(outputs["out_model_nchw"]), nhwc(outputs["out_ema_nchw"])) > 1e-3


def test_export_reproduces_the_reference_file_and_round_trips(case, tmp_path):
  """export(import(fixture)) has the fixture's model / EMA tensors bit for bit, and
  import(export(weights)) == weights."""
  name, config, checkpoint, _ = case
  weights = rc.import_state(config, checkpoint)
  exported = rc.export_state(config, weights.params, weights.ema_params, weights.constants,
                             weights.step)
  path = tmp_path / "exported.pth"
  torch_zip.save(exported, path)
  again = torch_zip.load(path)
  assert list(again["model"]) == list(checkpoint["model"])
  for key, value in checkpoint["model"].items():
    np.testing.assert_array_equal(again["model"][key], value, err_msg=key)
    assert again["model"][key].dtype == value.dtype, key
  assert len(again["ema"]["shadow_params"]) == len(checkpoint["ema"]["shadow_params"])
  for a, b in zip(again["ema"]["shadow_params"], checkpoint["ema"]["shadow_params"]):
    np.testing.assert_array_equal(a, b)
  assert again["step"] == checkpoint["step"]
  assert again["ema"]["decay"] == pytest.approx(float(config.model.ema_rate))
  assert (again["optimizer"]["param_groups"][0]["params"]
          == checkpoint["optimizer"]["param_groups"][0]["params"])
  round_trip = rc.import_state(config, again)
  assert round_trip.step == weights.step
  for a, b in ((round_trip.params, weights.params), (round_trip.ema_params, weights.ema_params),
               (round_trip.constants, weights.constants)):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_export_round_trips_a_fresh_network(tmp_path):
  """import(export(x)) == x for randomly initialized weights (params != EMA) of a config
  with every layer kind: FIR resampling, both pyramids, Fourier features, cat combine."""
  config = load_config("cifar10_ve", "tiny")
  config.model.update(progressive="output_skip", progressive_input="input_skip",
                      progressive_combine="cat", ch_mult=(1, 2), attn_resolutions=(16,))
  abstract = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  params = variables.pop("params")
  ema = jax.tree_util.tree_map(lambda p: p + np.float32(0.5), params)
  exported = rc.export_state(config, params, ema, variables, 123)
  torch_zip.save(exported, tmp_path / "x.pth")
  weights = rc.import_state(config, torch_zip.load(tmp_path / "x.pth"))
  assert weights.step == 123
  for a, b in ((weights.params, params), (weights.ema_params, ema),
               (weights.constants, variables)):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, np.asarray(y))


def test_sigmas_the_network_divides_by_must_match(caplog):
  """A discrete NCSN++ (positional labels, scale_by_sigma) divides by the sigmas buffer:
  another sigma_max is an error; with Fourier labels the buffer is unused."""
  config = published_config("ve/cifar10_ncsnpp")
  config.model.update(nf=16, ch_mult=(1, 2), num_res_blocks=1)
  abstract = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.PRNGKey(0))
  variables = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32), abstract)
  params = variables.pop("params")
  exported = rc.export_state(config, params, params, variables, 1)
  config.model.sigma_max = 40.0
  with pytest.raises(rc.CheckpointMismatchError, match="sigma_max=40.0"):
    rc.import_state(config, exported)
  config = fixture_config("ve_ncsnpp_continuous")
  config.model.sigma_max = 60.0
  with caplog.at_level(logging.WARNING):
    weights = rc.import_state(config, torch_zip.load(fixture_path("ve_ncsnpp_continuous.pth")))
  assert weights.step == 7 and "unused by this network" in caplog.text


def test_exported_file_loads_in_torch(tmp_path):
  """torch (when installed) reads an export with weights_only=True, and the Adam state
  loads into an optimizer over the reference network's parameter list."""
  torch = pytest.importorskip("torch")
  config = fixture_config("vp_ddpm")
  checkpoint = torch_zip.load(fixture_path("vp_ddpm.pth"))
  weights = rc.import_state(config, checkpoint)
  torch_zip.save(rc.export_state(config, weights.params, weights.ema_params,
                                 weights.constants, weights.step), tmp_path / "e.pth")
  loaded = torch.load(tmp_path / "e.pth", weights_only=True)
  reference = torch.load(fixture_path("vp_ddpm.pth"), weights_only=True)
  assert list(loaded["model"]) == list(reference["model"])
  for key, value in reference["model"].items():
    assert torch.equal(loaded["model"][key], value), key
  params = [torch.nn.Parameter(v.clone()) for k, v in reference["model"].items()
            if k != "module.sigmas"]
  optimizer = torch.optim.Adam(params, lr=1.0)
  optimizer.load_state_dict(loaded["optimizer"])
  assert optimizer.param_groups[0]["lr"] == pytest.approx(float(config.optim.lr))


# --- workdirs and the script -----------------------------------------------------------------


def test_import_into_workdir_then_load_checkpoint(tmp_path):
  """The imported workdir is a normal checkpoint: programs.restore_run returns the
  fixture's weights (EMA as the EMA params) and step; a second import is refused unless
  overwrite=True."""

  config = fixture_config("ve_ncsnpp_continuous")
  workdir = tmp_path / "run"
  step = rc.import_checkpoint(config, fixture_path("ve_ncsnpp_continuous.pth"), workdir)
  assert step == 7
  loaded = programs.restore_run(config, str(workdir))
  state, loaded_step, model = loaded.state, loaded.step, loaded.score_model.network
  assert loaded_step == 7 and int(state.step) == 7
  weights = rc.import_state(config, torch_zip.load(fixture_path("ve_ncsnpp_continuous.pth")))
  for a, b in ((state.ema_params, weights.ema_params), (state.params, weights.params)):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), y)
  with np.load(fixture_path("ve_ncsnpp_continuous.outputs.npz")) as f:
    x, labels, reference = nhwc(f["x_nchw"]), f["labels"], nhwc(f["out_ema_nchw"])
  out = jax.jit(model.apply)(state.variables(ema=True), jnp.asarray(x), jnp.asarray(labels))
  assert relative_error(out, reference) < RTOL
  assert json.loads((workdir / "imported_from.json").read_text())["step"] == 7

  with pytest.raises(FileExistsError, match="overwrite"):
    rc.import_checkpoint(config, fixture_path("ve_ncsnpp_continuous.pth"), workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["7"]


@pytest.mark.slow
def test_import_script_with_config_overrides(tmp_path):
  """The command line: --config file plus --config.* overrides of the network size; an
  existing workdir is refused, and replaced with --overwrite. (The first import is the
  library's `import_any` with the same config, so that two processes, not three, are
  started; the script's successful path is the --overwrite import.)"""
  overrides = load_index()["vp_ddpmpp_continuous"]["overrides"]
  config = load_config("cifar10_vp")
  config.model.update(nf=overrides["nf"], ch_mult=tuple(overrides["ch_mult"]),
                      num_res_blocks=overrides["num_res_blocks"])
  info = rc.import_any("score_sde", fixture_path("vp_ddpmpp_continuous.pth"), tmp_path / "run",
                       config=config)
  assert info["step"] == 7 and (tmp_path / "run" / "checkpoints" / "7").is_dir()
  cmd = [sys.executable, str(ROOT / "scripts" / "import_checkpoint.py"),
         "--config=" + str(ROOT / "configs" / "cifar10_vp.py"),
         f"--checkpoint={fixture_path('vp_ddpmpp_continuous.pth')}",
         f"--workdir={tmp_path / 'run'}",
         f"--config.model.nf={overrides['nf']}",
         f"--config.model.ch_mult={tuple(overrides['ch_mult'])}",
         f"--config.model.num_res_blocks={overrides['num_res_blocks']}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 2
  assert "already holds checkpoints" in result.stderr and "--overwrite" in result.stderr
  # --overwrite replaces the checkpoint (here: another file of the same network).
  (tmp_path / "run" / "checkpoints" / "7").rename(tmp_path / "run" / "checkpoints" / "3")
  result = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "imported step 7" in result.stdout
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["7"]

  # --mode=sample runs on the imported workdir (the same config and overrides).
  from score_sde import main
  config.sampling.update(steps=3, batch_size=4)
  result = main.run(config, str(tmp_path / "run"), "sample", num_samples=4)
  assert result["step"] == 7 and result["nfe"] == 3
  with np.load(result["npz"]) as f:
    samples = f["samples"]
  assert samples.shape == (4, 32, 32, 3) and np.all(np.isfinite(samples))


# --- bad input -------------------------------------------------------------------------------


def test_mismatched_size_names_key_shapes_and_field():
  config = fixture_config("ve_ncsnpp_continuous")
  config.model.nf = 32
  checkpoint = torch_zip.load(fixture_path("ve_ncsnpp_continuous.pth"))
  with pytest.raises(rc.CheckpointMismatchError) as error:
    rc.import_state(config, checkpoint, where="ve.pth")
  message = str(error.value)
  assert "all_modules.0.W has shape (16,) in the checkpoint" in message
  assert "(32,)" in message
  assert "config.model.nf=16" in message


def test_mismatched_structure_names_the_field():
  config = fixture_config("vp_ddpmpp_continuous")
  config.model.num_res_blocks = 2
  checkpoint = torch_zip.load(fixture_path("vp_ddpmpp_continuous.pth"))
  with pytest.raises(rc.CheckpointMismatchError, match=r"config.model.num_res_blocks=1"):
    rc.import_state(config, checkpoint)
  config = fixture_config("vp_ddpmpp_continuous")
  config.model.attn_resolutions = ()
  with pytest.raises(rc.CheckpointMismatchError, match=r"attn_resolutions=\(16,\)"):
    rc.import_state(config, checkpoint)


def test_full_size_config_on_a_small_checkpoint_names_the_size_fields():
  """The full-size DDPM config against the small DDPM file: several size fields differ."""
  config = load_config("cifar10_ddpm")
  checkpoint = torch_zip.load(fixture_path("vp_ddpm.pth"))
  with pytest.raises(rc.CheckpointMismatchError) as error:
    rc.import_state(config, checkpoint)
  message = str(error.value)
  assert "all_modules.0.weight" in message
  assert "(128, 32)" in message and "(512, 128)" in message
  assert ("config.model.nf=32, config.model.num_res_blocks=1, config.model.ch_mult=(1, 2)"
          in message)


def test_mismatch_without_a_fix_lists_the_likely_fields():
  config = fixture_config("vp_ddpm")
  checkpoint = copy.deepcopy(torch_zip.load(fixture_path("vp_ddpm.pth")))
  key = "module.all_modules.5.NIN_0.W"
  checkpoint["model"][key] = checkpoint["model"][key][:-1]
  with pytest.raises(rc.CheckpointMismatchError) as error:
    rc.import_state(config, checkpoint)
  message = str(error.value)
  assert "all_modules.5.NIN_0.W has shape (31, 64) in the checkpoint" in message
  assert "(32, 64)" in message
  assert "fields that most likely differ (current values): model.nf=32" in message


def test_ema_of_the_wrong_length_is_refused():
  config = fixture_config("vp_ddpmpp_continuous")
  checkpoint = copy.deepcopy(torch_zip.load(fixture_path("vp_ddpmpp_continuous.pth")))
  checkpoint["ema"]["shadow_params"].pop()
  with pytest.raises(rc.CheckpointMismatchError, match="shadow_params"):
    rc.import_state(config, checkpoint)


def test_torch_zip_reads_what_torch_writes(tmp_path):
  """Strided views, storage offsets, shared storages, 0-d tensors and every dtype, as torch
  saves them (torch only writes the file here; reading is torch-free)."""
  torch = pytest.importorskip("torch")
  base = torch.arange(60, dtype=torch.float64).reshape(3, 4, 5)
  tensors = {"view": base.permute(2, 0, 1)[1:, :, ::2], "offset": base[1, 2:],
             "same_storage": base, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3)}
  for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool):
    tensors[str(dtype)] = (torch.arange(12) % 3).to(dtype).reshape(3, 4).t()
  obj = {"tensors": tensors, "meta": [1, 2.5, "x", None, True, (3, 4)]}
  torch.save(obj, tmp_path / "t.pth")
  loaded = torch_zip.load(tmp_path / "t.pth")
  assert loaded["meta"] == [1, 2.5, "x", None, True, (3, 4)]
  for name, tensor in tensors.items():
    expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    got = loaded["tensors"][name]
    assert got.shape == expected.shape, name
    np.testing.assert_array_equal(np.asarray(got, expected.dtype), expected, err_msg=name)
  assert loaded["tensors"]["torch.bfloat16"].dtype == jnp.bfloat16
  # And torch reads what torch_zip writes, dtypes included.
  torch_zip.save(loaded, tmp_path / "back.pth")
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  for name, tensor in tensors.items():
    assert back["tensors"][name].dtype == tensor.dtype, name
    assert torch.equal(back["tensors"][name], tensor.contiguous()), name


def test_not_a_checkpoint(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(torch_zip.CheckpointFormatError, match="not a PyTorch zip checkpoint"):
    torch_zip.load(text)
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("readme.txt", "hello")
  with pytest.raises(torch_zip.CheckpointFormatError, match="data.pkl"):
    torch_zip.load(tmp_path / "other.zip")
  with pytest.raises(FileNotFoundError):
    torch_zip.load(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError):
    rc.import_checkpoint(load_config("cifar10_vp", "tiny"), tmp_path / "missing.pth",
                         tmp_path / "run")


class _RunsCommand:
  """Unpickling this would run a shell command (what a malicious checkpoint does)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickled_code_is_never_executed(tmp_path, protocol):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"model": _RunsCommand(f"touch {marker}")}, protocol=protocol)
  _zip_with_pickle(tmp_path / "evil.pth", payload)
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing .*system"):
    torch_zip.load(tmp_path / "evil.pth")
  assert not marker.exists()
  # The same through the import command's library path.
  with pytest.raises(torch_zip.CheckpointFormatError):
    rc.import_checkpoint(load_config("cifar10_vp", "tiny"), tmp_path / "evil.pth",
                         tmp_path / "run")
  assert not marker.exists() and not (tmp_path / "run").exists()


def test_other_forbidden_globals_and_malformed_tensors(tmp_path):
  import builtins
  _zip_with_pickle(tmp_path / "eval.pth", pickle.dumps(builtins.eval, protocol=2))
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing .*\.eval'"):
    torch_zip.load(tmp_path / "eval.pth")
  # A tensor view reaching past its storage (would read foreign memory).
  good = tmp_path / "good.pth"
  torch_zip.save({"w": np.arange(6, dtype=np.float32)}, good)
  with zipfile.ZipFile(good) as z:
    records = {n: z.read(n) for n in z.namelist()}
  data = records["good/data.pkl"]
  # size (6,) -> (60,): the tuple is written as BININT1 6 inside MARK ... TUPLE.
  bad = data.replace(b"(K\x06t", b"(K\x3ct", 1)
  assert bad != data
  with zipfile.ZipFile(tmp_path / "bad.pth", "w") as z:
    for name, value in records.items():
      z.writestr(name.replace("good/", "bad/"), bad if name.endswith("data.pkl") else value)
  with pytest.raises(torch_zip.CheckpointFormatError, match="reaches element"):
    torch_zip.load(tmp_path / "bad.pth")


def test_unsupported_configs_are_refused():
  config = load_config("cifar10_vp", "tiny")
  config.model.num_classes = 10
  with pytest.raises(ValueError, match="num_classes"):
    rc.layout(config)
  config = load_config("cifar10_ddpm", "tiny")
  config.model.conditional = False
  with pytest.raises(ValueError, match="conditional"):
    rc.layout(config)
