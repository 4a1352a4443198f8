"""A noise-conditional image classifier for classifier guidance: p_t(y | x_t).

A small ResNet (BigGAN-style residual blocks from `layers`, average-pool downsampling) with
the noise level embedded into every block, global average pooling and a linear head. The
noise level is the SDE's half log-SNR lambda(t) = log(alpha / sigma), which means the same
thing for VP, sub-VP and VE SDEs, embedded sinusoidally like DDPM's time steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers

# lambda(t) is scaled by this before the sinusoidal embedding: |lambda| <= ~12 for the SDEs
# here, so the embedding sees "time steps" in about [-600, 600], DDPM's range.
LOG_SNR_SCALE = 50.0


class NoiseConditionalClassifier(nn.Module):
  """`__call__(x [B, H, W, C], log_snr [B]) -> logits [B, num_classes]`.

  Attributes:
    num_classes: number of classes (>= 2).
    nf: base channel count.
    ch_mult: channel multiplier per resolution (the image is halved between them).
    num_res_blocks: residual blocks per resolution.
    dropout: dropout rate (train=True only).
    centered: inputs in [-1, 1]; otherwise in [0, 1] and mapped to [-1, 1].
  """

  num_classes: int
  nf: int = 32
  ch_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 1
  dropout: float = 0.0
  centered: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, log_snr: jax.Array, train: bool = False) -> jax.Array:
    """Args:
      x: `[B, H, W, C]` noisy images at the SDE's scale.
      log_snr: `[B]` half log-SNR lambda(t) of the noise level of x.
      train: enables dropout (pass `rngs={'dropout': key}`).

    Returns:
      `[B, num_classes]` logits of p_t(y | x).
    """
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    nf = self.nf
    temb = layers.timestep_embedding(log_snr * LOG_SNR_SCALE, nf)
    temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
    temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(nn.swish(temb))
    h = x if self.centered else 2.0 * x - 1.0
    h = layers.conv3x3(h, nf)
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = layers.ResnetBlock(out_ch=nf * mult, kind="biggan", dropout=self.dropout,
                               skip_rescale=True, init_scale=0.0)(h, temb, train)
      if level != len(self.ch_mult) - 1:
        h = layers.ResnetBlock(kind="biggan", resample="down", dropout=self.dropout,
                               skip_rescale=True, init_scale=0.0)(h, temb, train)
    h = nn.swish(layers.group_norm(h))
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=layers.default_init())(h)
