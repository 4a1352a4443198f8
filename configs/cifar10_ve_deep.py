"""NCSN++ deep (continuous) on CIFAR-10 with the VE SDE: reference
`ve/cifar10_ncsnpp_deep_continuous` (= cifar10_ve with 8 blocks per resolution)."""

from __future__ import annotations

import ml_collections

from configs import cifar10_ve, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_ve.get_config()
  config.training.n_iters = 950_001
  config.model.num_res_blocks = 8
  return default.apply_variant(config, arg)
