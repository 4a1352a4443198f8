"""Mixed precision (`training / eval / sampling.precision`): float32 parameters, bfloat16
convolutions and matmuls, float32 normalization statistics, softmax, output and loss.

Every comparison is bfloat16 against float32 on the same variables, keys and data. The bounds
are the constants below, with what they measured on CPU: bfloat16 keeps 8 significant bits
(relative rounding 2^-8 ~ 4e-3 per operation), so a few-layer network lands at a relative
error of about 1e-2.
"""

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.run import experiment, networks, programs
from score_sde import models, sampling
from score_sde.models import layers
from test_train import tiny_config

# Relative L2 error of a bfloat16 forward pass against float32 (same variables).
FORWARD_REL_L2 = 3e-2  # measured 1.1e-2 to 1.7e-2 on CPU for the three networks
# One train step's gradients, bfloat16 against float32: cosine similarity and the relative
# difference of their norms.
GRAD_COSINE = 0.99  # measured 0.9996
GRAD_NORM_REL = 5e-2  # measured 1e-4
# Training the tiny config on a fixed batch: the bfloat16 run's final evaluation loss may
# differ from the float32 run's by this fraction of the float32 run's loss decrease.
TRAIN_LOSS_MARGIN = 0.1  # measured 3e-6 / 0.29 ~ 1e-5
# DDIM sampling (4 steps) from the same noise and key: relative L2 error of the samples.
SAMPLE_REL_L2 = 3e-2  # measured 7.2e-3


def network_config(name, **model_overrides):
  """A tiny 8x8 version of experiment `name` (its architecture options kept)."""
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  config.data.image_size = 8
  config.model.update(**{"nf": 8, "ch_mult": (1, 2), "attn_resolutions": (4,),
                         **model_overrides})
  return config


# DDPM++ (BigGAN blocks, positional embedding), NCSN++ (FIR, Fourier features, pyramids,
# scale_by_sigma) and DDPM (DDPM blocks, conv resampling).
NETWORKS = {"ddpmpp": "cifar10_vp", "ncsnpp": "cifar10_ve", "ddpm": "cifar10_ddpm"}


def init_jitted(key, config, model):
  """`networks.init_model` as one compiled program (op by op it dispatches hundreds of small
  ones: about twice the time for these networks)."""
  return jax.jit(lambda k: networks.init_model(k, config, model))(key)


@functools.lru_cache(maxsize=None)  # the two tests of each network share its variables
def network_and_inputs(name):
  """`(model, variables, x, labels)`. init_scale=1 so every residual branch contributes (the
  default 0 makes the last convolution of each branch, and the output, nearly zero)."""
  config = network_config(NETWORKS[name])
  model = networks.get_model(config).clone(init_scale=1.0)
  variables = init_jitted(jax.random.key(0), config, model)
  x = jax.random.normal(jax.random.key(1), (2, *networks.image_shape(config)))
  t = jnp.array([0.3, 0.8])
  labels = experiment.make_score_model(config, None).noise_labels(t)
  return model, variables, x, labels


