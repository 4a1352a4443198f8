"""Latent diffusion: the autoencoder from a directory (imported or trained here), phase-1
training, phase 2 on latents, and the published DiT + autoencoder pipeline.

The reference model is the fixture `shared/fixtures/autoencoder_kl/vae_tiny_1ch` (a diffusers
folder with random weights and its float64 outputs; see its README).
"""

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy
from jax.sharding import NamedSharding, PartitionSpec as P

import score_sde.run
from configs import default as default_config
from score_sde import main
from score_sde.io import autoencoder_files, checkpoints, datasets, parallel, torch_zip
from score_sde.io import workdir as workdir_lib
from score_sde.run import autoencoder_training, experiment, networks, programs, reference

from test_autoencoder import (ATOL, CASE, ROOT, _diffusers_to_ldm, _import_diffusers,
                              _RunsCommand, fixture_path, nhwc)


@pytest.fixture(scope="module")
def fixture_outputs():
  return dict(np.load(fixture_path(f"{CASE}.outputs.npz")))


@pytest.fixture(scope="module")
def imported_ae(tmp_path_factory):
  """A workdir with the fixture imported by `--format=diffusers_vae`."""
  workdir = tmp_path_factory.mktemp("imported_ae")
  info = reference.import_any("diffusers_vae", fixture_path(CASE), workdir)
  assert info["autoencoder"] == os.path.join(str(workdir), "autoencoder")
  return workdir


def _max_errors(ae, outputs) -> dict:
  mean, logvar = ae.encode(outputs["x_nhwc"])
  decoded = ae.decode(outputs["mean_nhwc"])
  return {name: float(np.max(np.abs(np.asarray(value, np.float64)
                                    - nhwc(outputs[f"{name}_f64"]))))
          for name, value in (("mean", mean), ("logvar", logvar), ("dec_mean", decoded))}


def test_load_autoencoder_matches_the_reference(imported_ae, fixture_outputs):
  """The imported workdir, its `autoencoder/` directory and the diffusers folder itself all
  give the reference's posterior and decodings within 5e-5 (float32 against float64)."""
  ae = score_sde.run.load_autoencoder(imported_ae)
  assert ae.scaling_factor == pytest.approx(0.18215) and ae.shift_factor == 0.0
  assert ae.latent_shape((16, 16, 1)) == (8, 8, 4) and ae.step == 0
  errors = _max_errors(ae, fixture_outputs)
  assert max(errors.values()) < ATOL, errors
  for path in (imported_ae / "autoencoder", fixture_path(CASE)):  # the same weights
    other = score_sde.run.load_autoencoder(path)
    assert other.module == ae.module
    jax.tree_util.tree_map(np.testing.assert_array_equal, other.params, ae.params)
  record = json.loads((imported_ae / "autoencoder" / "autoencoder.json").read_text())
  assert record["config"]["block_out_channels"] == [32, 64]
  assert record["source"] == os.path.abspath(fixture_path(CASE))


def test_import_ldm_checkpoint_full_model(tmp_path):
  """A full SD-style `.ckpt` (Lightning `state_dict`, the autoencoder under
  `first_stage_model.`, other keys beside it): the architecture is inferred, and the import
  matches the reference."""
  config, state = autoencoder_files.read_diffusers_folder(fixture_path(CASE))
  ldm = _diffusers_to_ldm(state, len(config["block_out_channels"]))
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  full["model.diffusion_model.out.0.weight"] = np.zeros(3, np.float32)
  torch_zip.save({"state_dict": full, "global_step": 7}, tmp_path / "sd.ckpt")
  info = reference.import_any("ldm_vae", tmp_path / "sd.ckpt", tmp_path / "w")
  assert info["config"]["latent_channels"] == 4
  # LDM checkpoints do not record the GroupNorm groups (LDM uses 32): the fixture's 16 groups
  # give another network, so the outputs are compared through the library call with 16.
  ae = score_sde.run.load_autoencoder(tmp_path / "w")
  assert ae.module.norm_num_groups == 32
  score_sde.run.autoencoder.import_ldm_vae(tmp_path / "sd.ckpt", tmp_path / "w16",
                                           norm_num_groups=16)
  ae16 = score_sde.run.load_autoencoder(tmp_path / "w16")
  diffusers = score_sde.run.load_autoencoder(fixture_path(CASE))
  assert ae16.module == diffusers.module  # the parity of these weights: the test above
  jax.tree_util.tree_map(np.testing.assert_array_equal, ae16.params, diffusers.params)
  with pytest.raises(FileExistsError, match=r"already holds checkpoints"):
    reference.import_any("ldm_vae", tmp_path / "sd.ckpt", tmp_path / "w")


