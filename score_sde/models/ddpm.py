"""The DDPM U-Net (Ho et al., 2020), as `ddpm.py` in yang-song/score_sde.

Wide-ResNet U-Net: DDPM residual blocks, self-attention at the `attn_resolutions` (16x16 on
CIFAR-10) and in the middle, and a sinusoidal time embedding fed to every residual block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers
from score_sde.models.ncsnpp import discrete_sigmas, label_embedding


class DDPM(nn.Module):
  """DDPM noise-prediction network. `__call__(x [B,H,W,C], labels [B]) -> [B,H,W,C]`.

  `labels` are the SDE's noise labels: the DDPM step index (discrete) or 999 t (continuous).

  Attributes:
    nf: base channel count.
    ch_mult: channel multiplier per resolution.
    num_res_blocks: residual blocks per resolution (down path; one more on the up path).
    attn_resolutions: spatial sizes (H) with self-attention.
    dropout: dropout rate (train=True only).
    resamp_with_conv: 3x3 convolutions in the up/down-samplers.
    conditional: embed the time step into every residual block.
    scale_by_sigma: divide the output by the discrete sigma indexed by `labels` (SMLD use).
    centered: inputs in [-1, 1]; otherwise in [0, 1] and mapped to [-1, 1].
    sigma_min, sigma_max, num_scales: the discrete noise levels for `scale_by_sigma`.
    num_classes: > 0 adds a class embedding (index num_classes = null label).

  Every GroupNorm has 32 groups, as in the reference DDPM (see `layers.group_norm` for
  channel counts that 32 does not divide).
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  scale_by_sigma: bool = False
  centered: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False,
               class_labels: jax.Array | None = None) -> jax.Array:
    """Args:
      x: `[B, H, W, C]` noisy images ([-1, 1] scale if `centered`, else [0, 1]).
      labels: `[B]` time-step labels.
      train: enables dropout (pass `rngs={'dropout': key}`).
      class_labels: `[B]` ints in [0, num_classes] (num_classes = null), or None.

    Returns:
      `[B, H, W, C]`, the predicted noise (or the score with `scale_by_sigma`).
    """
    nf, num_resolutions = self.nf, len(self.ch_mult)
    act = nn.swish

    if self.conditional:
      temb = layers.timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
    else:
      temb = None
    if self.num_classes > 0:
      cemb = label_embedding(class_labels, x.shape[0], self.num_classes, nf * 4)
      temb = cemb if temb is None else temb + cemb

    def resnet(out_ch=None):
      return layers.ResnetBlock(out_ch=out_ch, kind="ddpm", dropout=self.dropout,
                                skip_rescale=False, init_scale=0.0, norm_groups=32)

    def attn():
      return layers.AttnBlock(skip_rescale=False, init_scale=0.0, norm_groups=32)

    h = x if self.centered else 2.0 * x - 1.0  # [0, 1] -> [-1, 1]

    # Down path.
    hs = [layers.conv3x3(h, nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet(nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=self.resamp_with_conv)(hs[-1]))

    # Middle.
    h = hs[-1]
    h = resnet()(h, temb, train)
    h = attn()(h)
    h = resnet()(h, temb, train)

    # Up path.
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet(nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn()(h)
      if i_level != 0:
        h = layers.Upsample(with_conv=self.resamp_with_conv)(h)
    assert not hs

    h = layers.conv3x3(act(layers.group_norm(h, 32)), x.shape[-1], init_scale=0.0)

    if self.scale_by_sigma:
      sigmas = discrete_sigmas(self.sigma_min, self.sigma_max,
                               self.num_scales)[labels.astype(jnp.int32)]
      h = h / sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
