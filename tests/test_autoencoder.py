"""The KL autoencoder (LDM / Stable Diffusion first stage): parity with diffusers' reference
outputs, both weight layouts, the posterior's closed forms, and bad input.

The fixture (`shared/fixtures/autoencoder_kl/`, beside the repository; override with
`SCORE_SDE_FIXTURES=<dir holding autoencoder_kl/>`) is a small `diffusers.AutoencoderKL` with
random weights saved as a diffusers folder, with its outputs run in float64.
"""

import json
import math
import os
import pathlib
import pickle
import re
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from score_sde.io import autoencoder_files, torch_zip
from score_sde.models import autoencoder as ae_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("SCORE_SDE_FIXTURES",
                                       ROOT.parent / "shared" / "fixtures")) / "autoencoder_kl"
CASE = "vae_tiny_1ch"
ATOL = 5e-5  # float32 compute against the float64 reference (README of the fixture)


def fixture_path(name: str) -> pathlib.Path:
  path = FIXTURES / name
  if not path.exists():
    pytest.fail(f"Missing fixture {path}: the autoencoder_kl fixtures belong in "
                f"shared/fixtures/ beside the repository (or set SCORE_SDE_FIXTURES)")
  return path


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reference():
  """(config, state_dict, outputs npz, index entry) of the fixture case."""
  config, state = autoencoder_files.read_diffusers_folder(fixture_path(CASE))
  outputs = dict(np.load(fixture_path(f"{CASE}.outputs.npz")))
  index = json.loads(fixture_path("index.json").read_text())[CASE]
  return config, state, outputs, index


@pytest.fixture(scope="module")
def model(reference):
  config, state, _, _ = reference
  ae = ae_lib.autoencoder_from_config(config)
  return ae, ae_lib.params_from_diffusers(state, ae, where=str(fixture_path(CASE)))


def _apply(ae):
  """Jitted `(params, x) -> (recon, mean, logvar)` and `(params, z) -> x_hat` for `ae`."""
  forward = jax.jit(lambda p, x: ae.apply({"params": p}, x))
  decode = jax.jit(lambda p, z: ae.apply({"params": p}, z, method=ae.decode))
  return forward, decode


def _check_fixture_outputs(ae, params, outputs):
  forward, decode = _apply(ae)
  recon, mean, logvar = forward(params, outputs["x_nhwc"])
  dec_mean = decode(params, outputs["mean_nhwc"])
  errors = {}
  for name, value in (("mean", mean), ("logvar", logvar), ("recon", recon),
                      ("dec_mean", dec_mean)):
    assert value.dtype == jnp.float32 and value.shape == nhwc(outputs[f"{name}_f64"]).shape
    errors[name] = float(np.max(np.abs(np.asarray(value, np.float64)
                                       - nhwc(outputs[f"{name}_f64"]))))
  assert max(errors.values()) < ATOL, errors
  return errors


# --- fixture parity ----------------------------------------------------------------------------


def test_fixture_config_and_layout(reference, model):
  """The module built from config.json has the fixture's scaling factor, parameter count and
  exactly its state-dict keys and shapes."""
  _, state, _, index = reference
  ae, params = model
  assert ae.scaling_factor == index["scaling_factor"] == 0.18215
  assert ae.downsample_factor == index["downsample_factor"]
  assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == index["n_parameters"]
  layout = ae_lib.torch_layout(ae)
  assert {k: list(v[2]) for k, v in layout.items()} == index["state_dict_shapes"]
  assert {k: v.shape for k, v in state.items()} == {k: tuple(v)
                                                    for k, v in index["state_dict_shapes"].items()}


def test_fixture_parity(reference, model):
  """Posterior mean / logvar, decoding of the mean and reconstruction equal the float64
  reference within 5e-5 (measured: ~1e-6 for mean / logvar, ~3e-6 for the decodings)."""
  _, _, outputs, _ = reference
  _check_fixture_outputs(*model, outputs)


