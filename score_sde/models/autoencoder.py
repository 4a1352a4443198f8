"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's
first stage), its posterior, and its published weights mapped onto Flax.

The architecture is that of diffusers' `AutoencoderKL` (and of LDM's `AutoencoderKL`, the same
network under other names). With `n = len(block_out_channels)` levels:

    encoder: conv_in 3x3 -> n levels of `layers_per_block` residual blocks, each level but the
             last followed by a stride-2 3x3 conv (zero padding right / bottom only)
             -> mid (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU
             -> conv_out 3x3 to 2 L channels (mean and log-variance)
    quant_conv 1x1 (2L -> 2L); post_quant_conv 1x1 (L -> L)
    decoder: conv_in 3x3 -> mid -> n levels (lowest resolution first) of
             `layers_per_block + 1` residual blocks, each level but the last followed by
             nearest x2 upsampling and a 3x3 conv -> GroupNorm, SiLU -> conv_out 3x3

GroupNorm has `norm_num_groups` groups and eps 1e-6 everywhere; residual blocks have no time
embedding and a 1x1 shortcut where the channel count changes. An image `[B, H, W, C]` with
H, W divisible by 2^(n-1) becomes a latent `[B, H / 2^(n-1), W / 2^(n-1), L]`.

    ae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=4)      # sd-vae-ft-mse
    params = params_from_diffusers(state_dict, ae)                 # or params_from_ldm
    mean, logvar = ae.apply({"params": params}, x, method=ae.encode)   # x in [-1, 1], NHWC
    z = DiagonalGaussian(mean, logvar).sample(key)
    x_hat = ae.apply({"params": params}, z, method=ae.decode)

Latent diffusion works on `(z - shift_factor) * scaling_factor` (SD 1/2: 0.18215, no shift);
`encode` and `decode` do not apply it.

Shared blocks from `layers.py`: `ResnetBlock` (kind 'ddpm', no dropout, 1x1 shortcut),
`AttnBlock` (single head, softmax(q k^T / sqrt(C)), residual), `Upsample` (nearest + 3x3
conv), `Downsample` (stride-2 3x3 conv with 'SAME' padding, which on the even sizes accepted
here pads 0 before and 1 after: LDM's asymmetric padding) and `GroupNorm` (eps 1e-6; one-pass
variance in float32). The fixture test checks them against float64 reference outputs.

Weights: `params_from_diffusers` / `params_from_ldm` map a PyTorch state dict (numpy arrays)
onto this module's params; `infer_config_from_ldm` reads the architecture off an LDM state
dict; `autoencoder_from_config` builds the module from a diffusers `config.json` dict.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers

# The bounds diffusers and LDM clip the posterior log-variance to.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# diffusers' block types this module implements (its defaults; the only ones SD / LDM use).
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACTIVATIONS = ("silu",)

# The top-level parts of an LDM autoencoder state dict; other keys of an LDM checkpoint
# (`loss.*`: LPIPS and the discriminator of phase-1 training) are not part of the network.
LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_PREFIX = "first_stage_model."  # where a full Stable Diffusion / LDM checkpoint keeps it

Params = dict[str, Any]
StateDict = Mapping[str, np.ndarray]


# --- the posterior -----------------------------------------------------------------------------


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))); a frozen pytree.

  Attributes:
    mean: `[B, h, w, L]`.
    logvar: `[B, h, w, L]` log-variance (natural log), as `encode` returns it (clipped).
  """

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    """The posterior mean `[B, h, w, L]` (its mode)."""
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    """A reparameterized draw `mean + std * e`, `e ~ N(0, I)`: `[B, h, w, L]`, differentiable
    in `mean` and `logvar`."""
    noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * noise

  def kl(self) -> jax.Array:
    """KL(q(z | x) || N(0, I)) per example, in nats: `[B]`,
    `0.5 sum (mean^2 + exp(logvar) - 1 - logvar)` over all non-batch dimensions."""
    terms = self.mean ** 2 + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


# --- the network -------------------------------------------------------------------------------


def _conv(features: int, kernel: int, name: str, dtype: jnp.dtype) -> nn.Conv:
  """A named k x k convolution, padding k // 2, float32 parameters cast to `dtype`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 kernel_init=layers.default_init(), bias_init=nn.initializers.zeros,
                 dtype=dtype, name=name)


