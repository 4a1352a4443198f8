"""Rectified flow on Fashion-MNIST: the demo's CPU-sized DDPM++ (configs/fashion_mnist_vp.py)
with the process, the network output and the loss of flow matching.

x_t = (1 - t) x_0 + t eps (`training.sde = 'rectified_flow'`), the network predicts the
velocity dx_t/dt = eps - x_0 (`model.parameterization = 'velocity'`), trained with the
conditional flow-matching loss (`training.weighting = 'flow_matching'`) at logit-normal times
(`training.time_sampling = 'logit_normal'`, Stable Diffusion 3's choice; t = sigmoid(n),
n ~ N(p_mean, p_std^2) with p_mean = 0, p_std = 1). Samplers start at `sde.t_max` = 1 - 1e-3.
Everything else (network, batch, EMA, optimizer, snapshot sampler) is the VP demo's.
"""

from __future__ import annotations

import ml_collections

from configs import default, fashion_mnist_vp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist_vp.get_config()
  default.use_rectified_flow(config)
  return default.apply_variant(config, arg)