def test_bfloat16_compute(reference, model):
  """dtype=bfloat16: the same variables, float32 outputs, bf16-sized errors (measured 4e-2 on
  the reconstruction, 2e-2 on the mean, vs ~3e-6 in float32)."""
  config, _, outputs, _ = reference
  ae, params = model
  ae16 = ae_lib.autoencoder_from_config(config, dtype=jnp.bfloat16)
  assert ae16 == ae.clone(dtype=jnp.bfloat16)
  recon, mean, logvar = jax.jit(lambda p, x: ae16.apply({"params": p}, x))(
      params, outputs["x_nhwc"])
  assert recon.dtype == mean.dtype == logvar.dtype == jnp.float32
  error = np.max(np.abs(np.asarray(recon, np.float64) - nhwc(outputs["recon_f64"])))
  assert 1e-3 < error < 0.15, error


def test_sd_vae_parameter_count():
  """The full-size Stable Diffusion autoencoder (sd-vae-ft-mse's config.json fields) has its
  published 83,653,863 parameters and downsamples by 8 (shapes only, no memory)."""
  ae = ae_lib.autoencoder_from_config({
      "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
      "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
      "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
      "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
      "act_fn": "silu"})
  shapes = ae_lib.param_shapes(ae)
  assert sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes)) == 83_653_863
  assert ae.downsample_factor == 8


def _diffusers_to_ldm(state: dict, n_levels: int) -> dict:
  """The LDM / SD names of a diffusers AutoencoderKL state dict (the test's own renaming)."""
  out = {}
  for key, value in state.items():
    new = key
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
                 r"encoder.down.\1.block.\2.", new)
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                 r"encoder.down.\1.downsample.", new)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", new)
    if m:
      level = n_levels - 1 - int(m.group(1))
      inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample"
      new = f"decoder.up.{level}.{inner}.{m.group(4)}"
    new = new.replace("mid_block.resnets.0.", "mid.block_1.")
    new = new.replace("mid_block.resnets.1.", "mid.block_2.")
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}
    for old, ldm in attention.items():
      new = new.replace(f"mid_block.attentions.0.{old}.", f"mid.attn_1.{ldm}.")
    new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
      value = value[:, :, None, None]  # LDM's 1x1 convs
    out[new] = value
  assert len(out) == len(state)
  return out


def test_ldm_layout_gives_the_same_network(reference, model):
  """The fixture's weights renamed to the LDM layout (bare, and inside a full SD checkpoint
  with `first_stage_model.` and foreign keys): the inferred config is the fixture's, the
  params are the diffusers import's, and the outputs match the float64 reference."""
  config, state, outputs, _ = reference
  ae, params = model
  ldm = _diffusers_to_ldm(state, len(config["block_out_channels"]))
  assert any(k.startswith("decoder.up.1.upsample.") for k in ldm)
  inferred = ae_lib.infer_config_from_ldm(ldm, norm_num_groups=config["norm_num_groups"])
  for field in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups", "mid_block_add_attention", "use_quant_conv",
                "use_post_quant_conv", "scaling_factor"):
    assert inferred[field] == config[field], field
  assert list(inferred["block_out_channels"]) == config["block_out_channels"]
  assert list(inferred["down_block_types"]) == config["down_block_types"]
  assert ae_lib.autoencoder_from_config(inferred) == ae
  ldm_params = ae_lib.params_from_ldm(ldm, ae)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ldm_params, params)
  _check_fixture_outputs(ae, ldm_params, outputs)
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  full["model.diffusion_model.out.0.weight"] = np.zeros(3, np.float32)
  full["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  assert ae_lib.infer_config_from_ldm(full, norm_num_groups=16) == inferred
  jax.tree_util.tree_map(np.testing.assert_array_equal, ae_lib.params_from_ldm(full, ae), params)


def test_ldm_checkpoint_files(tmp_path, reference, model):
  """LDM weights read from a torch zip `.ckpt` (Lightning's {'state_dict': ...}, written by
  the project's writer) and from a `.safetensors` file give the diffusers import's params."""
  config, state, _, _ = reference
  ae, params = model
  ldm = _diffusers_to_ldm(state, len(config["block_out_channels"]))
  torch_zip.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()},
                  "global_step": 3}, tmp_path / "sd.ckpt")
  safetensors.numpy.save_file(ldm, str(tmp_path / "vae.safetensors"))
  for name in ("sd.ckpt", "vae.safetensors"):
    read = autoencoder_files.read_ldm_checkpoint(tmp_path / name)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ae_lib.params_from_ldm(read, ae),
                           params)


