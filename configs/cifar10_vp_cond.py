"""Class-conditional DDPM++ (continuous) on CIFAR-10 with the VP SDE (configs/cifar10_vp.py
plus a class embedding), trained with 10% label dropout for classifier-free guidance;
samples with w = 1 by default."""

from __future__ import annotations

import ml_collections

from configs import cifar10_vp, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_vp.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance = "cfg"
  config.sampling.guidance_scale = 1.0
  return default.apply_variant(config, arg)
