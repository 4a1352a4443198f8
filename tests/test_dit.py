"""Tests of the DiT network and its weight conversion.

- Parameter counts of the twelve published sizes (latent 32x32x4, 1000 classes, learn_sigma)
  under `jax.eval_shape`, against a closed-form count of the reference's layers and the paper's
  rounded figures. The count includes the frozen `pos_embed` table (here in `constants`), as
  the reference's `sum(p.numel() for p in model.parameters())` does (it is an
  `nn.Parameter(requires_grad=False)` there).
- The reference fixture (`shared/fixtures/dit/`, beside the repository; override with
  `SCORE_SDE_FIXTURES=<dir holding dit/>`): a bare state dict and a training checkpoint made by
  facebookresearch/DiT `models.py`, with its float64 outputs. Imported weights must reproduce
  them within 5e-5 absolute in float32 (both weight sets, and `forward_with_cfg`).
- diffusers' `DiTTransformer2DModel` with random weights, converted (test-only dependency).
- bfloat16 compute, label dropout, initialization, and the errors for bad input.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_vp_cond, default, fashion_mnist_dit, imagenet256_dit
from score_sde import main, models
from score_sde.io import dit_files, torch_zip
from score_sde.run import experiment, networks, programs, reference
from score_sde import sde as sde_lib
from score_sde.models import dit_weights
from score_sde.models.dit import DIT_SIZES, DiT, dit_size, sincos_pos_embed_2d

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("SCORE_SDE_FIXTURES",
                                       ROOT.parent / "shared" / "fixtures")) / "dit"
ATOL = 5e-5  # the fixture README's suggestion: ~10x the float32 noise, catches tanh/erf GELU
IMAGE = (8, 8, 4)  # the fixture's input, NHWC

# The paper's rounded parameter counts (Peebles & Xie 2023), in millions.
PUBLISHED_MILLIONS = {"S/2": 33, "B/2": 130, "L/2": 458, "XL/2": 675}


def fixture_path(name: str) -> pathlib.Path:
  path = FIXTURES / name
  if not path.exists():
    pytest.fail(f"Missing fixture {path}: the DiT fixtures belong in shared/fixtures/dit/ "
                "beside the repository (or set SCORE_SDE_FIXTURES)")
  return path


def fixture_index() -> dict:
  return json.loads(fixture_path("index.json").read_text())["dit_tiny_p2"]


def fixture_outputs() -> dict:
  return dict(np.load(fixture_path("dit_tiny_p2.outputs.npz")))


def fixture_net(**overrides) -> DiT:
  args = fixture_index()["constructor_args"]
  fields = dict(patch_size=args["patch_size"], hidden_size=args["hidden_size"],
                depth=args["depth"], num_heads=args["num_heads"], mlp_ratio=args["mlp_ratio"],
                class_dropout_prob=args["class_dropout_prob"], num_classes=args["num_classes"],
                learn_sigma=args["learn_sigma"])
  return DiT(**{**fields, **overrides})


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.asarray(a).transpose(0, 2, 3, 1)


def jit_apply(net: DiT, train: bool = False):
  """`(variables, x, t, class_labels, rng) -> net.apply(...)`, compiled (eager op-by-op
  dispatch of a transformer is slower than compiling it once)."""
  def apply(variables, x, t, y, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    return net.apply(variables, x, t, train=train, class_labels=y, rngs=rngs)
  return jax.jit(apply)


def init(net: DiT, image_shape=IMAGE):
  return jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.zeros((1,)))


@pytest.fixture(scope="module")
def apply_fn():
  """The fixture network's `apply`, compiled once per module."""
  return jit_apply(fixture_net())


# --- parameter counts -----------------------------------------------------------------------


