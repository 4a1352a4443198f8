"""The demo's Fashion-MNIST run (configs/fashion_mnist_vp.py: VP SDE, v prediction and the v
loss, batch 64, lr 1e-3, EMA 0.995 with warmup, DPM-Solver++ snapshots) with a DiT in place
of the DDPM++ U-Net: one config line (`model.name = 'dit'`) and the transformer's shape.

DiT-S-like: head_dim 64 as DiT-S (2 heads of 64 = hidden 128, a third of DiT-S's 384), 4
blocks, patch 4 (28x28 -> a 7x7 grid of 49 tokens), unconditional, no learned variance:
1,280,272 parameters and 0.085 GFLOPs per forward pass of one image (XLA's count; the demo
U-Net: 317,121 and 0.112; `--mode=describe`), so that it trains in the demo's budget on the
shared 2-core CPU (README, "DiT on Fashion-MNIST").
The U-Net-only fields stay at their defaults (the config edge refuses them otherwise).
"""

from __future__ import annotations

import ml_collections

from configs import default, fashion_mnist_vp

# The fields fashion_mnist_vp.py changes that only the U-Nets read: back to default.py's.
_UNET_FIELDS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                "embedding_type")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist_vp.get_config()
  base = default.get_config().model
  model = config.model
  for name in _UNET_FIELDS:
    model[name] = base[name]
  model.name = "dit"
  model.patch_size = 4
  model.hidden_size = 128
  model.num_heads = 2
  model.depth = 4
  model.mlp_ratio = 4.0
  model.learn_sigma = False
  return default.apply_variant(config, arg)
