"""DDPM++ (continuous) on CIFAR-10 with the VP SDE: reference `vp/cifar10_ddpmpp_continuous`."""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.training.reduce_mean = True
  config.data.centered = True
  config.model.embedding_type = "positional"
  return default.apply_variant(config, arg)