def reference_param_count(depth: int, hidden_size: int, patch_size: int, *, in_channels=4,
                          input_size=32, num_classes=1000, mlp_ratio=4.0,
                          learn_sigma=True) -> int:
  """`sum(p.numel() for p in DiT(...).parameters())` of the reference, from its layer shapes
  (pos_embed included; class_dropout_prob > 0, so the label table has the null row)."""
  d, p, c = hidden_size, patch_size, in_channels
  m = int(d * mlp_ratio)
  c_out = 2 * c if learn_sigma else c
  tokens = (input_size // p) ** 2
  pos_embed = tokens * d
  x_embedder = c * p * p * d + d                        # Conv2d(C, D, p, stride p)
  t_embedder = (256 * d + d) + (d * d + d)              # Linear(256, D), Linear(D, D)
  y_embedder = (num_classes + 1) * d                    # Embedding(num_classes + 1, D)
  block = ((d * 3 * d + 3 * d) + (d * d + d)            # attn.qkv, attn.proj
           + (d * m + m) + (m * d + d)                  # mlp.fc1, mlp.fc2
           + (d * 6 * d + 6 * d))                       # adaLN_modulation.1
  final = (d * p * p * c_out + p * p * c_out) + (d * 2 * d + 2 * d)
  return pos_embed + x_embedder + t_embedder + y_embedder + depth * block + final


def abstract_count(net: DiT, image_shape, collections=None) -> int:
  variables = jax.eval_shape(
      lambda k: net.init(k, jnp.zeros((1, *image_shape)), jnp.zeros((1,))), jax.random.key(0))
  if collections is not None:
    variables = {k: variables[k] for k in collections}
  return models.count_params(variables)


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_parameter_counts_of_published_sizes(size):
  net = DiT(**dit_size(size), num_classes=1000, learn_sigma=True)
  count = abstract_count(net, (32, 32, 4))
  fields = DIT_SIZES[size]
  assert count == reference_param_count(fields["depth"], fields["hidden_size"],
                                        fields["patch_size"])
  if size in PUBLISHED_MILLIONS:
    # The paper's figures round the trainable count (without the fixed pos_embed): B/2 has
    # 130.32M trainable, 130.51M with the table.
    trainable = abstract_count(net, (32, 32, 4), ["params"])
    assert trainable == count - (32 // fields["patch_size"]) ** 2 * fields["hidden_size"]
    assert round(trainable / 1e6) == PUBLISHED_MILLIONS[size]


def test_parameter_count_of_the_fixture():
  index = fixture_index()
  net = fixture_net()
  assert abstract_count(net, IMAGE) == index["n_parameters"]  # 183,200
  assert abstract_count(net, IMAGE, ["params"]) == index["n_parameters_excluding_pos_embed"]
  assert reference_param_count(2, 64, 2, input_size=8, num_classes=10) == index["n_parameters"]


# --- the reference fixture ------------------------------------------------------------------


def test_position_table_equals_the_reference():
  """The computed sin-cos table is the reference's stored one (float64 -> float32)."""
  table = sincos_pos_embed_2d(64, 4, 4)[None].astype(np.float32)
  np.testing.assert_array_equal(table, fixture_outputs()["pos_embed"])
  np.testing.assert_array_equal(init(fixture_net())["constants"]["pos_embed"], table)


@pytest.mark.parametrize("file,ema", [("dit_tiny_p2.pt", True), ("dit_tiny_p2.train.pt", True),
                                      ("dit_tiny_p2.train.pt", False)])
def test_fixture_outputs(apply_fn, file, ema):
  out = fixture_outputs()
  state_dict = dit_files.read_dit_checkpoint(fixture_path(file), ema=ema)
  variables = dit_weights.params_from_reference(state_dict, fixture_net(), IMAGE)
  got = apply_fn(variables, jnp.asarray(out["x_nhwc"]), jnp.asarray(out["t"], jnp.float32),
                 jnp.asarray(out["y"], jnp.int32))
  want = nhwc(out["out_ema_f64" if ema else "out_model_f64"])
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("ema", [True, False])
def test_fixture_guided_output(apply_fn, ema):
  """`forward_with_cfg`: the first half of x twice, eps = uncond + s (cond - uncond) on
  channels 0..2 only (the reference's choice), written to both halves; the other channels raw."""
  out = fixture_outputs()
  state_dict = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.train.pt"),
                                                     ema=ema)
  variables = dit_weights.params_from_reference(state_dict, fixture_net(), IMAGE)
  x = jnp.asarray(out["cfg_x_nhwc"])
  half = x.shape[0] // 2
  model_out = apply_fn(variables, jnp.concatenate([x[:half], x[:half]]),
                       jnp.asarray(out["cfg_t"], jnp.float32), jnp.asarray(out["cfg_y"], jnp.int32))
  cond, uncond = model_out[:half, ..., :3], model_out[half:, ..., :3]
  guided = uncond + float(out["cfg_scale"]) * (cond - uncond)
  got = jnp.concatenate([jnp.concatenate([guided, guided]), model_out[..., 3:]], axis=-1)
  want = nhwc(out["cfg_out_ema_f64" if ema else "cfg_out_model_f64"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)


def test_checkpoint_files_and_export():
  """The bare file is the training file's EMA; export gives the reference state dict back
  bit for bit (keys, order, shapes, values), and torch_zip writes it as a loadable file."""
  bare = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.pt"))
  train_ema = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.train.pt"))
  train_model = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.train.pt"),
                                                      ema=False)
  assert list(bare) == list(train_ema) and len(bare) == fixture_index()["state_dict_keys"]
  assert all(np.array_equal(bare[k], train_ema[k]) for k in bare)
  assert not np.array_equal(bare["blocks.0.attn.qkv.weight"],
                            train_model["blocks.0.attn.qkv.weight"])
  net = fixture_net()
  exported = dit_weights.reference_from_params(
      dit_weights.params_from_reference(bare, net, IMAGE), net, IMAGE)
  assert list(exported) == list(bare)
  for key, value in bare.items():
    assert exported[key].dtype == np.float32
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_exported_file_loads_in_torch(tmp_path):
  """An exported state dict, written by torch_zip, is read by `torch.load(weights_only=True)`
  (what the reference's `find_model` calls) and by `read_dit_checkpoint`."""
  torch = pytest.importorskip("torch")
  net = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3)
  exported = dit_weights.reference_from_params(init(net), net, IMAGE)
  torch_zip.save(exported, tmp_path / "dit.pt")
  loaded = torch.load(tmp_path / "dit.pt", weights_only=True)
  assert list(loaded) == list(exported)
  for key, value in exported.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
  again = dit_files.read_dit_checkpoint(tmp_path / "dit.pt")
  assert all(np.array_equal(again[k], exported[k]) for k in exported)