# --- parity with diffusers on random weights ---------------------------------------------------


def _import_diffusers():
  """diffusers (skipped where it is not installed), with the torchvision work-around of
  test_dit.py (the PyPI torchvision wheel does not load beside the CPU torch)."""
  from test_dit import _import_diffusers_dit
  _import_diffusers_dit()
  return pytest.importorskip("diffusers")


def test_diffusers_parity_random_weights():
  """`diffusers.AutoencoderKL` (2 levels, 2 resnets per level, 3 -> 2 channels, 3 latent
  channels, no quant_conv), every weight perturbed: the same posterior and decoding on a
  non-square image, in float32 (measured max abs error ~1e-6 on outputs of size ~1)."""
  diffusers = _import_diffusers()
  import torch
  kwargs = dict(in_channels=3, out_channels=2, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2,
                latent_channels=3, norm_num_groups=4, use_quant_conv=False)
  torch.manual_seed(0)
  reference = diffusers.AutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.5 / np.sqrt(p[0].numel())))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 8, 12)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(x)).latent_dist
    decoded = reference.decode(posterior.mean).sample
  config = {k: list(v) if isinstance(v, tuple) else v for k, v in reference.config.items()}
  ae = ae_lib.autoencoder_from_config(config)
  assert (ae.use_quant_conv, ae.layers_per_block, ae.out_channels) == (False, 2, 2)
  params = ae_lib.params_from_diffusers(state, ae)
  encode = jax.jit(lambda p, x: ae.apply({"params": p}, x, method=ae.encode))
  decode = jax.jit(lambda p, z: ae.apply({"params": p}, z, method=ae.decode))
  mean, logvar = encode(params, nhwc(x))
  x_hat = decode(params, nhwc(posterior.mean.numpy()))
  for ours, theirs in ((mean, posterior.mean), (logvar, posterior.logvar), (x_hat, decoded)):
    theirs = nhwc(theirs.numpy())
    assert ours.shape == theirs.shape
    assert np.std(theirs) > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)  # measured <= 1.2e-6
  # Folders saved by diffusers < 0.14 name the attention query / key / value / proj_attn.
  old = {re.sub(r"attentions\.0\.to_q\.", "attentions.0.query.", k): v for k, v in state.items()}
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         ae_lib.params_from_diffusers(old, ae), params)


# --- the posterior ------------------------------------------------------------------------------


def test_kl_closed_form():
  """KL(N(m, s^2) || N(0, 1)) summed over non-batch dims equals the float64 formula
  sum(-log s + (s^2 + m^2) / 2 - 1 / 2); zero at the prior."""
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 4, 5))
  logvar = rng.normal(size=(3, 2, 4, 5)) * 2
  s = np.exp(0.5 * logvar)
  expected = np.sum(-np.log(s) + (s ** 2 + mean ** 2) / 2 - 0.5, axis=(1, 2, 3))
  kl = ae_lib.DiagonalGaussian(jnp.asarray(mean, jnp.float32),
                               jnp.asarray(logvar, jnp.float32)).kl()
  assert kl.shape == (3,)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  zero = ae_lib.DiagonalGaussian(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4)))
  np.testing.assert_allclose(zero.kl(), 0.0, atol=1e-7)


