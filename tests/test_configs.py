"""Tests of the experiment configs: each builds, keeps exactly the default fields with their
types, sets what its reference experiment sets, and has a tiny variant."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from configs import default
from score_sde.run import experiment

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                     if p.stem not in ("__init__", "default"))


def flatten(config):
  """{'training.sde': 'vpsde', ...} for a ConfigDict."""
  return _flatten(config.to_dict())


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_all_experiments_present():
  assert set(EXPERIMENTS) >= {"cifar10_vp", "cifar10_subvp", "cifar10_ve", "cifar10_vp_deep",
                              "cifar10_ve_deep", "cifar10_ddpm", "fashion_mnist_vp"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_has_exactly_the_default_fields(name):
  base = flatten(default.get_config())
  config = flatten(load(name))
  assert set(config) == set(base)  # nothing added, nothing lost
  for key, value in config.items():
    if value is not None and base[key] is not None:
      assert type(value) is type(base[key]), key


# What each experiment changes relative to the defaults (the reference config's choices).
EXPECTED_DIFFS = {
    "cifar10_vp": {"training.reduce_mean": True, "data.centered": True,
                   "model.embedding_type": "positional"},
    "cifar10_ve": {"training.sde": "vesde", "sampling.predictor": "reverse_diffusion",
                   "sampling.corrector": "langevin", "sampling.eps": 1e-5,
                   "model.scale_by_sigma": True, "model.ema_rate": 0.999, "model.fir": True,
                   "model.progressive_input": "residual"},
    "cifar10_ddpm": {"training.continuous": False, "training.reduce_mean": True,
                     "training.weighting": "ddpm", "sampling.predictor": "ancestral_sampling",
                     "data.centered": True, "model.name": "ddpm",
                     "model.embedding_type": "positional", "model.num_res_blocks": 2},
}
EXPECTED_DIFFS["cifar10_subvp"] = {**EXPECTED_DIFFS["cifar10_vp"], "training.sde": "subvpsde"}
EXPECTED_DIFFS["cifar10_vp_deep"] = {**EXPECTED_DIFFS["cifar10_vp"],
                                     "training.n_iters": 950_001, "model.num_res_blocks": 8}
EXPECTED_DIFFS["cifar10_ve_deep"] = {**EXPECTED_DIFFS["cifar10_ve"],
                                     "training.n_iters": 950_001, "model.num_res_blocks": 8}
FLOW_DIFFS = {"training.sde": "rectified_flow", "model.parameterization": "velocity",
              "training.weighting": "flow_matching", "training.time_sampling": "logit_normal",
              "training.p_mean": 0.0, "training.p_std": 1.0}
EXPECTED_DIFFS["cifar10_rf"] = {**EXPECTED_DIFFS["cifar10_vp"], **FLOW_DIFFS,
                                "sampling.method": "ode"}
EXPECTED_DIFFS["cifar10_vp_cond"] = {**EXPECTED_DIFFS["cifar10_vp"], "model.num_classes": 10,
                                     "training.label_dropout": 0.1, "sampling.guidance": "cfg",
                                     "sampling.guidance_scale": 1.0}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIFFS))
def test_cifar10_experiments_differ_from_default_only_where_reference_does(name):
  base = flatten(default.get_config())
  config = flatten(load(name))
  diff = {k: v for k, v in config.items() if v != base[k]}
  assert diff == EXPECTED_DIFFS[name]


def test_fashion_mnist_is_small_and_unpadded():
  config = load("fashion_mnist_vp")
  assert (config.data.dataset, config.data.image_size, config.data.num_channels) == (
      "fashion_mnist", 28, 1)
  # Every resolution must halve exactly: 28 -> 14 -> 7.
  size = config.data.image_size
  for _ in config.model.ch_mult[1:]:
    assert size % 2 == 0
    size //= 2
  assert set(config.model.attn_resolutions) <= {size}
  assert config.model.nf <= 32


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_variant_keeps_architecture_options(name):
  full, tiny = flatten(load(name)), flatten(load(name, "tiny"))
  assert set(full) == set(tiny)
  width = "model.hidden_size" if full["model.name"] == "dit" else "model.nf"
  assert tiny[width] < full[width]
  for key in ("model.name", "model.resblock_type", "model.fir", "model.progressive",
              "model.progressive_input", "model.embedding_type", "model.ch_mult",
              "training.sde", "data.image_size"):
    assert tiny[key] == full[key], key


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="tiny"):
    load("cifar10_vp", "huge")


def test_fashion_mnist_rf_is_the_vp_demo_with_flow_matching():
  vp, rf = flatten(load("fashion_mnist_vp")), flatten(load("fashion_mnist_rf"))
  assert {k: v for k, v in rf.items() if v != vp[k]} == FLOW_DIFFS


@pytest.mark.parametrize("name", ["fashion_mnist_rf", "cifar10_rf"])
def test_flow_configs_pass_the_config_edge(name):
  for mode in ("train", "sample"):
    experiment.check_config(load(name, "tiny"), mode=mode)
  config = load(name, "tiny")
  config.sampling.update(method="sde", solver="heun", w=0.5, steps=4)
  experiment.check_config(config, mode="sample")


# (field, bad value, what the error must list among the valid ones)
FLOW_BAD_INPUT = [
    ("training.sde", "rectified", "'rectified_flow', 'subvpsde', 'trigflow'"),
    ("model.parameterization", "flow", "'score', 'v', 'velocity'"),
    ("training.weighting", "fm", "'flow_matching'"),
    ("training.time_sampling", "logitnormal", "'log_normal', 'logit_normal', 'uniform'"),
]


@pytest.mark.parametrize("path,value,listed", FLOW_BAD_INPUT,
                         ids=[p for p, _, _ in FLOW_BAD_INPUT])
def test_unknown_flow_names_list_the_valid_ones(path, value, listed):
  config = load("fashion_mnist_rf", "tiny")
  section, field = path.split(".")
  config[section][field] = value
  with pytest.raises(ValueError) as info:
    experiment.check_config(config, mode="train")
  message = str(info.value)
  assert f"Unknown config.{path} {value!r}; valid: [" in message, message
  assert listed in message, message


@pytest.mark.parametrize("options,match", [
    (dict(w=-1.0), r"config.sampling \(method='sde'\): w must be a finite number >= 0.*-1.0"),
    (dict(w=float("nan")), r"w must be a finite number >= 0.*nan"),
    (dict(solver="dopri5"), r"Unknown sde solver 'dopri5'; valid: \['euler', 'heun'\]"),
])
def test_bad_dial_options_at_the_config_edge(options, match):
  config = load("fashion_mnist_rf", "tiny")
  config.sampling.update(method="sde", solver="euler", w=1.0)
  config.sampling.update(**options)
  with pytest.raises(ValueError, match=match):
    experiment.check_config(config, mode="sample")


def test_unipc_reads_its_own_corrector_field_not_pcs():
  """`sampling.corrector` is pc's corrector name ('none' by default); unipc's UniC switch is
  `sampling.unipc_corrector`, so `method=unipc` passes the config edge with the defaults."""
  from configs import default as default_config
  from score_sde import sampling
  from score_sde.run import experiment
  config = default_config.get_config("tiny")
  config.sampling.method = "unipc"
  experiment.check_config(config, mode="sample")
  method, options = experiment.sampler_settings(config)
  assert options["corrector"] is True
  config.sampling.unipc_corrector = False
  assert experiment.sampler_settings(config)[1]["corrector"] is False
  config.sampling.method = "pc"
  method, options = experiment.sampler_settings(config)
  assert options["corrector"] == "none"
  sampling.check_options(experiment.make_sde(config), method, options)


def test_fashion_mnist_latent_is_the_vp_demo_on_7x7x4_latents():
  from score_sde.run import autoencoder as autoencoder_run
  from score_sde.run import autoencoder_training
  vp, lat = flatten(load("fashion_mnist_vp")), flatten(load("fashion_mnist_latent"))
  diffs = {k: v for k, v in lat.items() if v != vp[k]}
  assert {k for k in diffs if not k.startswith("autoencoder.")} == {
      "model.nf", "model.ch_mult", "model.num_res_blocks"}
  assert diffs["model.ch_mult"] == (1,) and lat["model.attn_resolutions"] == (7,)
  config = load("fashion_mnist_latent")
  module = autoencoder_training.module_of(config)  # builds nothing: shapes only
  assert autoencoder_run.latent_shape(module, (28, 28, 1)) == (7, 7, 4)
  assert lat["data.latent"] is None  # phase 2 names phase 1's workdir on the command line
  tiny = autoencoder_training.module_of(load("fashion_mnist_latent", "tiny"))
  assert tiny.downsample_factor == 2  # the tiny variant's (8, 16): two levels