def _resnet(out_ch: int, groups: int, name: str, dtype: jnp.dtype) -> layers.ResnetBlock:
  return layers.ResnetBlock(out_ch=out_ch, kind="ddpm", dropout=0.0, norm_groups=groups,
                            dtype=dtype, name=name)


class MidBlock(nn.Module):
  """resnet -> (self-attention) -> resnet at the lowest resolution, channels kept."""

  norm_num_groups: int
  attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    channels = h.shape[-1]
    h = _resnet(channels, self.norm_num_groups, "resnet_0", self.dtype)(h)
    if self.attention:
      h = layers.AttnBlock(init_scale=0.0, norm_groups=self.norm_num_groups, dtype=self.dtype,
                           name="attention")(h)
    return _resnet(channels, self.norm_num_groups, "resnet_1", self.dtype)(h)


class Encoder(nn.Module):
  """Image `[B, H, W, in]` -> `[B, H / 2^(n-1), W / 2^(n-1), 2 L]` (before quant_conv)."""

  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype, groups = self.dtype, self.norm_num_groups
    h = _conv(self.block_out_channels[0], 3, "conv_in", dtype)(x.astype(dtype))
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = _resnet(channels, groups, f"down_{i}_resnet_{j}", dtype)(h)
      if i != last:
        h = layers.Downsample(with_conv=True, dtype=dtype, name=f"down_{i}_downsample")(h)
    h = MidBlock(groups, self.mid_block_add_attention, dtype, name="mid")(h)
    h = nn.swish(layers.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="norm_out")(h))
    return _conv(2 * self.latent_channels, 3, "conv_out", dtype)(h)


class Decoder(nn.Module):
  """Latent `[B, h, w, L]` (after post_quant_conv) -> image `[B, h 2^(n-1), w 2^(n-1), out]`."""

  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_channels: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    dtype, groups = self.dtype, self.norm_num_groups
    h = _conv(self.block_out_channels[-1], 3, "conv_in", dtype)(z.astype(dtype))
    h = MidBlock(groups, self.mid_block_add_attention, dtype, name="mid")(h)
    # Level i here is diffusers' `up_blocks.i`: lowest resolution first.
    reversed_channels = tuple(reversed(self.block_out_channels))
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      for j in range(self.layers_per_block + 1):
        h = _resnet(channels, groups, f"up_{i}_resnet_{j}", dtype)(h)
      if i != last:
        h = layers.Upsample(with_conv=True, dtype=dtype, name=f"up_{i}_upsample")(h)
    h = nn.swish(layers.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="norm_out")(h))
    return _conv(self.out_channels, 3, "conv_out", dtype)(h)


