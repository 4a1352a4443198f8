"""Tests of the score networks: reference parameter counts, shapes for every option the
reference configs use, FIR resampling against direct numpy convolutions, and the score
parameterization."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from score_sde import models
from score_sde import sde as sde_lib
from score_sde.models import layers
from score_sde.run import networks

# Published parameter counts of the reference (yang-song/score_sde) CIFAR-10 networks.
REFERENCE_PARAM_COUNTS = {
    "cifar10_ve": 62_758_915,  # NCSN++ cont., including 128 frozen Fourier weights
    "cifar10_ve_deep": 107_587_075,  # NCSN++ deep cont.
    "cifar10_vp": 61_804_419,  # DDPM++ cont.
    "cifar10_vp_deep": 106_632_579,  # DDPM++ deep cont.
    "cifar10_subvp": 61_804_419,  # DDPM++ cont. (sub-VP)
    "cifar10_rf": 61_804_419,  # DDPM++ cont. (the network of cifar10_vp, on rectified flow)
    "cifar10_ddpm": 35_218_947,  # DDPM
}


def load_config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def abstract_variables(config):
  return jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.key(0))


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_COUNTS))
def test_parameter_counts_match_reference(name):
  variables = abstract_variables(load_config(name))
  assert models.count_params(variables) == REFERENCE_PARAM_COUNTS[name]
  # Fourier features (VE configs) are frozen: outside `params`, nf = 128 of them.
  n_constants = models.count_params(variables.get(models.CONSTANTS, {}))
  assert n_constants == (128 if name.startswith("cifar10_ve") else 0)


# --- shapes for every option combination -------------------------------------------------

TINY_OVERRIDES = [
    {},
    {"resblock_type": "ddpm", "fir": True},
    {"resblock_type": "ddpm", "fir": False, "resamp_with_conv": False},
    {"progressive": "output_skip", "progressive_input": "input_skip",
     "progressive_combine": "cat", "fir": True},
    {"progressive": "residual", "progressive_input": "residual", "fir": False},
    {"progressive": "output_skip", "progressive_input": "input_skip",
     "progressive_combine": "sum", "resblock_type": "ddpm"},
    {"embedding_type": "positional", "scale_by_sigma": True},
    {"conditional": False},
    {"num_classes": 10},
]


def _shape_of_forward(model, config, batch=2, **kwargs):
  shape = (batch, *networks.image_shape(config))
  x = jnp.zeros(shape)
  labels = jnp.full((batch,), 3.0)

  def forward(key):
    out, _ = model.init_with_output({"params": key, "dropout": key}, x, labels, train=True,
                                    **kwargs)
    return out

  return shape, jax.eval_shape(forward, jax.random.key(0)).shape


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_COUNTS) + ["fashion_mnist_vp"])
def test_tiny_experiment_output_shape(name):
  config = load_config(name, "tiny")
  shape, out_shape = _shape_of_forward(networks.get_model(config), config)
  assert out_shape == shape


@pytest.mark.parametrize("overrides", TINY_OVERRIDES, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "base")
def test_tiny_option_combinations_output_shape(overrides):
  config = load_config("cifar10_ve", "tiny")
  config.model.update(overrides)
  if overrides.get("num_classes"):
    kwargs = {"class_labels": jnp.array([0, 10])}
  else:
    kwargs = {}
  shape, out_shape = _shape_of_forward(networks.get_model(config), config, **kwargs)
  assert out_shape == shape


def test_get_model_rejects_bad_names():
  config = load_config("cifar10_vp", "tiny")
  config.model.name = "unet9000"
  with pytest.raises(ValueError, match="ncsnpp"):
    networks.get_model(config)
  config = load_config("cifar10_vp", "tiny")
  config.model.progressive = "sideways"
  with pytest.raises(ValueError, match="output_skip"):
    networks.get_model(config)
  config = load_config("cifar10_ve", "tiny")
  config.training.continuous = False
  with pytest.raises(ValueError, match="fourier"):
    networks.get_model(config)


def test_ddpmpp_alias_builds_ncsnpp():
  config = load_config("cifar10_vp", "tiny")
  config.model.name = "ddpmpp"
  assert isinstance(networks.get_model(config), models.NCSNpp)


def test_ddpm_is_the_ncsnpp_skeleton_with_ddpm_options():
  """The DDPM builder reads only the common U-Net fields: NCSN++ options in the config
  (FIR, pyramids, BigGAN blocks, Fourier features) do not change the DDPM network."""
  config = load_config("cifar10_ddpm", "tiny")
  model = networks.get_model(config)
  assert isinstance(model, models.DDPM) and isinstance(model, models.NCSNpp)
  assert (model.resblock_type, model.skip_rescale, model.embedding_type) == (
      "ddpm", False, "positional")
  before = abstract_variables(config)
  config.model.update(fir=True, progressive="output_skip", progressive_input="residual",
                      resblock_type="biggan", skip_rescale=True, embedding_type="fourier")
  after = abstract_variables(config)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  assert jax.tree.map(lambda v: v.shape, after) == jax.tree.map(lambda v: v.shape, before)


# --- FIR resampling against direct convolutions -------------------------------------------


def np_upfirdn(x, k, up, down, pad0, pad1):
  """upfirdn2d by definition on `[B, H, W, C]`: zero-insert, pad, full 2-D convolution
  restricted to the valid part (scipy), keep every `down`-th pixel."""
  b, h, w, c = x.shape
  u = np.zeros((b, h * up, w * up, c), x.dtype)
  u[:, ::up, ::up] = x
  u = np.pad(u, ((0, 0), (pad0, pad1), (pad0, pad1), (0, 0)))
  out = np.stack([np.stack([signal.convolve2d(u[i, :, :, j], k, mode="valid")
                            for j in range(c)], -1) for i in range(b)])
  return out[:, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (3, 1, (1, 2)), (1, 3, (2, 0)), (2, 2, (1, 3))])
def test_upfirdn2d_matches_numpy(up, down, pad):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3))
  k = rng.normal(size=(4, 4))  # asymmetric: catches a flipped kernel
  with jax.enable_x64(True):
    got = np.asarray(layers.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad))
  want = np_upfirdn(x, k, up, down, *pad)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_fir_resampling_matches_numpy_and_box_filter():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 8, 3))
  k = layers.fir_kernel_2d((1, 3, 3, 1))
  with jax.enable_x64(True):
    up = np.asarray(layers.upsample_2d(jnp.asarray(x), (1, 3, 3, 1)))
    down = np.asarray(layers.downsample_2d(jnp.asarray(x), (1, 3, 3, 1)))
    box_up = np.asarray(layers.upsample_2d(jnp.asarray(x), (1, 1)))
    box_down = np.asarray(layers.downsample_2d(jnp.asarray(x), (1, 1)))
  # StyleGAN2 paddings: up by 2 pads (2, 1) with gain 4, down by 2 pads (1, 1).
  np.testing.assert_allclose(up, np_upfirdn(x, 4 * k, 2, 1, 2, 1), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(down, np_upfirdn(x, k, 1, 2, 1, 1), rtol=1e-10, atol=1e-12)
  # A [1, 1] filter is nearest-neighbour upsampling / 2x2 average pooling.
  np.testing.assert_allclose(box_up, x.repeat(2, 1).repeat(2, 2), rtol=1e-12)
  np.testing.assert_allclose(box_down, x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), rtol=1e-12)
  # The [1, 3, 3, 1] filter keeps a constant image constant away from the border.
  with jax.enable_x64(True):
    ones = np.asarray(layers.upsample_2d(jnp.ones((1, 8, 8, 1)), (1, 3, 3, 1)))
  np.testing.assert_allclose(ones[:, 2:-2, 2:-2], 1.0, rtol=1e-12)


def test_fused_fir_convolutions_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 6, 3))
  w = rng.normal(size=(3, 3, 3, 5))
  k = layers.fir_kernel_2d((1, 3, 3, 1))
  with jax.enable_x64(True):
    up = np.asarray(layers.upsample_conv_2d(jnp.asarray(x), jnp.asarray(w), (1, 3, 3, 1)))
    down = np.asarray(layers.conv_downsample_2d(jnp.asarray(x), jnp.asarray(w), (1, 3, 3, 1)))
    # With a delta kernel the fused ops reduce to plain FIR resampling: no shift.
    delta = np.zeros((3, 3, 3, 3))
    delta[1, 1] = np.eye(3)
    up_delta = layers.upsample_conv_2d(jnp.asarray(x), jnp.asarray(delta), (1, 3, 3, 1))
    down_delta = layers.conv_downsample_2d(jnp.asarray(x), jnp.asarray(delta), (1, 3, 3, 1))
    np.testing.assert_allclose(up_delta, layers.upsample_2d(jnp.asarray(x)), atol=1e-12)
    np.testing.assert_allclose(down_delta, layers.downsample_2d(jnp.asarray(x)), atol=1e-12)

  # Up: transposed stride-2 convolution written as a scatter, then the FIR filter.
  b, h, _, _ = x.shape
  t = np.zeros((b, 2 * (h - 1) + 3, 2 * (h - 1) + 3, 5))
  for q in range(h):
    for r in range(h):
      for a in range(3):
        for c in range(3):
          t[:, 2 * q + a, 2 * r + c] += x[:, q, r] @ w[2 - a, 2 - c]
  np.testing.assert_allclose(up, np_upfirdn(t, 4 * k, 1, 1, 1, 1), rtol=1e-9, atol=1e-10)
  assert up.shape == (2, 12, 12, 5)

  # Down: FIR filter with padding 2, then a stride-2 'VALID' correlation with w.
  f = np_upfirdn(x, k, 1, 1, 2, 2)
  want = np.zeros((b, 3, 3, 5))
  for i in range(3):
    for j in range(3):
      want[:, i, j] = np.einsum("bhwc,hwco->bo", f[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
  np.testing.assert_allclose(down, want, rtol=1e-9, atol=1e-10)


# --- behaviour of a small network ---------------------------------------------------------
# Runs eagerly on one shared set of shapes (8x8x1 images, nf=8): XLA:CPU compiles each new
# shape of a random initializer slowly, so the networks here are initialized once per module.

TINY_NET = dict(nf=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), init_scale=1.0)


def tiny_ncsnpp(**kwargs):
  return models.NCSNpp(**{**TINY_NET, **kwargs})


def tiny_inputs(batch=2, size=8):
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
  t = jnp.linspace(0.2, 0.9, batch)
  return x, t


@pytest.fixture(scope="module")
def vp_variables():
  """Variables of `tiny_ncsnpp()` (positional embedding), shared by the tests below."""
  x, t = tiny_inputs()
  return tiny_ncsnpp().init(jax.random.key(0), x, t)


@pytest.fixture(scope="module")
def ve_variables():
  """Variables of `tiny_ncsnpp(embedding_type='fourier')`."""
  x, t = tiny_inputs()
  return tiny_ncsnpp(embedding_type="fourier").init(jax.random.key(0), x, 0.01 + t)


@pytest.mark.parametrize("shape,groups", [((3, 5, 5, 16), 4), ((2, 8, 8, 12), 3), ((4, 6), 2)])
def test_group_norm_matches_float64_and_flax_parameters(shape, groups):
  """`layers.GroupNorm` against a float64 NumPy GroupNorm, with random scale / bias, on
  inputs far from zero mean (the one-pass variance must still be accurate); its parameters
  are flax `nn.GroupNorm`'s (same names, shapes, initial values), so checkpoints carry over."""
  import flax.linen as nn

  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, shape).astype(np.float32)
  module = layers.GroupNorm(num_groups=groups)
  variables = module.init(jax.random.key(0), jnp.asarray(x))
  flax_variables = nn.GroupNorm(num_groups=groups, epsilon=1e-6).init(jax.random.key(0), x)
  assert (jax.tree_util.tree_structure(variables)
          == jax.tree_util.tree_structure(flax_variables))
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, flax_variables)
  scale = rng.normal(1.0, 0.3, shape[-1])
  bias = rng.normal(0.0, 0.3, shape[-1])
  got = module.apply({"params": {"scale": jnp.asarray(scale, jnp.float32),
                                 "bias": jnp.asarray(bias, jnp.float32)}}, jnp.asarray(x))
  xg = x.astype(np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(shape) * scale + bias
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_dropout_rate_and_expectation(rate):
  """The fraction of zeros is `rate` and the mean is kept (inverted dropout), each within
  5 standard errors over 2^20 entries (an odd count, for the last half-used random word)."""
  x = jnp.ones((1, 1023, 1025), jnp.float32)
  y = np.asarray(layers.dropout(jax.random.key(3), x, rate))
  n = y.size
  zeros = np.mean(y == 0)
  assert abs(zeros - rate) <= 5 * np.sqrt(rate * (1 - rate) / n) + 1e-5, zeros
  assert abs(y.mean() - 1.0) <= 5 * np.sqrt(rate / (1 - rate) / n) + 1e-5, y.mean()
  if rate == 0:
    np.testing.assert_array_equal(y, np.asarray(x))


def test_init_and_apply_are_deterministic(vp_variables):
  model = tiny_ncsnpp()
  x, t = tiny_inputs()
  again = model.init(jax.random.key(0), x, t)
  other = model.init(jax.random.key(4), x, t)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), vp_variables, again)
  assert all(jax.tree_util.tree_leaves(same))
  assert not np.allclose(vp_variables["params"]["Conv_0"]["kernel"],
                         other["params"]["Conv_0"]["kernel"])
  np.testing.assert_array_equal(model.apply(vp_variables, x, t), model.apply(again, x, t))