def test_training_checkpoint_args_are_plain_data():
  checkpoint = torch_zip.load(fixture_path("dit_tiny_p2.train.pt"))
  assert sorted(checkpoint) == ["args", "ema", "model", "opt"]
  assert type(checkpoint["args"]) is types.SimpleNamespace
  assert vars(checkpoint["args"]) == fixture_index()["train_args"]


def _torch_zip_with_pickle(path: pathlib.Path, payload: bytes) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")


def test_restricted_reader_still_refuses_code(tmp_path):
  """A pickle calling os.system (GLOBAL + REDUCE) is refused and nothing runs; so is any other
  argparse name, and a Namespace is data only."""
  marker = tmp_path / "ran"
  code = b"\x80\x02cos\nsystem\n(X" + f"touch {marker}".encode() + b"tR."
  _torch_zip_with_pickle(tmp_path / "evil.pt", code)
  with pytest.raises(torch_zip.CheckpointFormatError, match="os.system"):
    torch_zip.load(tmp_path / "evil.pt")
  assert not marker.exists()
  parser = b"\x80\x02cargparse\nArgumentParser\n)\x81."
  _torch_zip_with_pickle(tmp_path / "parser.pt", parser)
  with pytest.raises(torch_zip.CheckpointFormatError, match="argparse.ArgumentParser"):
    torch_zip.load(tmp_path / "parser.pt")
  namespace = pickle.dumps(__import__("argparse").Namespace(lr=1e-4, model="DiT-S/2"), 2)
  _torch_zip_with_pickle(tmp_path / "args.pt", namespace)
  assert torch_zip.load(tmp_path / "args.pt") == types.SimpleNamespace(lr=1e-4, model="DiT-S/2")


