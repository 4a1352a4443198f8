"""The Fashion-MNIST latent demo: a KL autoencoder 28x28x1 -> 7x7x4 (phase 1), then the
VP-SDE U-Net of `fashion_mnist_vp.py` on its latents (phase 2), sized for the shared 2-core
CPU (README, "Latent diffusion").

    python -m score_sde.main --config=configs/fashion_mnist_latent.py \\
        --workdir=runs/fmnist_ae --mode=train_autoencoder
    python -m score_sde.main --config=configs/fashion_mnist_latent.py \\
        --workdir=runs/fmnist_latent --config.data.latent=runs/fmnist_ae --mode=train

Phase 1: block_out_channels (16, 32, 32) is three levels, a downsampling factor of 4
(28 -> 7), 4 latent channels: 196 numbers per image against 784 pixels. L1 reconstruction +
KL 1e-6, no discriminator; lr 5e-4 and EMA 0.99 suit a run of a few thousand steps (the
defaults, LDM's 1e-4 and 0.999, are for long runs). Phase 2: a 7x7 latent cannot be halved
evenly, so the U-Net has one resolution (ch_mult (1,)), nf 32, two residual blocks and
attention at 7x7.
"""

from __future__ import annotations

import ml_collections

from configs import default, fashion_mnist_vp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = fashion_mnist_vp.get_config()

  ae = config.autoencoder
  ae.block_out_channels = (16, 32, 32)
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 8
  ae.mid_block_add_attention = True
  ae.reconstruction = "l1"
  ae.kl_weight = 1e-6
  ae.disc_weight = 0.0
  ae.lr = 5e-4
  ae.ema_rate = 0.99
  ae.batch_size = 64
  ae.n_iters = 2000
  ae.log_freq = 50
  ae.eval_freq = 500
  ae.eval_num_examples = 1000
  ae.snapshot_freq = 250

  # data.latent stays unset: phase 2 names phase 1's workdir (--config.data.latent=...)

  model = config.model
  model.nf = 32
  model.ch_mult = (1,)
  model.num_res_blocks = 2
  model.attn_resolutions = (7,)
  return default.apply_variant(config, arg)
