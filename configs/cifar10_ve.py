"""NCSN++ (continuous) on CIFAR-10 with the VE SDE: reference `ve/cifar10_ncsnpp_continuous`.

FIR resampling, a residual input pyramid, Fourier features of log sigma, output divided by
sigma; data in [0, 1]; predictor-corrector sampling (reverse diffusion + Langevin).
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.training.sde = "vesde"
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  config.sampling.eps = 1e-5
  config.model.scale_by_sigma = True
  config.model.ema_rate = 0.999
  config.model.fir = True
  config.model.progressive_input = "residual"
  return default.apply_variant(config, arg)