@pytest.mark.parametrize("overrides,key,fits", [
    (dict(hidden_size=32, num_heads=4), "pos_embed", "hidden_size=64"),
    (dict(depth=3), "blocks.2.attn.qkv.weight", "depth=2"),
    (dict(depth=1), "blocks.1.attn.qkv.weight", "depth=2"),
    (dict(patch_size=4), "pos_embed", "patch_size=2"),
    (dict(learn_sigma=False), "final_layer.linear.weight", "learn_sigma=True"),
    (dict(num_classes=1000), "y_embedder.embedding_table.weight", "num_classes=10"),
])
def test_mismatched_checkpoint_names_key_shapes_and_fitting_config(overrides, key, fits):
  state_dict = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.pt"))
  with pytest.raises(ValueError) as info:
    dit_weights.params_from_reference(state_dict, fixture_net(**overrides), IMAGE)
  message = str(info.value)
  assert f"{key!r}" in message and fits in message and "configured network" in message, message


# --- diffusers ------------------------------------------------------------------------------


def _import_diffusers_dit():
  torch = pytest.importorskip("torch")
  # The PyPI torchvision wheel does not load beside the CPU torch (see test_inception.py);
  # diffusers imports it. Defining its two operator schemas first lets the import pass.
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_diffusers_dit.keep = lib
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
  except ImportError:
    pass
  diffusers = pytest.importorskip("diffusers")
  return torch, diffusers.DiTTransformer2DModel


def test_diffusers_parity():
  """Random diffusers weights, converted: the same outputs (float64 torch vs float32 here;
  measured max |error| 5e-7 at outputs of size ~1.6).

  diffusers' port differs from the reference in two constants, set to the reference's here:
  its timestep features divide by (half - 1) (`downscale_freq_shift=1`; patched to 0) and its
  block LayerNorm eps defaults to 1e-5 (constructed with 1e-6). Unpatched, its outputs differ
  from the reference network's by ~2% (relative L2) on these weights."""
  torch, DiTTransformer2DModel = _import_diffusers_dit()
  torch.manual_seed(0)
  ref = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                              out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                              num_embeds_ada_norm=10, norm_eps=1e-6).eval()
  with torch.no_grad():
    for p in ref.parameters():  # no zero layer; float32-representable values
      scale = 0.5 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.1
      p.copy_(torch.randn_like(p) * scale)
    for block in ref.transformer_blocks[1:]:  # one shared embedder, as a converted DiT has
      block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    for block in ref.transformer_blocks:
      block.norm1.emb.time_proj.downscale_freq_shift = 0
  state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
  ref = ref.double()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 8, 8))
  t, y = np.array([0, 500, 999]), np.array([1, 10, 9])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy()
  net = fixture_net()
  variables = dit_weights.params_from_diffusers(state_dict, net, IMAGE)
  got = jit_apply(net)(variables, jnp.asarray(nhwc(x), jnp.float32),
                       jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), nhwc(want), rtol=0, atol=5e-6)
  state_dict["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1
  with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb"):
    dit_weights.params_from_diffusers(state_dict, net, IMAGE)


# --- precision, label dropout, initialization ----------------------------------------------


def test_bfloat16_close_to_float32(apply_fn):
  out = fixture_outputs()
  state_dict = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.pt"))
  variables = dit_weights.params_from_reference(state_dict, fixture_net(), IMAGE)
  args = (jnp.asarray(out["x_nhwc"]), jnp.asarray(out["t"], jnp.float32),
          jnp.asarray(out["y"], jnp.int32))
  f32 = apply_fn(variables, *args)
  bf16_net = models.with_precision(fixture_net(), "bfloat16")
  bf16 = jit_apply(bf16_net)(variables, *args)
  assert bf16.dtype == jnp.float32
  assert float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)) < 3e-2


