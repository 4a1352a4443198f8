"""DDPM (Ho et al. 2020) on CIFAR-10: discrete VP chain, L_simple loss, ancestral sampling.
Reference `vp/ddpm/cifar10`."""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.training.continuous = False
  config.training.reduce_mean = True
  config.training.weighting = "ddpm"
  config.sampling.predictor = "ancestral_sampling"
  config.data.centered = True
  config.model.name = "ddpm"
  config.model.embedding_type = "positional"
  config.model.num_res_blocks = 2
  return default.apply_variant(config, arg)
