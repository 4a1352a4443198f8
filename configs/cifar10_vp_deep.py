"""DDPM++ deep (continuous) on CIFAR-10 with the VP SDE: reference
`vp/cifar10_ddpmpp_deep_continuous` (= cifar10_vp with 8 blocks per resolution)."""

from __future__ import annotations

import ml_collections

from configs import cifar10_vp, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_vp.get_config()
  config.training.n_iters = 950_001
  config.model.num_res_blocks = 8
  return default.apply_variant(config, arg)