def test_import_refuses_wrong_files(tmp_path, imported_ae):
  """Another size, another format, a pickle that runs code, a directory that holds no
  autoencoder: one error naming the file (and the first mismatching key with both shapes)."""
  config, state = autoencoder_files.read_diffusers_folder(fixture_path(CASE))
  folder = tmp_path / "bad_vae"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
  safetensors.numpy.save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match=re.escape(str(folder)) + r".*key 'decoder\.conv_in\."
                     r"weight' has shape \(64, 4, 3, 3\).* needs \(64, 8, 3, 3\)"):
    reference.import_any("diffusers_vae", folder, tmp_path / "w1")
  with pytest.raises(ValueError, match=r"takes a diffusers folder .* is a file"):
    reference.import_any("diffusers_vae", folder / "config.json", tmp_path / "w1")
  with pytest.raises(ValueError, match=r"ldm_vae takes a checkpoint file"):
    reference.import_any("ldm_vae", folder, tmp_path / "w1")
  # diffusers weights given as an LDM checkpoint
  safetensors.numpy.save_file(state, str(tmp_path / "diffusers_layout.safetensors"))
  with pytest.raises(ValueError, match=r"diffusers_layout\.safetensors: no key "
                     r"'encoder\.conv_in\.weight'|diffusers_layout\.safetensors"):
    reference.import_any("ldm_vae", tmp_path / "diffusers_layout.safetensors", tmp_path / "w1")
  marker = tmp_path / "pwned"
  with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(
        {"state_dict": _RunsCommand(f"touch {marker}")}, protocol=2))
    z.writestr("archive/byteorder", "little")
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing .*system"):
    reference.import_any("ldm_vae", tmp_path / "evil.ckpt", tmp_path / "w1")
  assert not marker.exists()
  assert not (tmp_path / "w1").exists()  # nothing written for any refused import
  with pytest.raises(ValueError, match=r"Unknown --format 'vae'; valid"):
    reference.import_any("vae", folder, tmp_path / "w1")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty is not an autoencoder: expected"):
    score_sde.run.load_autoencoder(tmp_path / "empty")
  (tmp_path / "score_run").mkdir()
  (tmp_path / "score_run" / "config.json").write_text(json.dumps({"model": {"nf": 8}}))
  with pytest.raises(ValueError, match=r"score_run is not an autoencoder"):
    score_sde.run.load_autoencoder(tmp_path / "score_run")
  with pytest.raises(FileNotFoundError, match=r"No autoencoder directory .*nowhere"):
    score_sde.run.load_autoencoder(tmp_path / "nowhere")
  ae = score_sde.run.load_autoencoder(imported_ae)
  with pytest.raises(ValueError, match=r"image shape \(12, 12, 3\) does not fit .* takes "
                     r"images \(H, W, 1\) with H and W divisible by 2"):
    ae.latent_shape((12, 12, 3))


def test_import_script_errors_are_one_line(tmp_path):
  """The command line: a mismatching folder is one `error:` line naming the key, exit 2."""
  config, state = autoencoder_files.read_diffusers_folder(fixture_path(CASE))
  state = dict(state)
  state["quant_conv.weight"] = state["quant_conv.weight"][:4]
  safetensors.numpy.save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  result = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "import_checkpoint.py"), "--format=diffusers_vae",
       f"--checkpoint={tmp_path}", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "'quant_conv.weight' has shape (4, 8, 1, 1)" in lines[0], (
      result.stderr)