def _eqn_dtypes(jaxpr):
  """`(primitive name, input dtypes)` of every equation, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name, [v.aval.dtype for v in eqn.invars if hasattr(v.aval, "dtype")]
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _eqn_dtypes(sub)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_float32_is_unchanged_and_bfloat16_shares_the_variables(name):
  model, variables, x, labels = network_and_inputs(name)
  assert model.dtype == jnp.float32
  assert models.with_precision(model, "float32") is model
  bf16 = models.with_precision(model, "bfloat16")
  assert bf16.dtype == jnp.bfloat16
  # One checkpoint for every precision: the same tree of the same float32 arrays.
  config = network_config(NETWORKS[name])
  bf16_variables = init_jitted(jax.random.key(0), config, bf16)
  assert (jax.tree_util.tree_structure(bf16_variables)
          == jax.tree_util.tree_structure(variables))
  for a, b in zip(jax.tree_util.tree_leaves(bf16_variables), jax.tree_util.tree_leaves(variables)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  # The float32 network computes in float32 only: no cast to a lower precision anywhere.
  # (Bitwise equality with the network before the dtype field was checked once against
  # main's code; see docs/precision.md.)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, labels))(variables).jaxpr
  floats = {str(d) for _, dts in _eqn_dtypes(jaxpr) for d in dts
            if jnp.issubdtype(d, jnp.floating)}
  assert floats == {"float32"}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_bfloat16_forward_matches_float32(name):
  model, variables, x, labels = network_and_inputs(name)
  bf16 = models.with_precision(model, "bfloat16")
  want = jax.jit(model.apply)(variables, x, labels)
  got = jax.jit(bf16.apply)(variables, x, labels)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  err = rel_l2(got, want)
  assert err < FORWARD_REL_L2, err
  assert err > 0  # it did compute in bfloat16
  # Every convolution and matmul takes bfloat16 operands.
  jaxpr = jax.make_jaxpr(lambda v: bf16.apply(v, x, labels))(variables).jaxpr
  products = [dts for prim, dts in _eqn_dtypes(jaxpr)
              if prim in ("conv_general_dilated", "dot_general")]
  assert products and all(d == jnp.bfloat16 for dts in products for d in dts)


class GroupNorm(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.group_norm(x, None, self.dtype)


def test_group_norm_statistics_are_float32():
  # A large mean: bfloat16 statistics would be off by up to ~0.25 (its spacing at 100 is
  # 0.5), which after dividing by a std of 1 is an error of that size in every output.
  x = (100.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 8))).astype(jnp.bfloat16)
  variables = GroupNorm().init(jax.random.key(1), x)
  got = GroupNorm(dtype=jnp.bfloat16).apply(variables, x)
  want = GroupNorm().apply(variables, x.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  # Only the rounding of the output (|values| < 4, bfloat16 spacing <= 2^-6 there).
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -6)


def ddpmpp_spec_and_variables():
  """The tiny DDPM++ VP experiment's `RunSpec` with an init_scale=1 network, and its
  variables. One resolution (its middle block: residual blocks and attention): the
  gradient and the sampler compile the network twice each (float32, bfloat16), and every
  layer kind's bfloat16 forward pass is compared above on two resolutions."""
  config = network_config(NETWORKS["ddpmpp"], ch_mult=(1,), attn_resolutions=())
  spec = experiment.run_spec(config)
  spec = dataclasses.replace(
      spec, score_model=spec.score_model.with_network(spec.model.clone(init_scale=1.0)))
  return config, spec, init_jitted(jax.random.key(0), config, spec.model)


def smooth_images(n, size=8, channels=1):
  """`[n, size, size, channels]` images in [0, 1]: a blob moving along the diagonal."""
  grid = np.arange(size, dtype=np.float32)
  centers = 1.5 + (size - 3) * np.arange(n, dtype=np.float32)[:, None] / max(n - 1, 1)
  blob = np.exp(-((grid[None, :, None] - centers[:, :, None]) ** 2
                  + (grid[None, None, :] - centers[:, :, None]) ** 2) / 4.0)
  return np.repeat(blob[..., None], channels, axis=-1).astype(np.float32)


def test_one_step_gradients_match_float32():
  config, spec, variables = ddpmpp_spec_and_variables()
  x0 = spec.scaler(smooth_images(8, channels=config.data.num_channels))

  def gradients(precision):
    score_model = spec.score_model.with_network(models.with_precision(spec.model, precision))

    def objective(params):
      def param_score_fn(params, x, t):
        return score_model.score_fn({**variables, "params": params})(x, t)
      return spec.loss_fn(jax.random.key(4), param_score_fn, params, x0)[0]

    return jax.jit(jax.grad(objective))(variables["params"])

  g32, g16 = gradients("float32"), gradients("bfloat16")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(g16))
  a = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g32)]).astype(np.float64)
  b = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g16)]).astype(np.float64)
  cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  norm_rel = abs(np.linalg.norm(b) - np.linalg.norm(a)) / np.linalg.norm(a)
  assert cosine > GRAD_COSINE, cosine
  assert norm_rel < GRAD_NORM_REL, norm_rel