def test_dropout_only_in_training(vp_variables):
  model = tiny_ncsnpp(dropout=0.5)
  x, t = tiny_inputs()
  eval_out = model.apply(vp_variables, x, t, train=False)
  eval_rng = model.apply(vp_variables, x, t, train=False, rngs={"dropout": jax.random.key(9)})
  np.testing.assert_array_equal(eval_out, eval_rng)
  np.testing.assert_array_equal(eval_out, tiny_ncsnpp(dropout=0.0).apply(vp_variables, x, t))
  train_a = model.apply(vp_variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
  train_a2 = model.apply(vp_variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
  train_b = model.apply(vp_variables, x, t, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_out)


def test_fourier_features_are_frozen_constants(ve_variables):
  model = tiny_ncsnpp(embedding_type="fourier")
  x, t = tiny_inputs()
  sigma = 0.01 + t
  w = ve_variables[models.CONSTANTS]["GaussianFourierProjection_0"]["W"]
  assert w.shape == (TINY_NET["nf"],)
  assert "GaussianFourierProjection_0" not in ve_variables["params"]
  # W is used: changing it changes the output ...
  moved = {**ve_variables, models.CONSTANTS: jax.tree.map(lambda a: a + 1.0,
                                                          ve_variables[models.CONSTANTS])}
  assert not np.allclose(model.apply(moved, x, sigma), model.apply(ve_variables, x, sigma))

  # ... but no gradient reaches it.
  def loss(constants):
    return jnp.sum(model.apply({**ve_variables, models.CONSTANTS: constants}, x, sigma) ** 2)

  grads = jax.grad(loss)(ve_variables[models.CONSTANTS])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_uncentered_inputs_are_mapped_to_minus_one_one(vp_variables):
  x, t = tiny_inputs()
  x01 = jax.random.uniform(jax.random.key(5), x.shape)
  np.testing.assert_allclose(tiny_ncsnpp(centered=False).apply(vp_variables, x01, t),
                             tiny_ncsnpp(centered=True).apply(vp_variables, 2 * x01 - 1, t),
                             rtol=1e-5, atol=1e-6)


def test_vp_score_is_minus_output_over_std(vp_variables):
  sde = sde_lib.VPSDE()
  model = tiny_ncsnpp()
  x, t = tiny_inputs()
  score = models.ScoreModel(model, sde).score_fn(vp_variables)(x, t)
  output = model.apply(vp_variables, x, 999.0 * t)
  std = np.sqrt(1.0 - np.exp(-0.5 * t**2 * (20.0 - 0.1) - t * 0.1))[:, None, None, None]
  assert float(jnp.max(jnp.abs(output))) > 1e-2  # a non-trivial output
  np.testing.assert_allclose(score * std, -output, rtol=1e-5, atol=1e-6)


def test_ddpm_discrete_score_uses_discrete_std():
  sde = sde_lib.VPSDE(N=1000)
  model = models.DDPM(nf=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,))
  x, _ = tiny_inputs()
  steps = jnp.array([10, 700])
  t = steps / (sde.N - 1)
  variables = model.init(jax.random.key(0), x, t)
  score = models.ScoreModel(model, sde, continuous=False).score_fn(variables)(x, t)
  output = model.apply(variables, x, steps.astype(jnp.float32))
  alphas_bar = np.cumprod(1.0 - np.linspace(0.1 / 1000, 20.0 / 1000, 1000))
  std = np.sqrt(1.0 - alphas_bar[np.asarray(steps)])[:, None, None, None]
  np.testing.assert_allclose(score * std, -output, rtol=1e-4, atol=1e-12)


def test_ve_scale_by_sigma_divides_output_by_sigma(vp_variables, ve_variables):
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  x, t = tiny_inputs()
  plain = tiny_ncsnpp(embedding_type="fourier", scale_by_sigma=False)
  scaled = tiny_ncsnpp(embedding_type="fourier", scale_by_sigma=True)
  score = models.ScoreModel(scaled, sde).score_fn(ve_variables)(x, t)
  sigma = sde.sigma(t)
  np.testing.assert_allclose(score * sigma[:, None, None, None],
                             plain.apply(ve_variables, x, sigma), rtol=1e-5, atol=1e-7)
  # Discrete labels index the geometric noise levels from the largest (reference order).
  pos_scaled = tiny_ncsnpp(scale_by_sigma=True, sigma_min=0.01, sigma_max=50.0, num_scales=10)
  idx = jnp.array([0.0, 9.0])
  np.testing.assert_allclose(
      pos_scaled.apply(vp_variables, x, idx) * jnp.array([50.0, 0.01])[:, None, None, None],
      tiny_ncsnpp().apply(vp_variables, x, idx), rtol=1e-5)


def test_score_fn_uses_dropout_rng_in_training(vp_variables):
  sde = sde_lib.VPSDE()
  model = tiny_ncsnpp(dropout=0.5)
  x, t = tiny_inputs()
  sm = models.ScoreModel(model, sde)
  a = sm.score_fn(vp_variables, train=True, rng=jax.random.key(1))(x, t)
  b = sm.score_fn(vp_variables, train=True, rng=jax.random.key(2))(x, t)
  c = sm.score_fn(vp_variables, train=False)(x, t)
  d = sm.score_fn(vp_variables, train=False, rng=jax.random.key(1))(x, t)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(c, d)


def test_class_labels_condition_and_null_label_is_default():
  model = tiny_ncsnpp(num_classes=3)
  x, t = tiny_inputs()
  variables = model.init(jax.random.key(0), x, t)
  assert variables["params"]["class_embed"]["embedding"].shape == (4, 4 * TINY_NET["nf"])
  null = model.apply(variables, x, t, class_labels=jnp.array([3, 3]))
  np.testing.assert_array_equal(model.apply(variables, x, t), null)
  cond = model.apply(variables, x, t, class_labels=jnp.array([0, 2]))
  assert not np.allclose(cond, null)
  # Each example sees only its own label.
  mixed = model.apply(variables, x, t, class_labels=jnp.array([0, 3]))
  np.testing.assert_allclose(mixed[0], cond[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed[1], null[1], rtol=1e-5, atol=1e-6)


def test_resnet_block_rejects_resampling_ddpm_block():
  block = layers.ResnetBlock(kind="ddpm", resample="down")
  with pytest.raises(ValueError, match="biggan"):
    block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))