# --- phase 1: training the autoencoder --------------------------------------------------------



def tiny_config(**autoencoder):
  """The tiny variant on 16x16x1 synthetic data; the autoencoder (8, 16) channels maps them
  to 8x8x4 latents."""
  config = default_config.get_config("tiny")
  config.data.update(dataset="synthetic", image_size=16, num_channels=1, centered=True,
                     random_flip=False)
  config.autoencoder.update(**autoencoder)
  return config


def _leaves(tree):
  return jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, tree))


# The phase-1 settings of `trained_ae` and of the one-step check (a discriminator from step 2,
# an EMA rate whose update shows in float32).
AE_SETTINGS = dict(disc_weight=0.5, disc_start=2, ema_rate=0.9)


def test_autoencoder_step_against_a_direct_computation(trained_ae):
  """One phase-1 step with the discriminator on: the logged terms equal a direct computation
  (per-example L1 sum and closed-form KL of the same posterior draw, the hinge terms, LDM's
  adaptive weight from the two last-layer gradients), and the EMA is rate * old + (1 - rate)
  * new."""
  # The step is taken from the state of `trained_ae` at disc_start (its step-2 checkpoint),
  # restored and placed as the run places its arguments (state and key replicated over the
  # default mesh, a batch of config.autoencoder.batch_size sharded over it): the call reuses
  # the program that run traced and compiled (`make_train_step` gives equal specs on equal
  # meshes one function), and no initialization is compiled again.
  workdir, config = trained_ae
  spec = autoencoder_training.ae_spec(config)
  mesh = parallel.make_mesh()
  replicated = NamedSharding(mesh, P())
  start = AE_SETTINGS["disc_start"]
  with checkpoints.get_manager(workdir / "autoencoder", read_only=True) as manager:
    state, step = checkpoints.restore(manager, autoencoder_training.abstract_state(spec, mesh),
                                      step=start)
  assert step == start and int(state.step) == start
  x01 = np.asarray(jax.random.uniform(jax.random.PRNGKey(1),
                                      (int(config.autoencoder.batch_size), 16, 16, 1)))
  base_key = jax.random.PRNGKey(2)
  before = jax.tree_util.tree_map(np.array, state)
  new, metrics = autoencoder_training.make_train_step(spec, mesh=mesh)(
      state, jax.device_put(base_key, replicated), parallel.shard_batch(x01, mesh))
  m = {k: float(v) for k, v in metrics.items()}

  module, disc = spec.module, spec.discriminator
  x = x01 * 2 - 1
  k_post = jax.random.split(jax.random.fold_in(base_key, start))[0]
  # The direct computation, compiled as two programs (the posterior; then the decoding, the
  # discriminator's logits and the two last-layer gradients) instead of op by op.
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
  mean, logvar = encode(before.params, x)
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  noise = np.asarray(jax.random.normal(k_post, mean.shape))
  z = mean + np.exp(0.5 * logvar) * noise

  @jax.jit
  def rest(params, disc_params, x, z):
    x_hat = module.apply({"params": params}, z, method=module.decode)
    logits = [disc.apply({"params": disc_params}, v) for v in (x, x_hat)]

    def last_grad(term):
      grads = jax.grad(lambda p: autoencoder_training.losses(
          spec, p, disc_params, k_post, x, jax.numpy.int32(0))[term])(params)
      return grads["decoder"]["conv_out"]["kernel"]
    return x_hat, logits, last_grad("rec"), last_grad("g")

  x_hat, (real, fake), grad_rec, grad_g = jax.tree_util.tree_map(
      lambda a: np.asarray(a, np.float64),
      rest(before.params, before.disc_params, x, z.astype(np.float32)))
  rec = np.mean(np.sum(np.abs(x - x_hat), axis=(1, 2, 3)))
  kl = np.mean(0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
  np.testing.assert_allclose(m["rec"], rec, rtol=1e-5)
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-4)
  np.testing.assert_allclose(m["g"], -fake.mean(), rtol=1e-4, atol=1e-6)
  hinge = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
  np.testing.assert_allclose(m["disc_loss"], hinge, rtol=1e-4)
  ratio = np.linalg.norm(grad_rec) / (np.linalg.norm(grad_g) + 1e-4)
  np.testing.assert_allclose(m["d_weight"], 0.5 * min(ratio, 1e4), rtol=1e-4)
  np.testing.assert_allclose(m["loss"], rec + 1e-6 * kl + m["d_weight"] * m["g"], rtol=1e-5)
  assert int(new.step) == start + 1
  for e0, p1, e1 in zip(_leaves(before.ema_params), _leaves(new.params),
                        _leaves(new.ema_params)):
    rate = AE_SETTINGS["ema_rate"]
    np.testing.assert_allclose(e1, rate * e0 + (1 - rate) * p1, rtol=1e-5, atol=1e-7)
  assert any(np.any(a != b) for a, b in zip(_leaves(before.disc_params),
                                            _leaves(new.disc_params)))