class AutoencoderKL(nn.Module):
  """The KL autoencoder of LDM / Stable Diffusion (diffusers' `AutoencoderKL`), NHWC.

  Attributes (diffusers' config names):
    in_channels, out_channels: image channels in and out.
    block_out_channels: channels per level; n levels downsample by 2^(n-1).
    layers_per_block: residual blocks per encoder level (the decoder has one more).
    latent_channels: L, the latent channels.
    norm_num_groups: GroupNorm groups (must divide every entry of `block_out_channels`).
    scaling_factor, shift_factor: the diffusion model sees `(z - shift) * scale`; stored
      here, applied by the caller, not by `encode` / `decode`.
    mid_block_add_attention: self-attention in both mid blocks.
    use_quant_conv, use_post_quant_conv: the 1x1 convolutions around the latent.
    dtype: compute dtype of convolutions and dense layers (float32 or bfloat16); parameters
      are float32, GroupNorm statistics and softmax float32, and the outputs float32.

  Methods for `apply(variables, ..., method=...)`: `encode(x) -> (mean, logvar)`,
  `decode(z) -> x_hat`, `__call__(x, key=None) -> (x_hat, mean, logvar)` (also `init`).
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each axis: 2^(n-1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    check_architecture(self)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, None, self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, None, self.dtype)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior of images `x` `[B, H, W, in_channels]` in [-1, 1].

    Returns:
      `(mean, logvar)`, each `[B, H / f, W / f, L]` float32 (f = `downsample_factor`), the
      log-variance clipped to [-30, 20] as diffusers and LDM do.

    Raises:
      ValueError: x not `[B, H, W, in_channels]`, or H, W not divisible by f.
    """
    f = self.downsample_factor
    if (x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f
        or x.shape[2] % f):
      raise ValueError(
          f"AutoencoderKL.encode takes images [B, H, W, {self.in_channels}] with H and W "
          f"divisible by {f} (2^(levels-1), block_out_channels={tuple(self.block_out_channels)}"
          f"); got shape {tuple(x.shape)}")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents `z` `[B, h, w, L]` -> images `[B, h f, w f, out_channels]` float32 (in [-1, 1]
    up to the decoder's error).

    Raises:
      ValueError: z not `[B, h, w, latent_channels]`.
    """
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode takes latents [B, h, w, {self.latent_channels}]"
                       f"; got shape {tuple(z.shape)}")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction of `x` through a posterior sample (`key` given) or its mean.

    Returns:
      `(x_hat [B, H, W, out_channels], mean, logvar)`.
    """
    mean, logvar = self.encode(x)
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
  """The patch discriminator of LDM's phase-1 training (pix2pix's `NLayerDiscriminator`):
  a 4x4 stride-2 conv + LeakyReLU(0.2), then `n_layers - 1` more stride-2 4x4 convs with
  doubling channels (capped at 8 `nf`), each normalized and LeakyReLU'd, a stride-1 4x4 conv,
  and a stride-1 4x4 conv to one logit per patch.

  Deviation from LDM: GroupNorm (`norm_groups`) instead of BatchNorm, so the discriminator is
  a pure function of its params (no batch statistics across devices).

  `__call__(x [B, H, W, C]) -> logits [B, h, w, 1]`, float32.
  """

  nf: int = 64
  n_layers: int = 3
  norm_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)  # pix2pix's N(0, 0.02) convolution weights
    h = nn.Conv(self.nf, (4, 4), strides=2, padding=((1, 1), (1, 1)), kernel_init=init)(x)
    h = nn.leaky_relu(h, 0.2)
    channels = self.nf
    for i in range(1, self.n_layers + 1):
      channels = self.nf * min(2 ** i, 8)
      stride = 2 if i < self.n_layers else 1
      h = nn.Conv(channels, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                  use_bias=False, kernel_init=init)(h)
      h = nn.leaky_relu(layers.GroupNorm(min(self.norm_groups, channels), epsilon=1e-5)(h),
                        0.2)
    return nn.Conv(1, (4, 4), padding=((1, 1), (1, 1)), kernel_init=init)(h)


