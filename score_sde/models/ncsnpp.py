"""NCSN++ and DDPM++ (Song et al., ICLR 2021): the package's one U-Net, with the paper's options.

DDPM++ is this network with BigGAN residual blocks, positional (sinusoidal) embeddings and no
FIR / progressive paths; NCSN++ adds FIR resampling, an input-skip/residual pyramid and
Gaussian Fourier features of log sigma; DDPM (`ddpm.py`) is the preset with DDPM residual
blocks and plain resampling. The layer-by-layer structure (and so every parameter) is that of
`ncsnpp.py` (and `ddpm.py`) in yang-song/score_sde.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.checks import check_choice
from score_sde.models import layers

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
EMBEDDING_TYPES = ("fourier", "positional")


def label_embedding(class_labels: jax.Array | None, batch: int, num_classes: int,
                    features: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Class embedding `[B, features]` in `dtype` (call inside a compact module).

  Index `num_classes` is the null label of classifier-free guidance; `class_labels=None`
  means null labels for the whole batch.
  """
  if class_labels is None:
    class_labels = jnp.full((batch,), num_classes, dtype=jnp.int32)
  return nn.Embed(num_classes + 1, features, embedding_init=layers.embedding_init,
                  dtype=dtype, name="class_embed")(class_labels.astype(jnp.int32))


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ score network. `__call__(x [B,H,W,C], labels [B]) -> [B,H,W,C]`.

  `labels` are the SDE's noise labels (`sde.noise_labels`): sigma(t) for continuous VE
  (embedded as Fourier features of log sigma), 999 t or the step index for VP-type SDEs and
  the noise-level index for discrete VE (sinusoidal embedding).

  Attributes:
    nf: base channel count.
    ch_mult: channel multiplier per resolution; len(ch_mult) resolutions.
    num_res_blocks: residual blocks per resolution (down path; one more on the up path).
    attn_resolutions: spatial sizes (H) at which self-attention is applied.
    dropout: dropout rate in residual blocks (train=True only).
    resamp_with_conv: convolutional (vs. plain) resampling between 'ddpm' blocks.
    conditional: embed the noise level into every residual block.
    fir, fir_kernel: StyleGAN2 FIR resampling and its 1-D kernel.
    skip_rescale: divide residual sums by sqrt(2).
    resblock_type: 'ddpm' or 'biggan' (BigGAN blocks do the resampling themselves).
    progressive: output pyramid, 'none' | 'output_skip' | 'residual'.
    progressive_input: input pyramid, 'none' | 'input_skip' | 'residual'.
    progressive_combine: how 'input_skip' merges, 'sum' | 'cat'.
    init_scale: init scale of the last conv of every residual branch and of the output.
    embedding_type: 'fourier' (labels must be sigmas > 0) or 'positional'.
    fourier_scale: std of the frozen Fourier frequencies.
    scale_by_sigma: divide the output by sigma (VE: then the output is the score). With
      'fourier' embeddings the labels are the sigmas; with 'positional' they index the
      `num_scales` geometric noise levels between sigma_max and sigma_min.
    centered: inputs are in [-1, 1]; otherwise they are in [0, 1] and mapped to [-1, 1].
    sigma_min, sigma_max, num_scales: the discrete noise levels (positional scale_by_sigma).
    num_classes: > 0 adds a class embedding (index num_classes = null label) to the noise
      embedding.
    norm_groups: GroupNorm groups of every layer (None: min(C // 4, 32), NCSN++'s rule; the
      reference DDPM uses 32, see `layers.group_norm`).
    dtype: compute dtype of the convolutions and dense layers (float32 or bfloat16). The
      parameters are float32 whatever it is (the variables do not depend on it), the noise
      embeddings, GroupNorm statistics and attention softmax are float32, and the output is
      cast to float32 before `scale_by_sigma`: the network returns float32.
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "none"
  progressive_combine: str = "sum"
  init_scale: float = 0.0
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  scale_by_sigma: bool = False
  centered: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  num_classes: int = 0
  norm_groups: int | None = None
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    check_choice("resblock_type", self.resblock_type, layers.RESBLOCK_TYPES)
    check_choice("progressive", self.progressive, PROGRESSIVE)
    check_choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
    check_choice("progressive_combine", self.progressive_combine,
                         layers.COMBINE_METHODS)
    check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False,
               class_labels: jax.Array | None = None) -> jax.Array:
    """Args:
      x: `[B, H, W, C]` noisy images ([-1, 1] scale if `centered`, else [0, 1]).
      labels: `[B]` noise labels.
      train: enables dropout (pass `rngs={'dropout': key}`).
      class_labels: `[B]` ints in [0, num_classes] (num_classes = null), or None.

    Returns:
      `[B, H, W, C]`: epsilon-like output (VP) or the score (VE with scale_by_sigma).
    """
    nf, num_resolutions = self.nf, len(self.ch_mult)
    act = nn.swish
    dtype = self.dtype

    # Noise-level embedding: the sinusoidal / Fourier features in float32, the dense layers
    # in the compute dtype.
    if self.embedding_type == "fourier":
      temb = layers.GaussianFourierProjection(nf, self.fourier_scale)(
          jnp.log(labels.astype(jnp.float32)))
    else:
      temb = layers.timestep_embedding(labels, nf)
    if self.conditional:
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
    else:
      temb = None
    if self.num_classes > 0:
      cemb = label_embedding(class_labels, x.shape[0], self.num_classes, nf * 4, dtype)
      temb = cemb if temb is None else temb + cemb

    resnet = functools.partial(
        layers.ResnetBlock, kind=self.resblock_type, fir=self.fir, fir_kernel=self.fir_kernel,
        dropout=self.dropout, skip_rescale=self.skip_rescale, init_scale=self.init_scale,
        norm_groups=self.norm_groups, dtype=dtype)
    attn = functools.partial(layers.AttnBlock, skip_rescale=self.skip_rescale,
                             init_scale=self.init_scale, norm_groups=self.norm_groups,
                             dtype=dtype)
    resample = dict(fir=self.fir, fir_kernel=self.fir_kernel, dtype=dtype)

    def output_conv(h, features, init_scale):
      return layers.conv3x3(act(layers.group_norm(h, self.norm_groups, dtype)), features,
                            init_scale=init_scale, dtype=dtype)

    if not self.centered:
      x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1]
    x = x.astype(dtype)
    out_ch = x.shape[-1]

    # Down path.
    input_pyramid = x if self.progressive_input != "none" else None
    hs = [layers.conv3x3(x, nf, dtype=dtype)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        hs.append(h)
      if i_level == num_resolutions - 1:
        continue
      if self.resblock_type == "ddpm":
        h = layers.Downsample(with_conv=self.resamp_with_conv, **resample)(hs[-1])
      else:
        h = resnet(resample="down")(hs[-1], temb, train)
      if self.progressive_input == "input_skip":
        input_pyramid = layers.Downsample(with_conv=False, **resample)(input_pyramid)
        h = layers.Combine(method=self.progressive_combine, dtype=dtype)(input_pyramid, h)
      elif self.progressive_input == "residual":
        input_pyramid = layers.Downsample(out_ch=h.shape[-1], with_conv=True,
                                          **resample)(input_pyramid)
        input_pyramid = layers.residual_sum(input_pyramid, h, self.skip_rescale)
        h = input_pyramid
      hs.append(h)

    # Middle.
    h = hs[-1]
    h = resnet()(h, temb, train)
    h = attn()(h)
    h = resnet()(h, temb, train)

    # Up path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn()(h)

      if self.progressive == "output_skip":
        skip = output_conv(h, out_ch, self.init_scale)
        if pyramid is None:
          pyramid = skip
        else:
          pyramid = layers.Upsample(with_conv=False, **resample)(pyramid) + skip
      elif self.progressive == "residual":
        if pyramid is None:
          pyramid = output_conv(h, h.shape[-1], 1.0)
        else:
          pyramid = layers.Upsample(out_ch=h.shape[-1], with_conv=True, **resample)(pyramid)
          pyramid = layers.residual_sum(pyramid, h, self.skip_rescale)
          h = pyramid

      if i_level != 0:
        if self.resblock_type == "ddpm":
          h = layers.Upsample(with_conv=self.resamp_with_conv, **resample)(h)
        else:
          h = resnet(resample="up")(h, temb, train)
    assert not hs

    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = output_conv(h, out_ch, self.init_scale)
    # The output leaves in float32: the division by sigma, the score conversion and the loss
    # are float32 at any compute dtype.
    h = h.astype(jnp.float32)

    if self.scale_by_sigma:
      if self.embedding_type == "fourier":
        sigmas = labels
      else:
        # The SMLD noise levels of `VESDE`, indexed from the largest as the reference does.
        levels = sde_lib.VESDE(self.sigma_min, self.sigma_max, self.num_scales).discrete_sigmas()
        sigmas = jnp.flip(levels)[labels.astype(jnp.int32)]
      h = h / sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
