"""Building blocks shared by the score networks (NCSN++ / DDPM++ and the DDPM U-Net).

Each block exists once, with options, and takes plain typed fields (no configs):

- initializers and the 3x3 / 1x1 convolutions of DDPM (`default_init`, `conv3x3`, `conv1x1`);
- noise-level embeddings: `timestep_embedding` (sinusoidal, DDPM) and
  `GaussianFourierProjection` (frozen random Fourier features, NCSN++);
- StyleGAN2 finite-impulse-response (FIR) resampling: `upfirdn2d` and the plain / fused-conv
  up- and down-samplers built on it;
- modules: `Upsample`, `Downsample`, `ResnetBlock` (DDPM or BigGAN style), `AttnBlock`,
  `Combine`.

Images are NHWC float arrays `[B, H, W, C]`; a noise-level embedding is `[B, E]`.

Mixed precision: every convolution, dense layer and module takes a compute `dtype` (default
float32). Parameters stay float32 (Flax's `param_dtype`) and are cast to `dtype` where they are
used; GroupNorm statistics and the attention softmax are float32 whatever `dtype` is.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from score_sde.checks import check_choice

RESBLOCK_TYPES = ("ddpm", "biggan")
RESAMPLE_MODES = ("none", "up", "down")
COMBINE_METHODS = ("sum", "cat")

# The collection holding fixed, untrained arrays that are part of a model (the random Fourier
# features). It travels with the variables (checkpoints, device replication) but is not
# under `params`, so an optimizer never sees it.
CONSTANTS = "constants"


# --- initializers and convolutions ---------------------------------------------------------


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's initializer: variance scaling, fan_avg, uniform. `scale=0` means 1e-10 (a
  near-zero but non-degenerate init for residual branches).

  For a kernel `[*receptive, C_in, C_out]`: U(-l, l) with l = sqrt(3 scale / fan_avg),
  fan_avg = prod(receptive) (C_in + C_out) / 2, as `nn.initializers.variance_scaling`. The
  values are drawn as a flat vector and reshaped: same distribution, but XLA:CPU compiles
  (partitionable) threefry for 4-D shapes very slowly (measured ~8 s per conv shape vs
  ~0.5 s flat, jax 0.10), which made initializing a network take minutes.
  """
  scale = 1e-10 if scale == 0 else scale

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    receptive = math.prod(shape[:-2])
    fan_avg = receptive * (shape[-2] + shape[-1]) / 2.0
    limit = math.sqrt(3.0 * scale / fan_avg)
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -limit, limit)
    return flat.reshape(shape)

  return init