def check_architecture(ae: AutoencoderKL) -> None:
  """Raises a ValueError for fields no autoencoder can have (before any tracing)."""
  channels = tuple(ae.block_out_channels)
  if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
    raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints; got "
                     f"{ae.block_out_channels!r}")
  for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
               "norm_num_groups"):
    value = getattr(ae, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int; got {value!r}")
  bad = [c for c in channels if c % ae.norm_num_groups]
  if bad:
    raise ValueError(f"norm_num_groups={ae.norm_num_groups} does not divide the channel "
                     f"counts {bad} of block_out_channels={channels}")


# Fields of diffusers' `AutoencoderKL` config -> the module field they set.
CONFIG_FIELDS = {name: name for name in (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "latent_channels", "norm_num_groups", "scaling_factor", "mid_block_add_attention",
    "use_quant_conv", "use_post_quant_conv")}
# Fields that do not change the network (`sample_size` only sizes diffusers' tiling;
# `force_upcast` is its fp16 policy), besides diffusers' own bookkeeping fields `_*`
# (`_class_name` is checked, `_diffusers_version`, `_use_default_values`, ...).
IGNORED_CONFIG_FIELDS = ("sample_size", "force_upcast")


def autoencoder_from_config(config: Mapping[str, Any], dtype: jnp.dtype = jnp.float32,
                            where: str = "config") -> AutoencoderKL:
  """The module a diffusers `AutoencoderKL` config dict (its `config.json`) describes.

  Args:
    config: the config; missing fields take diffusers' defaults.
    dtype: compute dtype.
    where: how to name the config in errors (its file).

  Returns:
    An `AutoencoderKL`.

  Raises:
    ValueError: a class other than AutoencoderKL, block types or an activation this module
      does not implement, per-channel latent statistics, an unknown field, or an invalid
      architecture.
  """
  config = dict(config)
  class_name = config.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise ValueError(f"{where}: _class_name is {class_name!r}; valid: 'AutoencoderKL'")
  n_levels = len(config.get("block_out_channels", (64,)))
  for field, valid in (("down_block_types", DOWN_BLOCK_TYPES),
                       ("up_block_types", UP_BLOCK_TYPES)):
    types = tuple(config.pop(field, valid * n_levels))
    if len(types) != n_levels or any(t not in valid for t in types):
      raise ValueError(f"{where}: {field}={types!r}; valid: {n_levels} x {valid[0]!r} "
                       f"(one per block_out_channels entry)")
  act_fn = config.pop("act_fn", "silu")
  if act_fn not in ACTIVATIONS:
    raise ValueError(f"{where}: act_fn={act_fn!r}; valid: {ACTIVATIONS}")
  for field in ("latents_mean", "latents_std"):
    if config.pop(field, None) is not None:
      raise ValueError(f"{where}: {field} is set; per-channel latent statistics are not "
                       "supported (valid: null)")
  shift = config.pop("shift_factor", None)
  kwargs: dict[str, Any] = {"shift_factor": 0.0 if shift is None else float(shift)}
  for field, value in config.items():
    if field in IGNORED_CONFIG_FIELDS or field.startswith("_"):
      continue
    if field not in CONFIG_FIELDS:
      raise ValueError(f"{where}: unknown AutoencoderKL field {field!r}; valid: "
                       f"{sorted(CONFIG_FIELDS) + sorted(IGNORED_CONFIG_FIELDS)}")
    kwargs[CONFIG_FIELDS[field]] = tuple(value) if isinstance(value, list) else value
  ae = AutoencoderKL(dtype=dtype, **kwargs)
  check_architecture(ae)
  return ae


def param_shapes(ae: AutoencoderKL) -> Params:
  """The params tree of `ae` as `jax.ShapeDtypeStruct`s (no memory, no compilation)."""
  f = ae.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, ae.in_channels), jnp.float32)
  return jax.eval_shape(lambda k, v: ae.init(k, v), jax.random.key(0), x)["params"]


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 where: str, described: str, noun: str = "key",
                 error: type[Exception] = ValueError) -> None:
  """Raises `error` naming the first (sorted) entry of `found` or `expected` that is missing,
  unexpected or of another shape, with both shapes.

  Args:
    found: `{name: shape}` of the weights read (a state dict, a restored params tree).
    expected: `{name: shape}` the module needs.
    where: the weights' origin, first in the message (their file or checkpoint).
    described: what needs `expected`, e.g. "a diffusers AutoencoderKL(...)".
    noun: what an entry is called in the message ("key", "parameter").
    error: the exception class (a subclass of ValueError).
  """
  for key in sorted(set(found) | set(expected)):
    if key not in found:
      raise error(f"{where}: missing {noun} {key!r} (expected shape {expected[key]}) of "
                  f"{described}")
    if key not in expected:
      raise error(f"{where}: unexpected {noun} {key!r} (shape {found[key]}) for {described}")
    if tuple(found[key]) != tuple(expected[key]):
      raise error(f"{where}: {noun} {key!r} has shape {found[key]}, {described} needs "
                  f"{expected[key]}")


