"""DDPM++ (continuous) on CIFAR-10 with the sub-VP SDE: reference
`subvp/cifar10_ddpmpp_continuous` (= cifar10_vp with another SDE)."""

from __future__ import annotations

import ml_collections

from configs import cifar10_vp, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_vp.get_config()
  config.training.sde = "subvpsde"
  return default.apply_variant(config, arg)
