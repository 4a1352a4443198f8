"""`--format=ldm_vae --yaml=CONFIG.yaml`: an LDM / Stable Diffusion YAML gives the autoencoder's
architecture (checked against the state dict's shapes) and its latent scale.

The weights are the fixture `shared/fixtures/autoencoder_kl/vae_tiny_1ch` (16x16x1 -> 8x8x4,
block_out_channels (32, 64), one resnet per level, 16 GroupNorm groups) renamed to the LDM
layout by the test's own renaming (`test_autoencoder._diffusers_to_ldm`).
"""

import copy
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import yaml

import score_sde.run
from score_sde.io import autoencoder_files, torch_zip
from score_sde.run import autoencoder as ae_run
from score_sde.run import reference

from test_autoencoder import (ATOL, CASE, ROOT, _check_fixture_outputs, _diffusers_to_ldm,
                              fixture_path)

GROUPS = 16  # the fixture's GroupNorm groups (LDM's 32 is the import's default)

# LDM's `ddconfig` of the fixture's network.
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}


def full_config(scale_factor=0.5, **ddconfig):
  """A full SD-style config (v1-inference.yaml's layout) with the fixture as first stage."""
  return {"model": {
      "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
      "params": {"linear_start": 0.00085, "scale_factor": scale_factor,
                 "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                 "params": {"model_channels": 320}},
                 "first_stage_config": {
                     "target": "ldm.models.autoencoder.AutoencoderKL",
                     "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                                "ddconfig": {**DDCONFIG, **ddconfig},
                                "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def write_yaml(path, data):
  path.write_text(yaml.safe_dump(data))
  return path


@pytest.fixture(scope="module")
def ldm_checkpoint(tmp_path_factory):
  """The fixture's weights as a bare LDM `.safetensors` file."""
  config, state = autoencoder_files.read_diffusers_folder(fixture_path(CASE))
  path = tmp_path_factory.mktemp("ldm") / "vae.safetensors"
  safetensors.numpy.save_file(_diffusers_to_ldm(state, len(config["block_out_channels"])),
                              str(path))
  return path


@pytest.fixture(scope="module")
def outputs():
  return dict(np.load(fixture_path(f"{CASE}.outputs.npz")))


def test_yaml_gives_the_inferred_network_and_its_scale(ldm_checkpoint, outputs, tmp_path):
  """A full SD config and a bare first-stage config give the network inferred from the shapes
  (same module but for the scale, same params, the reference's outputs within 5e-5); the
  scaling factor is the full config's `model.params.scale_factor`; a first-stage config holds
  none, so SD's 0.18215 stays."""
  inferred = ae_run.import_ldm_vae(ldm_checkpoint, tmp_path / "no_yaml", norm_num_groups=GROUPS)
  full = write_yaml(tmp_path / "v1-inference.yaml", full_config(scale_factor=0.5))
  with_yaml = ae_run.import_ldm_vae(ldm_checkpoint, tmp_path / "yaml", norm_num_groups=GROUPS,
                                    yaml_path=full)
  assert inferred["scaling_factor"] == 0.18215 and inferred["yaml"] is None
  assert with_yaml["scaling_factor"] == 0.5 and with_yaml["yaml"] == str(full)
  assert with_yaml["config"] == {**inferred["config"], "scaling_factor": 0.5}
  plain = score_sde.run.load_autoencoder(tmp_path / "no_yaml")
  ae = score_sde.run.load_autoencoder(tmp_path / "yaml")
  assert ae.scaling_factor == 0.5 and plain.scaling_factor == pytest.approx(0.18215)
  assert ae.module.clone(scaling_factor=plain.module.scaling_factor) == plain.module
  jax.tree_util.tree_map(np.testing.assert_array_equal, ae.params, plain.params)
  _check_fixture_outputs(ae.module, ae.params, outputs)
  for a, b in zip(ae.encode(outputs["x_nhwc"]), plain.encode(outputs["x_nhwc"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A first-stage config (LDM's models/first_stage_models/*/config.yaml layout), and one bare.
  stage = full_config()["model"]["params"]["first_stage_config"]
  for name, data in (("first_stage.yaml", {"model": stage}), ("bare.yaml", stage["params"])):
    info = reference.import_any("ldm_vae", ldm_checkpoint, tmp_path / f"w_{name}",
                                yaml_path=write_yaml(tmp_path / name, data))
    assert info["scaling_factor"] == pytest.approx(0.18215), name
    assert info["config"]["block_out_channels"] == [32, 64], name
    assert info["config"]["norm_num_groups"] == 32, name  # not in any YAML: LDM's 32


def test_yaml_scale_by_std_reads_the_saved_factor(ldm_checkpoint, tmp_path):
  """`scale_by_std: true`: the factor LDM computed from data is the checkpoint's
  `scale_factor` tensor (a full checkpoint keeps it beside `first_stage_model.*`)."""
  data = full_config(scale_factor=1.0)
  data["model"]["params"]["scale_by_std"] = True
  path = write_yaml(tmp_path / "std.yaml", data)
  state = autoencoder_files.read_ldm_checkpoint(ldm_checkpoint)
  full = {f"first_stage_model.{k}": v for k, v in state.items()}
  torch_zip.save({"state_dict": {**full, "scale_factor": np.asarray(0.25, np.float32)}},
                 tmp_path / "with.ckpt")
  info = ae_run.import_ldm_vae(tmp_path / "with.ckpt", tmp_path / "w", yaml_path=path)
  assert info["scaling_factor"] == 0.25
  assert score_sde.run.load_autoencoder(tmp_path / "w").scaling_factor == 0.25
  torch_zip.save({"state_dict": full}, tmp_path / "without.ckpt")
  with pytest.raises(ValueError, match=r"scale_by_std is true.*without\.ckpt holds no "
                     r"scalar 'scale_factor'"):
    ae_run.import_ldm_vae(tmp_path / "without.ckpt", tmp_path / "w2", yaml_path=path)
  # An explicit factor wins over the YAML's.
  info = ae_run.import_ldm_vae(tmp_path / "without.ckpt", tmp_path / "w3", yaml_path=path,
                               scaling_factor=0.3)
  assert info["scaling_factor"] == 0.3


@pytest.mark.parametrize("field, value, message", [
    ("ch_mult", [1, 2, 4], r"ddconfig\.ch_mult is \[1, 2, 4\], "
     r"but the state dict of .*vae\.safetensors has \[1, 2\]"),
    ("ch", 64, r"ddconfig\.ch is 64, but the state dict of .*vae\.safetensors has 32"),
    ("num_res_blocks", 2, r"ddconfig\.num_res_blocks is 2, but .* has 1"),
    ("in_channels", 3, r"ddconfig\.in_channels is 3, but .* has 1"),
    ("out_ch", 3, r"ddconfig\.out_ch is 3, but .* has 1"),
    ("attn_type", "none", r"ddconfig\.attn_type is 'none', but .* has mid-block attention"),
], ids=["ch_mult", "ch", "num_res_blocks", "in_channels", "out_ch", "attn_type"])
def test_yaml_that_disagrees_with_the_weights(ldm_checkpoint, tmp_path, field, value, message):
  """A YAML field the state dict's shapes contradict: one error naming the field and both
  values, and nothing written."""
  path = write_yaml(tmp_path / "bad.yaml", full_config(**{field: value}))
  with pytest.raises(ValueError, match=re.escape(f"{path}: model.params.first_stage_config."
                                                 f"params.") + message):
    reference.import_any("ldm_vae", ldm_checkpoint, tmp_path / "w", yaml_path=path)
  assert not (tmp_path / "w").exists()


def test_yaml_latent_width_that_disagrees(ldm_checkpoint, tmp_path):
  data = full_config(z_channels=8)
  data["model"]["params"]["first_stage_config"]["params"]["embed_dim"] = 8
  path = write_yaml(tmp_path / "z8.yaml", data)
  with pytest.raises(ValueError, match=r"ddconfig\.z_channels is 8, but the state dict of "
                     r".*vae\.safetensors has 4"):
    reference.import_any("ldm_vae", ldm_checkpoint, tmp_path / "w", yaml_path=path)
  assert not (tmp_path / "w").exists()


def _unsupported(change):
  data = full_config()
  change(data["model"]["params"])
  return data


FIRST_STAGE = r"model\.params\.first_stage_config\.params\."


@pytest.mark.parametrize("change, message", [
    (lambda p: p["first_stage_config"].update(target="ldm.models.autoencoder.VQModel"),
     r"model\.params\.first_stage_config\.target is 'ldm\.models\.autoencoder\.VQModel'; "
     r"supported: \('ldm\.models\.autoencoder\.AutoencoderKL'"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_resolutions=[8]),
     FIRST_STAGE + r"ddconfig\.attn_resolutions is \[8\]: attention at the level "
     r"resolutions \[8\] \(of \[16, 8\].*middle blocks only; supported: \[\]"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(double_z=False),
     FIRST_STAGE + r"ddconfig\.double_z is False, which models\.AutoencoderKL does not "
     r"implement; supported: \(True,\)"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_type="linear"),
     FIRST_STAGE + r"ddconfig\.attn_type is 'linear'.*supported: \('vanilla', "
     r"'vanilla-xformers', 'none'\)"),
    (lambda p: p["first_stage_config"]["params"].update(embed_dim=3),
     FIRST_STAGE + r"embed_dim is 3 but ddconfig\.z_channels is 4.*supported: "
     r"embed_dim == z_channels"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(num_heads=2),
     FIRST_STAGE + r"ddconfig\.num_heads: unknown field; valid: \["),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].pop("z_channels"),
     FIRST_STAGE + r"ddconfig\.z_channels is missing"),
    (lambda p: p.update(latents_mean=[0.0, 0.0, 0.0, 0.0]),
     r"model\.params\.latents_mean is set; per-channel latent statistics are not supported"),
    (lambda p: p.update(scale_factor="auto"), r"model\.params\.scale_factor is 'auto'"),
], ids=["target", "attn_resolutions", "double_z", "attn_type", "embed_dim", "unknown_field",
        "missing_field", "latents_mean", "scale_factor"])
def test_yaml_options_the_module_cannot_express(ldm_checkpoint, tmp_path, change, message):
  """An option `models.AutoencoderKL` has no counterpart for: one error naming the option
  and the supported values, before the checkpoint is read."""
  path = write_yaml(tmp_path / "unsupported.yaml", _unsupported(change))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
    # A checkpoint that does not exist: the YAML is refused before any file is read.
    ae_run.import_ldm_vae(tmp_path / "not_read.ckpt", tmp_path / "w", yaml_path=path)
  assert not (tmp_path / "w").exists()


def test_yaml_files_that_are_not_ldm_configs(ldm_checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No YAML file .*nowhere\.yaml"):
    ae_run.read_ldm_yaml(tmp_path / "nowhere.yaml")
  (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
  with pytest.raises(ValueError, match=r"broken\.yaml is not valid YAML \("):
    ae_run.read_ldm_yaml(tmp_path / "broken.yaml")
  (tmp_path / "code.yaml").write_text("!!python/object/apply:os.system ['true']\n")
  with pytest.raises(ValueError, match=r"code\.yaml is not valid YAML"):  # safe_load
    ae_run.read_ldm_yaml(tmp_path / "code.yaml")
  write_yaml(tmp_path / "unet.yaml", {"model": {"params": {"unet_config": {}}}})
  with pytest.raises(ValueError, match=r"unet\.yaml holds no autoencoder config: expected "
                     r"model\.params\.first_stage_config\.params"):
    ae_run.read_ldm_yaml(tmp_path / "unet.yaml")
  path = write_yaml(tmp_path / "v1.yaml", full_config())
  with pytest.raises(ValueError, match=r"--yaml is an LDM / Stable Diffusion YAML of "
                     r"--format=ldm_vae; --format=diffusers_vae takes none"):
    reference.import_any("diffusers_vae", fixture_path(CASE), tmp_path / "w", yaml_path=path)


def test_import_script_takes_a_yaml(ldm_checkpoint, tmp_path):
  """The command line: `--yaml` reaches the import (the scale printed is the YAML's), and a
  mismatching YAML is one `error:` line naming the field, exit 2."""
  good = write_yaml(tmp_path / "good.yaml", full_config(scale_factor=0.125))
  bad = write_yaml(tmp_path / "bad.yaml", full_config(ch_mult=[1, 2, 4]))
  results = {}
  for name, path in (("good", good), ("bad", bad)):
    results[name] = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_checkpoint.py"), "--format=ldm_vae",
         f"--checkpoint={ldm_checkpoint}", f"--yaml={path}", f"--workdir={tmp_path / name}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  good, bad = results["good"], results["bad"]
  assert good.returncode == 0, good.stderr
  assert "scaling_factor 0.125" in good.stdout, good.stdout
  record = json.loads((tmp_path / "good" / "autoencoder" / "autoencoder.json").read_text())
  assert record["config"]["scaling_factor"] == 0.125
  assert bad.returncode == 2, bad.stderr
  lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "ddconfig.ch_mult is [1, 2, 4]" in lines[0], bad.stderr


def test_yaml_target_of_a_first_stage_config(ldm_checkpoint, tmp_path):
  """The `target` check names the key where it is in each layout of a first-stage config."""
  stage = copy.deepcopy(full_config()["model"]["params"]["first_stage_config"])
  stage["target"] = "ldm.models.autoencoder.VQModelInterface"
  for data, key in (({"model": stage}, "model.target"), (stage, "target")):
    path = write_yaml(tmp_path / "vq.yaml", data)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {key} is 'ldm.models.autoencoder."
                                                   f"VQModelInterface'; supported: (")):
      ae_run.read_ldm_yaml(path)