def flat_shapes(params: Params) -> dict[str, tuple[int, ...]]:
  """`{"a/b/kernel": shape}` of a params tree (arrays or `jax.ShapeDtypeStruct`s)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# --- weight layouts ---------------------------------------------------------------------------
#
# Each Flax parameter path is named in a PyTorch layout by a function of the path; the same walk
# over this module's params serves both layouts, so a checkpoint must hold exactly the keys the
# module has, with the shapes its parameters imply.

# Within a residual block / the attention block: Flax submodule -> (diffusers, LDM) name.
_RESNET_NAMES = {"GroupNorm_0": ("norm1", "norm1"), "Conv_0": ("conv1", "conv1"),
                 "GroupNorm_1": ("norm2", "norm2"), "Conv_1": ("conv2", "conv2"),
                 "Dense_0": ("conv_shortcut", "nin_shortcut")}
_ATTENTION_NAMES = {"GroupNorm_0": ("group_norm", "norm"), "Dense_0": ("to_q", "q"),
                    "Dense_1": ("to_k", "k"), "Dense_2": ("to_v", "v"),
                    "Dense_3": ("to_out.0", "proj_out")}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _torch_key(path: tuple[str, ...], n_levels: int, ldm: bool) -> str:
  """The state-dict key of the Flax parameter at `path`, in the diffusers or the LDM layout."""
  layout = int(ldm)
  *modules, leaf = path
  names = []
  for i, name in enumerate(modules):
    parent = modules[i - 1] if i else ""
    if re.fullmatch(r"(down|up)_\d+_resnet_\d+", name):
      kind, level, _, block = name.split("_")
      level = int(level)
      if ldm:
        # LDM's decoder indexes levels by resolution (up.0 is the highest), diffusers'
        # decoder by order of application (up_blocks.0 is the lowest).
        names.append(f"{kind}.{n_levels - 1 - level if kind == 'up' else level}.block.{block}")
      else:
        names.append(f"{kind}_blocks.{level}.resnets.{block}")
    elif re.fullmatch(r"(down|up)_\d+_(down|up)sample", name):
      kind, level, resample = name.split("_")
      level = int(level)
      if ldm:
        names.append(f"{kind}.{n_levels - 1 - level if kind == 'up' else level}.{resample}")
      else:
        names.append(f"{kind}_blocks.{level}.{resample}rs.0")
    elif name == "mid":
      names.append("mid" if ldm else "mid_block")
    elif parent == "mid" and name.startswith("resnet_"):
      block = int(name.split("_")[1])
      names.append(f"block_{block + 1}" if ldm else f"resnets.{block}")
    elif parent == "mid" and name == "attention":
      names.append("attn_1" if ldm else "attentions.0")
    elif "resnet" in parent:
      names.append(_RESNET_NAMES[name][layout])
    elif parent == "attention":
      names.append(_ATTENTION_NAMES[name][layout])
    elif parent.endswith("sample") and name == "Conv_0":
      names.append("conv")
    elif name == "norm_out":
      names.append("norm_out" if ldm else "conv_norm_out")
    else:  # encoder, decoder, conv_in, conv_out, quant_conv, post_quant_conv
      names.append(name)
  return ".".join(names + [_LEAF_NAMES[leaf]])


def _torch_shape(flax_shape: tuple[int, ...], key: str, ldm: bool) -> tuple[int, ...]:
  """The PyTorch shape of a parameter of Flax shape `flax_shape` stored under `key`."""
  if len(flax_shape) == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if len(flax_shape) == 2:  # Dense [I, O]: Linear [O, I] or a 1x1 conv [O, I, 1, 1]
    i, o = flax_shape
    linear = ".attentions.0." in key and not ldm
    return (o, i) if linear else (o, i, 1, 1)
  return tuple(flax_shape)


def _to_flax(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """A PyTorch-layout array -> the Flax layout of `flax_shape`, float32."""
  array = np.asarray(array, dtype=np.float32)
  if len(flax_shape) == 4:
    array = array.transpose(2, 3, 1, 0)
  elif len(flax_shape) == 2:
    array = array.reshape(array.shape[0], array.shape[1]).T
  return np.ascontiguousarray(array)


def torch_layout(ae: AutoencoderKL, ldm: bool = False
                 ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """Every state-dict key `ae`'s weights have in the diffusers (or LDM) layout.

  Returns:
    `{key: (flax_path, flax_shape, torch_shape)}`, keys sorted.
  """
  n_levels = len(ae.block_out_channels)
  entries = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(ae))[0]:
    flax_path = tuple(p.key for p in path)
    key = _torch_key(flax_path, n_levels, ldm)
    entries[key] = (flax_path, tuple(leaf.shape), _torch_shape(tuple(leaf.shape), key, ldm))
  return dict(sorted(entries.items()))


def _convert(state_dict: StateDict, ae: AutoencoderKL, ldm: bool, where: str) -> Params:
  layout = torch_layout(ae, ldm)
  found = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  described = (f"{'an LDM' if ldm else 'a diffusers'} AutoencoderKL(block_out_channels="
               f"{tuple(ae.block_out_channels)}, layers_per_block={ae.layers_per_block}, "
               f"latent_channels={ae.latent_channels}, in_channels={ae.in_channels}, "
               f"out_channels={ae.out_channels})")
  other = ("mid_block." if ldm else ".mid.")
  if any(other in k for k in found):
    described += (f"; these keys look like the {'diffusers' if ldm else 'LDM'} layout: use "
                  f"params_from_{'diffusers' if ldm else 'ldm'}")
  check_shapes(found, {k: v[2] for k, v in layout.items()}, where, described)
  for key in layout:
    dtype = np.asarray(state_dict[key]).dtype
    if dtype.kind != "f" and dtype.name != "bfloat16":
      raise ValueError(f"{where}: key {key!r} has dtype {dtype}; the weights of {described} "
                       f"are floating point")
  params: Params = {}
  for key, (flax_path, flax_shape, _) in layout.items():
    node = params
    for name in flax_path[:-1]:
      node = node.setdefault(name, {})
    node[flax_path[-1]] = _to_flax(state_dict[key], flax_shape)
  return params


# Attention names of diffusers checkpoints saved before diffusers 0.14 (its deprecated
# `AttentionBlock`), which published folders such as sd-vae-ft-mse still hold -> current ones.
_OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                            "proj_attn": "to_out.0"}


def params_from_diffusers(state_dict: StateDict, ae: AutoencoderKL, where: str = "state dict"
                          ) -> Params:
  """Flax params of `ae` from a diffusers `AutoencoderKL` state dict.

  Args:
    state_dict: `{key: array}` in PyTorch layouts (`encoder.down_blocks.0.resnets.0.conv1.
      weight`: `[O, I, kh, kw]`; attention `to_q` etc.: Linear `[O, I]`; the pre-0.14 names
      `query` / `key` / `value` / `proj_attn` are accepted too). Any float dtype.
    ae: the module the weights are for.
    where: how to name the weights in errors (their file).

  Returns:
    The params tree (float32 numpy arrays, Flax layouts) for `ae.apply({"params": ...})`.

  Raises:
    ValueError: naming the first (sorted) key that is missing, unexpected or of another
      shape, with both shapes.
  """
  renamed = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if len(parts) >= 2 and parts[-3:-2] == ["0"] and parts[-2] in _OLD_DIFFUSERS_ATTENTION:
      parts[-2] = _OLD_DIFFUSERS_ATTENTION[parts[-2]]
    renamed[".".join(parts)] = value
  return _convert(renamed, ae, ldm=False, where=where)


def ldm_autoencoder_state(state_dict: StateDict) -> dict[str, np.ndarray]:
  """The autoencoder's entries of an LDM / Stable Diffusion state dict, prefix removed.

  A full checkpoint keeps the autoencoder under `first_stage_model.`: those keys are taken
  and the prefix dropped; otherwise the keys are taken as they are. Only keys under
  `encoder.`, `decoder.`, `quant_conv.` and `post_quant_conv.` are kept (an autoencoder's own
  checkpoint also holds its training loss, `loss.*`: LPIPS and the discriminator).
  """
  if any(k.startswith(LDM_PREFIX) for k in state_dict):
    state_dict = {k[len(LDM_PREFIX):]: v for k, v in state_dict.items()
                  if k.startswith(LDM_PREFIX)}
  return {k: v for k, v in state_dict.items() if k.startswith(LDM_PARTS)}


def params_from_ldm(state_dict: StateDict, ae: AutoencoderKL, where: str = "state dict"
                    ) -> Params:
  """Flax params of `ae` from an LDM / Stable Diffusion autoencoder state dict.

  Args:
    state_dict: `{key: array}` in the LDM layout (`encoder.down.0.block.0.conv1.weight`,
      `decoder.up.{level}` indexed by resolution, mid attention `q` / `k` / `v` / `proj_out`
      as 1x1 convs `[C, C, 1, 1]`), bare or under `first_stage_model.` (other keys of a full
      checkpoint are ignored, see `ldm_autoencoder_state`).
    ae: the module the weights are for (e.g. `autoencoder_from_config(infer_config_from_ldm(
      state_dict))`).
    where: how to name the weights in errors.

  Returns:
    The params tree (float32 numpy arrays, Flax layouts).

  Raises:
    ValueError: naming the first (sorted) key that is missing, unexpected or of another
      shape, with both shapes.
  """
  return _convert(ldm_autoencoder_state(state_dict), ae, ldm=True, where=where)


def _shape_of(state: StateDict, key: str, where: str) -> tuple[int, ...]:
  if key not in state:
    example = f", e.g. {sorted(state)[0]!r}" if state else ""
    raise ValueError(f"{where}: no key {key!r}; an LDM autoencoder state dict has it (found "
                     f"{len(state)} autoencoder keys{example})")
  return tuple(np.shape(state[key]))


def infer_config_from_ldm(state_dict: StateDict, norm_num_groups: int = 32,
                          scaling_factor: float = 0.18215, where: str = "state dict"
                          ) -> dict[str, Any]:
  """The architecture of an LDM / SD autoencoder state dict, read off its keys and shapes.

  Args:
    state_dict: as for `params_from_ldm` (bare or under `first_stage_model.`).
    norm_num_groups: GroupNorm groups; shapes do not show them (LDM always uses 32).
    scaling_factor: latent scale; not in the weights (SD 1 / 2: 0.18215, SDXL: 0.13025; an
      SD YAML's `scale_factor`).
    where: how to name the weights in errors.

  Returns:
    A diffusers-style `AutoencoderKL` config dict for `autoencoder_from_config`: in_channels,
    out_channels, block_out_channels (tuple), layers_per_block, latent_channels,
    norm_num_groups, scaling_factor, mid_block_add_attention, use_quant_conv,
    use_post_quant_conv, down_block_types, up_block_types.

  Raises:
    ValueError: a key the architecture needs is missing, or LDM's `embed_dim` differs from
      its `z_channels` (a network diffusers' layout cannot express).
  """
  state = ldm_autoencoder_state(state_dict)
  out_ch, in_ch, _, _ = _shape_of(state, "encoder.conv_in.weight", where)
  levels = sorted({int(m.group(1)) for k in state
                   if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
  if not levels or levels != list(range(len(levels))):
    raise ValueError(f"{where}: encoder levels {levels} are not 0..n-1 "
                     "(keys 'encoder.down.<level>.block.<j>.*')")
  block_out_channels = tuple(
      _shape_of(state, f"encoder.down.{i}.block.0.conv2.weight", where)[0] for i in levels)
  layers_per_block = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
  z_channels = _shape_of(state, "encoder.conv_out.weight", where)[0] // 2
  use_quant_conv = "quant_conv.weight" in state
  use_post_quant_conv = "post_quant_conv.weight" in state
  if use_post_quant_conv:
    embed_dim = _shape_of(state, "post_quant_conv.weight", where)[1]
    if embed_dim != z_channels:
      raise ValueError(f"{where}: post_quant_conv.weight has shape "
                       f"{_shape_of(state, 'post_quant_conv.weight', where)} but the encoder's "
                       f"z_channels are {z_channels}; embed_dim != z_channels is not supported")
  out_channels = _shape_of(state, "decoder.conv_out.weight", where)[0]
  n = len(levels)
  return {"in_channels": in_ch, "out_channels": out_channels,
          "block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
          "latent_channels": z_channels, "norm_num_groups": norm_num_groups,
          "scaling_factor": scaling_factor,
          "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
          "use_quant_conv": use_quant_conv, "use_post_quant_conv": use_post_quant_conv,
          "down_block_types": DOWN_BLOCK_TYPES * n, "up_block_types": UP_BLOCK_TYPES * n}
