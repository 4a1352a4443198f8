"""The DDPM U-Net (Ho et al., 2020), as `ddpm.py` in yang-song/score_sde: a preset of NCSN++.

NCSN++ (`ncsnpp.py`) is the one U-Net skeleton of this package. DDPM's network is that
skeleton with DDPM residual blocks (no BigGAN resampling, no sqrt(2) rescaling of residual
sums), (optionally convolutional) nearest / average-pool resampling, a sinusoidal time
embedding, no FIR filters and no input / output pyramids. Built so, it has the reference's
layers in the reference's order, and so the same parameters (35,218,947 on CIFAR-10).
"""

from __future__ import annotations

from score_sde.models.ncsnpp import NCSNpp


class DDPM(NCSNpp):
  """DDPM noise-prediction network. `__call__(x [B,H,W,C], labels [B]) -> [B,H,W,C]`.

  `labels` are the SDE's noise labels: the DDPM step index (discrete) or 999 t (continuous).
  The fields are those of `NCSNpp` with DDPM's defaults; the ones a DDPM config sets are:

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
  """

  num_res_blocks: int = 2
  resblock_type: str = "ddpm"
  skip_rescale: bool = False
  init_scale: float = 0.0
  embedding_type: str = "positional"
  fir: bool = False
  progressive: str = "none"
  progressive_input: str = "none"
  norm_groups: int | None = 32  # the reference DDPM's fixed 32 groups (see layers.group_norm)
