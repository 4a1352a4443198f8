"""The demo's Fashion-MNIST DDPM++ (configs/fashion_mnist_vp.py), class-conditional, trained
with label dropout for classifier-free guidance: 10% of the labels become the null label 10,
so one network learns both s(x, t, y) and s(x, t, null) (Ho & Salimans 2022 used 10-20%).
Sampling defaults to classifier-free guidance with w = 1 for class 0; override with
`--config.sampling.guidance_scale=3 --config.sampling.class_label=7`.
"""

from __future__ import annotations

import ml_collections

from configs import default, fashion_mnist_vp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist_vp.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance = "cfg"
  config.sampling.guidance_scale = 1.0
  return default.apply_variant(config, arg)