@pytest.fixture(scope="session")
def trained_ae(tmp_path_factory):
  """A tiny phase-1 run (4 steps, discriminator from step 2), through the CLI's `run`."""
  workdir = tmp_path_factory.mktemp("trained_ae")
  config = tiny_config(**AE_SETTINGS)
  assert main.run(config, str(workdir), "train_autoencoder") == {"step": 4}
  return workdir, config


def test_train_autoencoder_writes_and_resumes_bitwise(trained_ae, tmp_path):
  """2 steps, then a resumed run to 4 (crossing disc_start): the same state, bit for bit, as
  4 steps at once; the PSNR is logged; the workdir loads as an autoencoder."""
  workdir, config = trained_ae
  directory = workdir / "autoencoder"
  assert sorted(checkpoints.checkpoint_dir(directory) and
                os.listdir(checkpoints.checkpoint_dir(directory))) == ["2", "4"]
  lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
  psnr = [line["eval_psnr"] for line in lines if "eval_psnr" in line]
  assert len(psnr) == 2 and all(np.isfinite(psnr))
  assert [line["step"] for line in lines if "d_weight" in line] == [1, 2, 3, 4]
  assert (directory / "reconstructions_4.png").is_file()

  config.autoencoder.n_iters = 2
  resumed = tmp_path / "resumed"
  main.run(config, str(resumed), "train_autoencoder")
  config.autoencoder.n_iters = 4
  main.run(config, str(resumed), "train_autoencoder")
  with checkpoints.get_manager(directory, read_only=True) as m1, checkpoints.get_manager(
      resumed / "autoencoder", read_only=True) as m2:
    straight, _ = checkpoints.restore_as_saved(m1, 4)
    again, _ = checkpoints.restore_as_saved(m2, 4)
  flat1 = jax.tree_util.tree_flatten_with_path(straight)[0]
  flat2 = jax.tree_util.tree_flatten_with_path(again)[0]
  assert [p for p, _ in flat1] == [p for p, _ in flat2]
  for (path, a), (_, b) in zip(flat1, flat2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

  ae = score_sde.run.load_autoencoder(workdir)
  assert ae.step == 4 and ae.latent_shape((16, 16, 1)) == (8, 8, 4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ae.params, straight["ema_params"])


def test_train_autoencoder_bad_config(tmp_path):
  for field, value, message in (
      ("reconstruction", "l3", r"config\.autoencoder\.reconstruction 'l3'; valid"),
      ("norm_num_groups", 5, r"config\.autoencoder: norm_num_groups=5 does not divide"),
      ("block_out_channels", (8,) * 6, r"does not fit config\.autoencoder: .* "
       r"divisible by 32"),
      ("kl_weight", -1.0, r"config\.autoencoder\.kl_weight must be a number in \[0"),
      ("batch_size", 3, r"config\.autoencoder\.batch_size")):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=message):
      main.run(config, str(tmp_path / "w"), "train_autoencoder")
  assert not (tmp_path / "w" / "autoencoder").exists()