def test_label_dropout_in_training():
  """train=True replaces each label by the null class with probability class_dropout_prob
  (the 'dropout' rng); eval never drops. Each training output is the conditional or the null
  output of that example."""
  net = fixture_net(class_dropout_prob=0.5)
  state_dict = dit_files.read_dit_checkpoint(fixture_path("dit_tiny_p2.pt"))
  variables = dit_weights.params_from_reference(state_dict, net, IMAGE)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, *IMAGE)), jnp.float32)
  t, y = jnp.full((16,), 300.0), jnp.arange(16) % 10
  evaluate, train = jit_apply(net), jit_apply(net, train=True)
  cond = evaluate(variables, x, t, y)
  null = evaluate(variables, x, t, jnp.full((16,), 10))
  trained = train(variables, x, t, y, jax.random.key(3))
  dist = lambda a: np.abs(np.asarray(trained - a)).reshape(16, -1).max(axis=1)
  is_cond, is_null = dist(cond) < 1e-6, dist(null) < 1e-6
  assert np.all(is_cond | is_null) and is_cond.any() and is_null.any()
  np.testing.assert_allclose(evaluate(variables, x, t, None), null, rtol=0, atol=1e-6)


def test_initialization_like_the_reference():
  """Zero adaLN and final layers (so the output starts at 0), xavier-uniform Linears (the
  patch embedding as a Linear on C p^2 inputs), N(0, 0.02^2) embeddings."""
  net = DiT(patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
  variables = init(net)
  params = variables["params"]
  out = jit_apply(net)(variables, jnp.ones((2, 8, 8, 4)), jnp.array([3.0, 700.0]),
                       jnp.array([1, 10]))
  np.testing.assert_array_equal(out, 0.0)
  for name in ("adaLN_modulation",):
    assert not np.any(params["blocks_0"][name]["kernel"])
  assert not np.any(params["final_layer_linear"]["kernel"])
  for kernel in (params["x_embedder"]["kernel"], params["blocks_1"]["attn"]["qkv"]["kernel"]):
    bound = np.sqrt(6.0 / sum(kernel.shape))
    assert 0.95 * bound < np.abs(kernel).max() <= bound
  for table in (params["y_embedder"]["embedding"], params["t_embedder_mlp_0"]["kernel"]):
    assert abs(float(np.std(table)) - 0.02) < 0.002


# --- bad input ------------------------------------------------------------------------------


def test_bad_input():
  with pytest.raises(ValueError, match=r"Unknown DiT size 'XXL/2'.*'S/2'.*'XL/8'"):
    dit_size("XXL/2")
  assert dit_size("DiT-XL/2") == DIT_SIZES["XL/2"]
  with pytest.raises(ValueError, match="hidden_size 64 is not divisible by num_heads 5"):
    DiT(patch_size=2, hidden_size=64, depth=1, num_heads=5)
  with pytest.raises(ValueError, match="multiple of 4"):
    DiT(patch_size=2, hidden_size=66, depth=1, num_heads=3)
  with pytest.raises(ValueError, match="class_dropout_prob"):
    DiT(patch_size=2, hidden_size=64, depth=1, num_heads=4, class_dropout_prob=1.0)
  with pytest.raises(ValueError, match="attention_implementation"):
    DiT(patch_size=2, hidden_size=64, depth=1, num_heads=4, attention_implementation="flash")
  net = DiT(patch_size=3, hidden_size=64, depth=1, num_heads=4, num_classes=10)
  with pytest.raises(ValueError, match="patch_size 3 does not divide the image size 8x8"):
    net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))
  net = DiT(patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10,
            class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="null class"):
    net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))
  net = DiT(patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=0)
  with pytest.raises(ValueError, match="unconditional"):
    net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
             class_labels=jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r"labels must be \[B\]"):
    net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 4)), jnp.zeros((1,)))


# --- the config builder ---------------------------------------------------------------------


def dit_config(**model_fields):
  config = default.get_config()
  config.model.name = "dit"
  for name, value in model_fields.items():
    config.model[name] = value
  return config