def embedding_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """N(0, 1) entries for an embedding table (drawn flat, see `default_init`)."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def conv3x3(x: jax.Array, features: int, *, stride: int = 1, init_scale: float = 1.0,
            use_bias: bool = True, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """3x3 convolution with 'SAME' padding and DDPM initialization (zero bias), computed in
  `dtype` (float32 parameters cast to it; the output is `dtype`).

  Must be called inside a compact Flax module (it creates an `nn.Conv` there).
  """
  return nn.Conv(features, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
                 use_bias=use_bias, kernel_init=default_init(init_scale),
                 bias_init=nn.initializers.zeros, dtype=dtype)(x)


def conv1x1(x: jax.Array, features: int, *, init_scale: float = 1.0,
            dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """1x1 convolution (a dense layer on the channel axis) with DDPM initialization, computed
  in `dtype`.

  A 1x1 kernel `[C_in, C_out]` has the same fan_in / fan_out as DDPM's `NIN` and 1x1 conv, so
  this is both. Must be called inside a compact Flax module.

  The pixels are flattened into one matrix dimension first: the same parameters and
  result, but XLA:CPU runs the backward pass of a 2-D matmul 1.6-1.8x faster than that of
  the 4-D `dot_general` (it transposes the 4-D operands; see docs/benchmarks.md).
  """
  y = nn.Dense(features, kernel_init=default_init(init_scale),
               bias_init=nn.initializers.zeros, dtype=dtype)(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], features)


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He 2018) over the channels of `x` `[B, ..., C]`: per example and group
  of C / num_groups consecutive channels, subtract the mean and divide by
  sqrt(variance + epsilon) over the group's channels and all positions; then a learned
  per-channel `scale` and `bias`.

  The same parameters (`scale` [C] ones, `bias` [C] zeros) and function as flax's
  `nn.GroupNorm` (one-pass variance E[x^2] - E[x]^2, clamped at 0), computed so that XLA:CPU
  runs it fast: per-channel sums of x and x^2 over the positions first, then the groups, and
  the normalization folded with scale and bias into one per-channel affine map `x a + b`
  (GroupNorm + swish: forward 1.9x, forward + backward 1.1x faster than with `nn.GroupNorm`;
  see docs/benchmarks.md). Statistics and normalization are float32 for any input dtype; the
  output is `dtype`.
  """

  num_groups: int
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, channels, groups = x.shape[0], x.shape[-1], self.num_groups
    if channels % groups:
      raise ValueError(f"GroupNorm: {groups} groups do not divide {channels} channels")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x32 = x.astype(jnp.float32)
    flat = x32.reshape(batch, -1, channels)  # [B, N, C]
    count = flat.shape[1] * (channels // groups)
    sums = jnp.sum(flat, axis=1).reshape(batch, groups, -1).sum(-1)
    squares = jnp.sum(flat * flat, axis=1).reshape(batch, groups, -1).sum(-1)
    mean = sums / count
    inv_std = jax.lax.rsqrt(jnp.maximum(squares / count - mean * mean, 0.0) + self.epsilon)
    per_group = channels // groups
    a = jnp.repeat(inv_std, per_group, axis=1) * scale  # [B, C]
    b = bias - jnp.repeat(mean * inv_std, per_group, axis=1) * scale
    shape = (batch,) + (1,) * (x.ndim - 2) + (channels,)
    return (x32 * a.reshape(shape) + b.reshape(shape)).astype(self.dtype)


def group_norm(x: jax.Array, groups: int | None = None, dtype: jnp.dtype = jnp.float32
               ) -> jax.Array:
  """`GroupNorm` over the channels of `x` `[B, ..., C]`, output in `dtype` (statistics and
  normalization in float32).

  Args:
    x: the input.
    groups: None: min(C // 4, 32) groups (at least 1), NCSN++'s rule. An int: that many
      groups, as the reference DDPM's fixed 32; where it does not divide C (channel counts
      the reference DDPM cannot build, in tiny test networks) the NCSN++ rule instead. The
      two agree for C >= 128 (every layer of the CIFAR-10 networks) and differ below.
    dtype: the output dtype.
  """
  channels = x.shape[-1]
  if groups is None or channels % groups:
    groups = max(1, min(channels // 4, 32))
  return GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)(x)


# --- noise-level embeddings -----------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, max_positions: int = 10_000
                       ) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) time steps, as in DDPM / Transformers.

  Args:
    timesteps: `[B]` float or int noise labels.
    dim: embedding size E; an odd E gets one zero column.
    max_positions: the longest period is about `2 pi max_positions`.

  Returns:
    `[B, E]`: `[sin(t w_0), ..., sin(t w_{E/2-1}), cos(t w_0), ...]` with
    `w_i = max_positions^(-i / (E/2 - 1))`.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be [B], got shape {timesteps.shape}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features `[sin(2 pi x W), cos(2 pi x W)]` with frozen `W ~ N(0, scale^2)`.

  `W` (`[embedding_size]`) lives in the `CONSTANTS` collection: drawn from the `params` key
  at init, stored with the model, never trained. Input `[B]`, output `[B, 2 embedding_size]`.
  """

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.variable(
        CONSTANTS, "W",
        lambda: self.scale * jax.random.normal(self.make_rng("params"), (self.embedding_size,)))
    proj = x[:, None] * jax.lax.stop_gradient(w.value)[None, :] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# --- FIR resampling (StyleGAN2) --------------------------------------------------------------


def fir_kernel_2d(kernel: Sequence[float]) -> np.ndarray:
  """A 1-D (separable) or 2-D FIR kernel as a square 2-D array normalized to sum 1."""
  k = np.asarray(kernel, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
  return k / np.sum(k)


def upfirdn2d(x: jax.Array, kernel: np.ndarray, *, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> jax.Array:
  """Upsample, pad, FIR-filter and downsample a batch of images (StyleGAN2's `upfirdn_2d`).

  Per image and channel, with the same factors on both spatial axes:
  1. insert `up - 1` zeros after every pixel (H -> H up);
  2. pad `pad[0]` zeros before and `pad[1]` after (non-negative);
  3. convolve (a true convolution, not a correlation) with `kernel`, keeping only outputs
     whose footprint lies inside the padded image;
  4. keep every `down`-th pixel.

  Args:
    x: `[B, H, W, C]`.
    kernel: 2-D FIR kernel `[k, k]`.
    up, down: integer factors.
    pad: `(before, after)` zero padding, in pixels of the upsampled image.

  Returns:
    `[B, H', W', C]` with `H' = (H up + pad[0] + pad[1] - k) // down + 1`.
  """
  if min(pad) < 0:
    raise ValueError(f"upfirdn2d needs non-negative padding, got {pad}")
  k = np.asarray(kernel, dtype=np.float64)[::-1, ::-1]  # flip: convolution as correlation
  channels = x.shape[-1]
  w = jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, channels)), dtype=x.dtype)
  # lhs_dilation inserts up - 1 zeros *between* pixels; the ones after the last pixel are
  # extra padding at the end.
  padding = [(pad[0], pad[1] + up - 1)] * 2
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(down, down), padding=padding, lhs_dilation=(up, up),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def upsample_2d(x: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2
                ) -> jax.Array:
  """FIR upsampling by `factor`: `[B, H, W, C] -> [B, H factor, W factor, C]`.

  The kernel is normalized so a constant image stays constant.
  """
  k = fir_kernel_2d(kernel) * factor**2
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2
                  ) -> jax.Array:
  """FIR downsampling by `factor`: `[B, H, W, C] -> [B, H / factor, W / factor, C]`."""
  k = fir_kernel_2d(kernel)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: jax.Array, w: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                     factor: int = 2) -> jax.Array:
  """Fused `upsample_2d` + convolution with `w` (StyleGAN2), padding once.

  The image is zero-upsampled, fully correlated with `w` (a transposed strided convolution),
  then FIR-filtered. `x: [B, H, W, C_in]`, `w: [k, k, C_in, C_out]` (odd k) ->
  `[B, H factor, W factor, C_out]`.
  """
  kw = w.shape[0]
  k = fir_kernel_2d(kernel) * factor**2
  p = (k.shape[0] - factor) - (kw - 1)
  y = jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=[(kw - 1, kw - 1)] * 2,
      lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return upfirdn2d(y, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: jax.Array, w: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                       factor: int = 2) -> jax.Array:
  """Fused convolution with `w` + `downsample_2d` (StyleGAN2): FIR-filter, then a strided
  'VALID' convolution. `[B, H, W, C_in] -> [B, H / factor, W / factor, C_out]`."""
  kw = w.shape[0]
  k = fir_kernel_2d(kernel)
  p = (k.shape[0] - factor) + (kw - 1)
  y = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return jax.lax.conv_general_dilated(
      y, w, window_strides=(factor, factor), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling: every pixel repeated factor x factor times."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Average pooling over non-overlapping factor x factor windows (H, W divisible)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FIRConv(nn.Module):
  """3x3 (or k x k) convolution fused with FIR up- or down-sampling by 2 (StyleGAN2),
  computed in `dtype` (float32 parameters cast to it)."""

  features: int
  up: bool = False
  kernel_size: int = 3
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("kernel", default_init(),
                   (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
    if self.up:
      y = upsample_conv_2d(x, w, self.fir_kernel)
    else:
      y = conv_downsample_2d(x, w, self.fir_kernel)
    return y + b


# --- modules ---------------------------------------------------------------------------------


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: zeroes each entry with probability `rate` (to 1 / 65536), scales the
  rest by 1 / P(keep), so the expectation is exactly `x`.

  Each 32 random bits give two entries' 16-bit uniforms: half the random-number work of a
  `jax.random.bernoulli` mask, which on a CPU is a large part of a training step (threefry;
  dropout was 9% of the CPU step of the small DDPM++ benchmark network, measured). The mask
  is drawn flat and reshaped (see `default_init`: much faster to compile on CPU than a 4-D
  draw).
  """
  n = x.size
  bits = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  uniform16 = jnp.concatenate([bits & 0xFFFF, bits >> 16])[:n].reshape(x.shape)
  threshold = round((1.0 - rate) * 65536)  # keep where the 16-bit uniform is below it
  if threshold == 0:
    return jnp.zeros_like(x)
  keep = uniform16 < threshold
  return jnp.where(keep, x * (65536 / threshold), jnp.zeros_like(x))


def residual_sum(x: jax.Array, h: jax.Array, rescale: bool) -> jax.Array:
  """`x + h`, divided by sqrt(2) when `rescale` (NCSN++'s `skip_rescale`)."""
  out = x + h
  # A Python float (weakly typed) keeps `out`'s dtype; a NumPy scalar would promote bfloat16.
  return out / math.sqrt(2.0) if rescale else out


class _Resample(nn.Module):
  """The fields of `Upsample` and `Downsample`.

  Attributes:
    out_ch: output channels of the convolution (default: input channels).
    with_conv: resample with a (fused) 3x3 convolution.
    fir, fir_kernel: FIR filtering (StyleGAN2) and its 1-D kernel, instead of nearest /
      average pooling.
    dtype: compute dtype of the convolution.
  """

  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  dtype: jnp.dtype = jnp.float32


class Upsample(_Resample):
  """Upsampling by 2: nearest-neighbour or FIR, optionally with a 3x3 convolution.

  `[B, H, W, C] -> [B, 2H, 2W, out_ch or C]`.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return upsample_2d(x, self.fir_kernel)
    h = naive_upsample_2d(x)
    return conv3x3(h, out_ch, dtype=self.dtype) if self.with_conv else h


class Downsample(_Resample):
  """Downsampling by 2: average pooling / strided 3x3 conv, or their FIR versions.

  `[B, H, W, C] -> [B, H/2, W/2, out_ch or C]`.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, up=False, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return downsample_2d(x, self.fir_kernel)
    if self.with_conv:
      return conv3x3(x, out_ch, stride=2, dtype=self.dtype)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


class ResnetBlock(nn.Module):
  """The residual block of DDPM, in its DDPM or BigGAN form.

  h = conv(act(GN(x))) + Dense(act(temb)); h = conv(dropout(act(GN(h)))); return skip(x) + h,
  divided by sqrt(2) when `skip_rescale`.

  - `kind='ddpm'`: no resampling; the skip is a 1x1 (or, with `conv_shortcut`, 3x3) conv
    when the channel count changes.
  - `kind='biggan'`: optional `resample='up'|'down'` (nearest / average or FIR) applied to
    both branches after the first activation; the skip is a 1x1 conv whenever the shape
    changes.

  Attributes:
    out_ch: output channels (default: input channels).
    kind: 'ddpm' or 'biggan'.
    resample: 'none', 'up' or 'down' ('biggan' only).
    fir, fir_kernel: FIR resampling and its kernel (BigGAN resampling).
    dropout: dropout rate, active only when `train=True` (needs a 'dropout' rng).
    skip_rescale: divide the sum by sqrt(2).
    init_scale: init scale of the last convolution (0: near-zero residual branch).
    conv_shortcut: 3x3 instead of 1x1 skip projection ('ddpm' only).
    norm_groups: GroupNorm groups (see `group_norm`; None: min(C // 4, 32)).
    dtype: compute dtype of the convolutions and the output (GroupNorm statistics float32).
  """

  out_ch: int | None = None
  kind: str = "ddpm"
  resample: str = "none"
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  conv_shortcut: bool = False
  norm_groups: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
               ) -> jax.Array:
    """`x: [B, H, W, C]`, `temb: [B, E]` or None -> `[B, H', W', out_ch]`."""
    check_choice("resblock type", self.kind, RESBLOCK_TYPES)
    check_choice("resample mode", self.resample, RESAMPLE_MODES)
    if self.kind == "ddpm" and self.resample != "none":
      raise ValueError("Only 'biggan' residual blocks resample; got kind='ddpm', "
                       f"resample={self.resample!r}")
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    dtype = self.dtype
    x = x.astype(dtype)
    h = nn.swish(group_norm(x, self.norm_groups, dtype))
    if self.resample == "up":
      resample = ((lambda v: upsample_2d(v, self.fir_kernel)) if self.fir
                  else naive_upsample_2d)
      h, x = resample(h), resample(x)
    elif self.resample == "down":
      resample = ((lambda v: downsample_2d(v, self.fir_kernel)) if self.fir
                  else naive_downsample_2d)
      h, x = resample(h), resample(x)
    h = conv3x3(h, out_ch, dtype=dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(
          nn.swish(temb))[:, None, None, :]
    h = nn.swish(group_norm(h, self.norm_groups, dtype))
    if train and self.dropout > 0:
      h = dropout(self.make_rng("dropout"), h, self.dropout)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=dtype)
    if self.kind == "ddpm":
      if in_ch != out_ch:
        # DDPM's NIN shortcut is initialized at scale 0.1.
        x = (conv3x3(x, out_ch, dtype=dtype) if self.conv_shortcut
             else conv1x1(x, out_ch, init_scale=0.1, dtype=dtype))
    elif in_ch != out_ch or self.resample != "none":
      x = conv1x1(x, out_ch, dtype=dtype)
    return residual_sum(x, h, self.skip_rescale)