# --- phase 2: a run on latents -------------------------------------------------------------------



def latent_config(ae_workdir, **data):
  """A tiny DDPM++ on the 8x8x4 latents of the 16x16x1 images: one resolution, no attention
  (what these runs check does not depend on the network; the U-Net's resolutions and its
  attention have their own tests in test_models.py and test_train.py)."""
  config = tiny_config()
  config.data.update(latent=str(ae_workdir), **data)
  config.model.update(ch_mult=(1,), attn_resolutions=())
  config.training.update(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2,
                         eval_freq=2)
  config.sampling.update(method="ddim", steps=3)
  config.eval.update(enable_loss=False, enable_bpd=True, bpd_num_examples=2, bpd_rtol=1e-3,
                     bpd_atol=1e-3)
  return config


def test_latent_run_end_to_end(trained_ae, tmp_path):
  """Train 2 steps on the latents of the phase-1 run ('auto' scale), sample, evaluate: the
  scale is 1 / std of the encoded train images (direct computation), the network sees 8x8x4,
  samples are the decoder's images of the saved latents, bits/dim is reported as latent
  nats/dim."""
  ae_workdir, _ = trained_ae
  config = latent_config(ae_workdir)
  workdir = str(tmp_path / "latent_run")
  assert main.run(config, workdir, "train") == {"step": 2}
  assert networks.image_shape(config) == (8, 8, 4)

  record = json.loads((tmp_path / "latent_run" / "latent.json").read_text())
  ae = score_sde.run.load_autoencoder(ae_workdir)
  spec = experiment.data_spec(config)
  images = next(datasets.get_dataset(spec, "train", batch_size=16).iterate_once())["image"]
  mean, _ = ae.encode(np.asarray(images) * 2 - 1)
  assert record["examples"] == 16 and record["autoencoder"] == os.path.abspath(ae_workdir)
  np.testing.assert_allclose(record["scaling_factor"],
                             1 / np.std(np.asarray(mean, np.float64)), rtol=1e-5)
  snapshot = np.load(tmp_path / "latent_run" / "samples" / "step_2.npz")["samples"]
  assert snapshot.shape == (4, 16, 16, 1)

  result = main.run(config, workdir, "sample", num_samples=4, overrides=[])
  saved = np.load(result["npz"])
  assert saved["samples"].shape == (4, 16, 16, 1) and saved["latents"].shape == (4, 8, 8, 4)
  assert np.all(np.isfinite(saved["latents"]))
  decoded = np.clip((np.asarray(ae.decode(saved["latents"] / record["scaling_factor"])) + 1)
                    / 2, 0, 1)
  np.testing.assert_allclose(saved["samples"], decoded, atol=1e-5)

  metrics = main.run(config, workdir, "eval", overrides=[])
  assert "bpd" not in metrics and np.isfinite(metrics["latent_nats_per_dim"])
  assert metrics["bpd_num_examples"] == 2


def test_latent_bad_input(trained_ae, tmp_path):
  """A pointer that is not an autoencoder, images the autoencoder cannot take, bad latent
  options, an 'auto' run without its latent.json: one clear error, before compiling."""
  ae_workdir, _ = trained_ae
  (tmp_path / "not_ae").mkdir()
  cases = (
      (dict(latent=str(tmp_path / "not_ae")), ValueError, r"not_ae is not an autoencoder"),
      (dict(latent=str(tmp_path / "nowhere")), FileNotFoundError, r"nowhere: no such"),
      (dict(image_size=15), ValueError, r"image shape .*\(15, 15, 1\) does not fit the "
       r"autoencoder config\.data\.latent=.*divisible by 2"),
      (dict(num_channels=3), ValueError, r"\(16, 16, 3\) does not fit .* \(H, W, 1\)"),
      (dict(latent_sample="median"), ValueError, r"config\.data\.latent_sample 'median'; "
       r"valid: \['mean', 'sample'\]"),
      (dict(latent_scaling_factor="-1"), ValueError, r"latent_scaling_factor must be one of"))
  for data, error, message in cases:
    config = latent_config(ae_workdir)
    config.data.update(**data)
    with pytest.raises(error, match=message):
      main.run(config, str(tmp_path / "w"), "train")
  assert not (tmp_path / "w").exists()
  config = latent_config(ae_workdir)
  with pytest.raises(FileNotFoundError, match=r"'auto' but the run has no latent\.json"):
    score_sde.run.latent.latent_space(config, str(tmp_path))