def test_as_dit_turns_a_unet_config_into_that_dit():
  """`networks.as_dit`: the class-conditional DDPM++ CIFAR-10 config (its U-Net fields
  changed from the defaults, which a DiT config refuses) as DiT-S/2 on the same 32x32x3
  data, with the reference's parameter count; the config itself unchanged."""
  config = cifar10_vp_cond.get_config()
  with pytest.raises(ValueError, match="does not read the U-Net-only field"):
    config.model.name = "dit"
    config.model.dit_size = "S/2"
    networks.get_model(config)
  config = cifar10_vp_cond.get_config()
  dit = networks.as_dit(config, "S/2")
  assert config.model.name == "ncsnpp" and config.model.dit_size is None
  assert dit.data.to_dict() == config.data.to_dict()
  assert dit.training.to_dict() == config.training.to_dict()
  net = networks.get_model(dit)
  assert (net.depth, net.hidden_size, net.patch_size, net.num_heads) == (12, 384, 2, 6)
  abstract = jax.eval_shape(lambda k: networks.init_model(k, dit), jax.random.key(0))
  assert models.count_params(abstract) == reference_param_count(
      12, 384, 2, in_channels=3, input_size=32, num_classes=10,
      learn_sigma=bool(dit.model.learn_sigma))
  with pytest.raises(ValueError, match="Unknown DiT size 'XXL/2'"):
    networks.as_dit(config, "XXL/2")


def test_builder_in_models_table():
  """`models.MODELS['dit']` reads `config.model`; the network then works through
  `init_model` / `count_params` / `get_score_fn` like the U-Nets."""
  config = dit_config(dit_size="S/8", num_classes=10, learn_sigma=False)
  net = networks.get_model(config)
  assert (net.depth, net.hidden_size, net.patch_size, net.num_heads) == (12, 384, 8, 6)
  abstract = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.key(0))
  assert models.count_params(abstract) == reference_param_count(
      12, 384, 8, in_channels=3, input_size=32, num_classes=10, learn_sigma=False)

  config = dit_config(patch_size=4, hidden_size=32, depth=1, num_heads=2, learn_sigma=False)
  config.data.image_size = 8
  net = networks.get_model(config)
  variables = networks.init_model(jax.random.key(0), config, net)
  score_fn = models.ScoreModel(net, sde_lib.VPSDE()).score_fn(variables)
  x = jnp.ones((2, 8, 8, 3))
  assert score_fn(x, jnp.array([0.3, 0.9])).shape == x.shape

  with pytest.raises(ValueError, match="Unknown DiT size 'XXL/2'"):
    networks.get_model(dit_config(dit_size="XXL/2"))
  with pytest.raises(ValueError, match="patch_size 5 does not divide the image size 32x32"):
    networks.get_model(dit_config(patch_size=5, hidden_size=32, depth=1, num_heads=2))


# --- the published sizes through the config file ------------------------------------------


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_imagenet256_config_counts(size):
  """`--config=configs/imagenet256_dit.py:<size>` builds the reference network: its count
  under `jax.eval_shape` (nothing allocated) is the reference's (pos_embed included)."""
  config = imagenet256_dit.get_config(size)
  assert (config.data.image_size, config.data.num_channels, config.model.num_classes,
          config.model.learn_sigma) == (32, 4, 1000, True)
  abstract = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.key(0))
  fields = DIT_SIZES[size]
  assert models.count_params(abstract) == reference_param_count(
      fields["depth"], fields["hidden_size"], fields["patch_size"])


def test_imagenet256_config_arguments():
  assert imagenet256_dit.get_config().model.dit_size == "XL/2"
  with pytest.raises(ValueError, match=r"'XXL/2'.*'S/2'.*'tiny'"):
    imagenet256_dit.get_config("XXL/2")


def test_family_defaults_are_those_of_default_py():
  """The U-Net-only / DiT-only defaults the config edge compares against are default.py's."""
  m = default.get_config().model
  for name, value in {**networks.UNET_ONLY_DEFAULTS, **networks.DIT_ONLY_DEFAULTS}.items():
    assert m[name] == value, name


# --- --mode=describe --------------------------------------------------------------------------