class AttnBlock(nn.Module):
  """Single-head self-attention over all H x W positions, with a residual connection.

  `[B, H, W, C] -> [B, H, W, C]`. The output projection is initialized at `init_scale`
  (0: the block starts as the identity); `skip_rescale` divides the sum by sqrt(2);
  `norm_groups` sets the GroupNorm groups (see `group_norm`). `dtype` is the compute dtype
  of the projections and the two attention products; the logits are accumulated and the
  softmax taken in float32, and the weights cast back to `dtype`.
  """

  skip_rescale: bool = False
  init_scale: float = 0.0
  norm_groups: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    dtype = self.dtype
    x = x.astype(dtype)
    h = group_norm(x, self.norm_groups, dtype)
    q = conv1x1(h, c, init_scale=0.1, dtype=dtype)
    k = conv1x1(h, c, init_scale=0.1, dtype=dtype)
    v = conv1x1(h, c, init_scale=0.1, dtype=dtype)
    # Positions flattened to one axis: [B, N, C] products are 2.6x faster than the same
    # einsums on [B, H, W, C] on XLA:CPU (forward; measured, see docs/benchmarks.md).
    q, k, v = (a.reshape(b, height * width, c) for a in (q, k, v))
    logits = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1)
    h = jnp.einsum("bnm,bmc->bnc", weights.astype(dtype), v).reshape(b, height, width, c)
    h = conv1x1(h, c, init_scale=self.init_scale, dtype=dtype)
    return residual_sum(x, h, self.skip_rescale)


class Combine(nn.Module):
  """Merges a skip input `x` into `y`: a 1x1 conv of x to y's channels, then 'sum' or 'cat'.

  `x: [B, H, W, C_x]`, `y: [B, H, W, C_y]` -> `[B, H, W, C_y]` ('sum') or `2 C_y` ('cat').
  """

  method: str = "cat"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    check_choice("combine method", self.method, COMBINE_METHODS)
    h = conv1x1(x, y.shape[-1], dtype=self.dtype)
    y = y.astype(self.dtype)
    return h + y if self.method == "sum" else jnp.concatenate([h, y], axis=-1)