def test_sample_statistics():
  """Reparameterized draws have the posterior's mean and std (4 standard errors); `mode` is
  the mean; the posterior is a pytree (a jit argument) and the draw a function of the key."""
  n = 40_000
  mean = jnp.broadcast_to(jnp.asarray([1.5, -2.0, 0.0]), (n, 1, 1, 3))
  std = np.asarray([0.5, 2.0, 1e-3])
  posterior = ae_lib.DiagonalGaussian(mean, jnp.broadcast_to(jnp.log(std ** 2), mean.shape))
  z = np.asarray(jax.jit(lambda p, k: p.sample(k))(posterior, jax.random.key(0)), np.float64)
  np.testing.assert_array_less(np.abs(z.mean(axis=(0, 1, 2)) - [1.5, -2.0, 0.0]),
                               4 * std / np.sqrt(n))
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), std, rtol=4 / np.sqrt(2 * n))
  np.testing.assert_array_equal(posterior.mode(), mean)
  # The same key gives the same draw (up to jit vs eager rounding), another key another.
  np.testing.assert_allclose(posterior.sample(jax.random.key(0)), z, atol=1e-5, rtol=0)
  assert np.abs(posterior.sample(jax.random.key(1)) - z).max() > 1.0


def test_logvar_is_clipped():
  """encode clips the log-variance to [-30, 20] as diffusers does: a quant_conv bias of
  +-100 on the log-variance half gives exactly the bounds."""
  ae = ae_lib.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(4,),
                            latent_channels=1, norm_num_groups=2)
  x = jnp.zeros((2, 4, 4, 1))
  params = jax.jit(ae.init)(jax.random.key(0), x)["params"]
  encode = jax.jit(lambda p: ae.apply({"params": p}, x, method=ae.encode))
  for bias, bound in ((100.0, 20.0), (-100.0, -30.0)):
    quant_conv = {"bias": jnp.asarray([0.0, bias]),
                  "kernel": jnp.zeros_like(params["quant_conv"]["kernel"])}
    _, logvar = encode(dict(params, quant_conv=quant_conv))
    np.testing.assert_array_equal(logvar, bound)


# --- bad input --------------------------------------------------------------------------------