def dit_forward_macs(depth, hidden_size, patch_size, *, image_size, in_channels,
                     learn_sigma, mlp_ratio=4.0, num_classes=0) -> int:
  """Multiply-adds of the matrix products of one DiT forward pass, batch 1."""
  d, p, c = hidden_size, patch_size, in_channels
  m, t = int(d * mlp_ratio), (image_size // p) ** 2
  c_out = 2 * c if learn_sigma else c
  block = t * (d * 3 * d + d * d + d * m + m * d) + 2 * t * t * d + d * 6 * d
  return (t * p * p * c * d + 256 * d + d * d + depth * block + d * 2 * d
          + t * d * p * p * c_out)


def describe(capsys, config) -> dict:

  assert main.execute(config, None, "describe") == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_describe_tiny(capsys):
  """One JSON line: the exact count and XLA's flops (2 per multiply-add): at least the matrix
  products', and not much more (the elementwise rest is small)."""
  config = fashion_mnist_dit.get_config("tiny")
  out = describe(capsys, config)
  m = config.model
  abstract = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.key(0))
  assert out["params"] == models.count_params(abstract) == reference_param_count(
      m.depth, m.hidden_size, m.patch_size, in_channels=1, input_size=28, num_classes=0,
      learn_sigma=False) - m.hidden_size  # unconditional: no label table (not even a null row)
  macs = dit_forward_macs(m.depth, m.hidden_size, m.patch_size, image_size=28, in_channels=1,
                          learn_sigma=False)
  assert 2 * macs <= out["flops_per_image"] <= 1.3 * 2 * macs, (out, macs)
  assert out["image_shape"] == [28, 28, 1]


def test_describe_xl2(capsys):
  """DiT-XL/2 at 256 px: 675,129,632 parameters (the reference's count), and XLA's flops are
  2x the paper's 118.6 Gflops (which count a multiply-add once) within 1%."""
  out = describe(capsys, imagenet256_dit.get_config("XL/2"))
  assert out["params"] == 675_129_632 == reference_param_count(28, 1152, 2)
  assert abs(out["flops_per_image"] / 2 / 118.6e9 - 1) < 0.01, out
  macs = dit_forward_macs(28, 1152, 2, image_size=32, in_channels=4, learn_sigma=True)
  assert 2 * macs <= out["flops_per_image"] <= 1.02 * 2 * macs


# --- scripts/import_checkpoint.py --format=dit (run/reference.py) -------------------------------


def fixture_config():
  """A DiT config of the fixture's network (8x8x4 latents, 10 classes, learn_sigma)."""
  args = fixture_index()["constructor_args"]
  config = dit_config(patch_size=args["patch_size"], hidden_size=args["hidden_size"],
                      depth=args["depth"], num_heads=args["num_heads"],
                      mlp_ratio=args["mlp_ratio"], num_classes=args["num_classes"],
                      class_dropout_prob=args["class_dropout_prob"],
                      learn_sigma=args["learn_sigma"])
  config.data.image_size, config.data.num_channels = args["input_size"], args["in_channels"]
  config.training.continuous = False  # the reference's integer steps are the time labels
  config.training.weighting = "ddpm"
  return config


@pytest.mark.parametrize("file", ["dit_tiny_p2.train.pt", "dit_tiny_p2.pt"])
def test_import_then_load_run(tmp_path, file):
  """import -> `load_run`: the run's EMA variables (and, for the training checkpoint, the raw
  ones) give the reference's float64 outputs within 5e-5."""
  workdir = str(tmp_path / "run")
  info = reference.import_any("dit", fixture_path(file), workdir, config=fixture_config())
  assert info == {"format": "dit", "step": 0}
  run = programs.load_run(workdir)
  out = fixture_outputs()
  net = run.score_model.network
  apply = jit_apply(net)
  args = (jnp.asarray(out["x_nhwc"]), jnp.asarray(out["t"], jnp.float32),
          jnp.asarray(out["y"], jnp.int32))
  np.testing.assert_allclose(np.asarray(apply(run.variables(ema=True), *args)),
                             nhwc(out["out_ema_f64"]), rtol=0, atol=ATOL)
  raw = "out_model_f64" if file.endswith(".train.pt") else "out_ema_f64"
  np.testing.assert_allclose(np.asarray(apply(run.variables(ema=False), *args)),
                             nhwc(out[raw]), rtol=0, atol=ATOL)
  with pytest.raises(FileExistsError, match="overwrite"):
    reference.import_any("dit", fixture_path(file), workdir, config=fixture_config())


