"""Rectified flow on CIFAR-10 with the DDPM++ (continuous) network of configs/cifar10_vp.py,
for GPUs: x_t = (1 - t) x_0 + t eps, the network predicts the velocity eps - x_0, the
conditional flow-matching loss at logit-normal times (SD3: t = sigmoid(n), n ~ N(0, 1)).

Sampling: the adaptive probability-flow ODE (Dopri5, rtol = atol = 1e-5; rectified flow's
usual evaluation sampler), from `sde.t_max` = 1 - 1e-3. The dial
(`--config.sampling.method=sde --config.sampling.solver=euler --config.sampling.w=1.0
--config.sampling.steps=100`) and every other sampler apply as they are.
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_vp, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_vp.get_config()
  default.use_rectified_flow(config)
  config.sampling.method = "ode"
  return default.apply_variant(config, arg)