def test_state_dict_mismatches_name_the_key_and_shapes(reference, model):
  _, state, _, _ = reference
  ae, _ = model
  key = "encoder.conv_in.weight"
  wrong = dict(state, **{key: np.zeros((32, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=re.escape(f"'{key}' has shape (32, 3, 3, 3)") + ".*"
                     + re.escape("(32, 1, 3, 3)")):
    ae_lib.params_from_diffusers(wrong, ae, where="x.safetensors")
  missing = {k: v for k, v in state.items() if k != "decoder.conv_in.bias"}
  with pytest.raises(ValueError, match=r"x\.safetensors: missing key 'decoder\.conv_in\.bias' "
                     r"\(expected shape \(64,\)\)"):
    ae_lib.params_from_diffusers(missing, ae, where="x.safetensors")
  extra = dict(state, **{"decoder.conv_extra.weight": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'decoder\.conv_extra\.weight' "
                     r"\(shape \(2,\)\)"):
    ae_lib.params_from_diffusers(extra, ae)
  # A diffusers state dict is not an LDM one (and the other way round).
  with pytest.raises(ValueError, match=r"unexpected key 'decoder\.conv_norm_out\.bias'.*look "
                     r"like the diffusers layout: use params_from_diffusers"):
    ae_lib.params_from_ldm(state, ae)
  ldm = _diffusers_to_ldm(state, 2)
  with pytest.raises(ValueError, match=r"missing key 'decoder\.conv_norm_out\.bias'.*look "
                     r"like the LDM layout: use params_from_ldm"):
    ae_lib.params_from_diffusers(ldm, ae)
  with pytest.raises(ValueError, match=r"no key 'encoder\.conv_in\.weight'"):
    ae_lib.infer_config_from_ldm({"model.diffusion_model.x": np.zeros(1)})
  # Another architecture: the first differing key, both shapes.
  bigger = ae.clone(latent_channels=8)
  with pytest.raises(ValueError, match=r"'decoder\.conv_in\.weight' has shape \(64, 4, 3, 3\).*"
                     r"\(64, 8, 3, 3\)"):
    ae_lib.params_from_diffusers(state, bigger)


def test_images_the_encoder_cannot_take(model):
  """Sizes not divisible by 2^(levels-1), wrong channels or latent channels: a ValueError at
  trace time (before compiling), naming the shape and the valid ones."""
  ae, params = model
  encode = lambda x: ae.apply({"params": params}, x, method=ae.encode)
  decode = lambda z: ae.apply({"params": params}, z, method=ae.decode)
  for shape in ((1, 15, 16, 1), (1, 16, 16, 3), (16, 16, 1)):
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\] with H and W divisible by 2.*"
                       + re.escape(str(shape))):
      jax.eval_shape(encode, jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(ValueError, match=r"latents \[B, h, w, 4\]; got shape \(1, 8, 8, 3\)"):
    jax.eval_shape(decode, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))


def test_bad_configs():
  with pytest.raises(ValueError, match=r"down_block_types=.*AttnDownEncoderBlock2D.*valid: 2 x "
                     r"'DownEncoderBlock2D'"):
    ae_lib.autoencoder_from_config({"block_out_channels": [8, 16], "down_block_types": [
        "DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
  with pytest.raises(ValueError, match=r"up_block_types=\('UpDecoderBlock2D',\)"):
    ae_lib.autoencoder_from_config({"block_out_channels": [8, 16],
                                    "up_block_types": ["UpDecoderBlock2D"]})
  with pytest.raises(ValueError, match=r"norm_num_groups=32 does not divide .*\[8, 16\]"):
    ae_lib.autoencoder_from_config({"block_out_channels": [8, 16],
                                    "down_block_types": ["DownEncoderBlock2D"] * 2,
                                    "up_block_types": ["UpDecoderBlock2D"] * 2})
  with pytest.raises(ValueError, match=r"unknown AutoencoderKL field 'num_heads'"):
    ae_lib.autoencoder_from_config({"num_heads": 2})
  with pytest.raises(ValueError, match=r"_class_name is 'VQModel'"):
    ae_lib.autoencoder_from_config({"_class_name": "VQModel"})
  with pytest.raises(ValueError, match=r"act_fn='relu'"):
    ae_lib.autoencoder_from_config({"act_fn": "relu"})


class _RunsCommand:
  """Unpickling this would run a shell command (what a malicious checkpoint does)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_missing_and_malformed_files(tmp_path, reference):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
    autoencoder_files.read_diffusers_folder(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
    autoencoder_files.read_diffusers_folder(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps(reference[0]))
  with pytest.raises(FileNotFoundError, match=r"No weights in .*empty.*"
                     r"diffusion_pytorch_model\.safetensors"):
    autoencoder_files.read_diffusers_folder(tmp_path / "empty")
  (tmp_path / "empty" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a file")
  with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is not a "
                     r"readable safetensors file"):
    autoencoder_files.read_diffusers_folder(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
    autoencoder_files.read_ldm_checkpoint(tmp_path / "missing.ckpt")
  (tmp_path / "vae.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a legacy (non-zip) pickle
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"vae\.ckpt is not a PyTorch zip"):
    autoencoder_files.read_ldm_checkpoint(tmp_path / "vae.ckpt")
  (tmp_path / "vae.onnx").write_bytes(b"")
  with pytest.raises(ValueError, match=r"vae\.onnx: unknown checkpoint suffix"):
    autoencoder_files.read_ldm_checkpoint(tmp_path / "vae.onnx")
  torch_zip.save({"step": 3}, tmp_path / "nostate.ckpt")
  with pytest.raises(ValueError, match=r"nostate\.ckpt: its dict holds no tensors"):
    autoencoder_files.read_ldm_checkpoint(tmp_path / "nostate.ckpt")
  # A pickle that would run code is refused, and nothing runs.
  marker = tmp_path / "pwned"
  with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"state_dict": _RunsCommand(f"touch {marker}")},
                                                protocol=2))
    z.writestr("archive/byteorder", "little")
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing .*system"):
    autoencoder_files.read_ldm_checkpoint(tmp_path / "evil.ckpt")
  assert not marker.exists()