@pytest.mark.parametrize("field,value,key", [
    ("depth", 3, "blocks.2.attn.qkv.weight"),
    ("hidden_size", 32, "pos_embed"),
])
def test_import_of_another_size_names_key_shapes_and_fields(tmp_path, field, value, key):
  config = fixture_config()
  config.model[field] = value
  if field == "hidden_size":
    config.model.num_heads = 2
  with pytest.raises(ValueError) as info:
    reference.import_any("dit", fixture_path("dit_tiny_p2.pt"), str(tmp_path), config=config)
  message = str(info.value)
  assert repr(key) in message and "dit_tiny_p2.pt" in message, message
  for fits in ("--config.model.hidden_size=64", "--config.model.depth=2",
               "--config.data.image_size=8", "--config.data.num_channels=4",
               "--config.model.num_classes=10", "model.num_heads"):
    assert fits in message, message
  assert not (tmp_path / "checkpoints").exists()


def test_import_needs_a_dit_config(tmp_path):
  with pytest.raises(ValueError, match="--format=dit needs a DiT config"):
    reference.import_any("dit", fixture_path("dit_tiny_p2.pt"), str(tmp_path),
                         config=default.get_config())
  with pytest.raises(ValueError, match=r"Unknown --format 'pytorch'.*'dit'"):
    reference.import_any("pytorch", fixture_path("dit_tiny_p2.pt"), str(tmp_path),
                         config=fixture_config())


# --- bad DiT configs, refused by the config edge before anything compiles --------------------


@pytest.mark.parametrize("changes,match", [
    (dict(attn_resolutions=(8,)), r"'dit' does not read the U-Net-only field\(s\) "
                                  r"attn_resolutions=\(8,\).*attn_resolutions=\(16,\)"),
    (dict(nf=64, ch_mult=(1, 2)), r"U-Net-only field\(s\) nf=64, ch_mult=\(1, 2\)"),
    (dict(dropout=0.0), r"U-Net-only field\(s\) dropout=0.0"),
    (dict(patch_size=3), r"patch_size 3 does not divide the image size 8x8"),
    (dict(num_heads=3), r"hidden_size 32 is not divisible by num_heads 3"),
    (dict(dit_size="S/2", hidden_size=64), r"dit_size='S/2' fixes .* hidden_size=64, depth=1, "
                                             r"num_heads=2 is set too"),
])
def test_bad_dit_config(changes, match):
  config = dit_config(patch_size=2, hidden_size=32, depth=1, num_heads=2)
  config.data.image_size = 8
  config.model.update(changes)
  with pytest.raises(ValueError, match=match):
    experiment.check_config(config)
  assert main.execute(config, "unused", "describe") == main.EXIT_BAD_INPUT


@pytest.mark.parametrize("changes,match", [
    (dict(patch_size=4), r"'ncsnpp' does not read the DiT-only field\(s\) patch_size=4"),
    (dict(learn_sigma=True, dit_size="XL/2"), r"DiT-only field\(s\) dit_size='XL/2', "
                                              r"learn_sigma=True"),
])
def test_unet_config_with_dit_fields(changes, match):
  config = default.get_config()
  config.model.update(changes)
  with pytest.raises(ValueError, match=match):
    experiment.check_config(config)


def test_exactly_one_label_dropout():
  """A conditional DiT drops labels itself (model.class_dropout_prob, the reference's); the
  train step's training.label_dropout must then be 0, and without the DiT's null row there
  is nothing to drop to. Either dropout alone is accepted."""
  config = dit_config(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
  config.data.image_size = 8
  experiment.check_config(config)  # class_dropout_prob 0.1, label_dropout 0
  config.training.label_dropout = 0.1
  with pytest.raises(ValueError, match=r"class_dropout_prob=0.1 .* and "
                                       r"config.training.label_dropout=0.1 would both"):
    experiment.check_config(config)
  config.model.class_dropout_prob = 0.0
  with pytest.raises(ValueError, match="no null class row"):
    experiment.check_config(config)
  config.training.label_dropout = 0.0
  experiment.check_config(config)
  config = imagenet256_dit.get_config("S/2")
  assert (config.model.class_dropout_prob, config.training.label_dropout) == (0.1, 0.0)