# --- the published pipeline: an imported DiT + an imported autoencoder -----------------------------

DIT_FIXTURES = fixture_path(CASE).parents[1] / "dit"


def test_dit_and_autoencoder_pipeline(imported_ae, tmp_path):
  """The fixture DiT (8x8x4 latents, 10 classes, learned sigma; its EMA weights through the
  library's reader) on the fixture autoencoder's latents (scale 0.18215): one `--mode=sample`
  with a class label and CFG gives finite 16x16x1 images, and they are the reference
  decoder's (diffusers') images of the sampled latents / 0.18215."""
  from score_sde.io import dit_files
  from score_sde.models import dit_weights
  config = default_config.get_config("tiny")
  config.model.name = "dit"
  for field, value in dict(patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                           class_dropout_prob=0.1, num_classes=10, learn_sigma=True).items():
    config.model[field] = value
  unet = default_config.get_config().model  # a DiT refuses changed U-Net-only fields
  config.model.update(nf=unet.nf, num_res_blocks=unet.num_res_blocks,
                      attn_resolutions=unet.attn_resolutions, dropout=unet.dropout,
                      num_scales=1000)
  config.training.update(sde="vpsde", continuous=False)
  config.data.update(dataset="synthetic", image_size=16, num_channels=1, latent=str(imported_ae),
                     latent_scaling_factor="autoencoder")
  config.sampling.update(method="ddim", steps=4, batch_size=4, guidance="cfg",
                         guidance_scale=3.0, class_label=3)
  net = networks.get_model(config)
  state_dict = dit_files.read_dit_checkpoint(DIT_FIXTURES / "dit_tiny_p2.pt")
  variables = dit_weights.params_from_reference(state_dict, net, (8, 8, 4))
  params = jax.tree_util.tree_map(jax.numpy.asarray, variables.pop("params"))
  state = programs.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32), params=params,
      opt_state=experiment.make_optimizer(config).init(params), ema_params=params,
      constants=jax.tree_util.tree_map(jax.numpy.asarray, variables))
  workdir = tmp_path / "dit_run"
  with checkpoints.get_manager(workdir, keep=1) as manager:
    checkpoints.save(manager, 0, state)
    manager.wait_until_finished()
  workdir_lib.save_config(experiment.config_to_plain(config), str(workdir))

  result = main.run(config, str(workdir), "sample", num_samples=4, overrides=[])
  assert "cfg3_y3" in result["npz"]
  saved = np.load(result["npz"])
  images, latents = saved["samples"], saved["latents"]
  assert images.shape == (4, 16, 16, 1) and latents.shape == (4, 8, 8, 4)
  assert np.all(np.isfinite(latents)) and np.all((images >= 0) & (images <= 1))
  assert np.std(images) > 1e-3
  diffusers = _import_diffusers()  # skipped where diffusers is not installed
  import torch
  reference_vae = diffusers.AutoencoderKL.from_pretrained(str(fixture_path(CASE))).eval()
  with torch.no_grad():
    decoded = reference_vae.decode(torch.from_numpy(
        np.ascontiguousarray(latents.transpose(0, 3, 1, 2)) / 0.18215)).sample.numpy()
  expected = np.clip((nhwc(decoded) + 1) / 2, 0, 1)
  np.testing.assert_allclose(images, expected, atol=5e-5)