def test_bfloat16_sampling_matches_float32():
  # The sampler's unclipped output in model scale: this random init_scale=1 network drives
  # almost every pixel of the clipped [0, 1] images to 0 or 1, which would hide differences.
  config, spec32, variables = ddpmpp_spec_and_variables()
  spec16 = dataclasses.replace(spec32, sample_precision="bfloat16")
  shape = (2, *networks.image_shape(config))

  def sample(spec):
    score_fn = spec.score_model_for("sample").score_fn(variables)
    return jax.jit(lambda key: sampling.sample(key, score_fn, spec.sde, shape, "ddim",
                                               steps=4)[0])(jax.random.key(5))

  want, got = sample(spec32), sample(spec16)
  assert got.dtype == jnp.float32 and got.shape == shape
  err = rel_l2(got, want)
  assert 0 < err < SAMPLE_REL_L2, err


@pytest.mark.parametrize("section", ["training", "eval", "sampling"])
def test_unknown_precision_is_a_clear_error(section):
  config = tiny_config(**{f"{section}.precision": "float16"})
  with pytest.raises(ValueError) as e:
    experiment.check_config(config)
  assert (f"Unknown config.{section}.precision 'float16'; valid: ['bfloat16', 'float32']"
          in str(e.value))
  with pytest.raises(ValueError, match="Unknown precision 'fp8'; valid: "):
    models.with_precision(networks.get_model(config), "fp8")


# ----------------------------------------------------------------------------------------
# Training at a precision: the tiny Fashion-MNIST experiment of test_train (8x8 images), on
# one fixed batch, float32 and bfloat16 from the same initial state with the same keys.

TRAIN_STEPS = 12


def precision_config(precision):
  config = tiny_config(**{"optim.warmup": 0, "optim.lr": 5e-3, "training.precision": precision,
                          "eval.precision": precision, "sampling.precision": precision})
  experiment.check_config(config)
  return config


@pytest.mark.slow
def test_bfloat16_trains_like_float32_and_keeps_a_float32_state():
  images = smooth_images(4)
  batch = {"image": images[None], "label": np.zeros((1, len(images)), np.int32)}
  eval_batch = {"image": np.tile(images, (16, 1, 1, 1)), "label": np.zeros(64, np.int32)}
  states, eval_fn = {}, None
  for precision in ("float32", "bfloat16"):
    config = precision_config(precision)
    spec = experiment.run_spec(config)
    assert (spec.train_precision, spec.eval_precision, spec.sample_precision) == (
        precision,) * 3
    step_fn = programs.make_train_step(spec)
    state = jax.jit(lambda k: programs.init_state(k, spec))(
        jax.random.key(0))
    if eval_fn is None:  # one float32 judge of both runs: fixed key, 64 examples
      eval_fn = programs.make_eval_loss_fn(spec)
      start = float(np.divide(*eval_fn(state.variables(ema=False), jax.random.key(3),
                                       eval_batch)))
    for _ in range(TRAIN_STEPS):
      state, _ = step_fn(state, jax.random.key(1), batch)
    states[precision] = jax.device_get(state)
  state32, state16 = states["float32"], states["bfloat16"]
  # Master parameters, optimizer state and EMA stay float32: the same tree and dtypes.
  assert jax.tree_util.tree_structure(state16) == jax.tree_util.tree_structure(state32)
  for a, b in zip(jax.tree_util.tree_leaves(state16), jax.tree_util.tree_leaves(state32)):
    assert a.dtype == b.dtype
  for tree in (state16.params, state16.opt_state, state16.ema_params):
    floats = [a.dtype for a in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(d == jnp.float32 for d in floats)
  end32, end16 = (float(np.divide(*eval_fn(s.variables(ema=False), jax.random.key(3),
                                           eval_batch))) for s in (state32, state16))
  assert end32 < 0.8 * start  # the training did something
  assert abs(end16 - end32) < TRAIN_LOSS_MARGIN * (start - end32), (start, end32, end16)
