"""A CPU-sized DDPM++ on Fashion-MNIST (28x28, one channel) with the VP SDE: the demo run.

28 -> 14 -> 7 with ch_mult=(1, 2, 2), one BigGAN block per resolution, attention only at
7x7, nf=32: about 1M parameters, sized to give recognizable samples after a few minutes of
2-core CPU training.
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()

  training = config.training
  training.batch_size = 64
  training.n_iters = 4001
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.log_freq = 50
  training.eval_freq = 250
  training.n_jitted_steps = 1
  training.reduce_mean = True

  config.sampling.batch_size = 64
  config.sampling.steps = 500

  config.eval.batch_size = 256
  config.eval.num_samples = 1000

  data = config.data
  data.dataset = "fashion_mnist"
  data.image_size = 28
  data.num_channels = 1
  data.random_flip = False
  data.centered = True
  data.data_dir = "/usr/share/datasets/fashion-mnist"

  model = config.model
  model.embedding_type = "positional"
  model.dropout = 0.0
  model.ema_rate = 0.999
  model.nf = 32
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (7,)

  config.optim.lr = 1e-3
  config.optim.warmup = 200
  return default.apply_variant(config, arg)
