"""A CPU-sized DDPM++ on Fashion-MNIST (28x28, one channel) with the VP SDE: the demo run.

28 -> 14 -> 7 with ch_mult=(1, 2, 2), one BigGAN block per resolution, attention only at
7x7, nf=16 (317k parameters). Sized by measurement on the shared 2-core CPU (load ~5,
scripts/benchmark.py, batch 64): a train step took 1.4 s at nf=16 against 5.5 s at nf=32,
so ~10 minutes of training give several hundred steps (more on an idle machine); EMA 0.995
with warmup and lr 1e-3 suit a run that short. Snapshot samples use DPM-Solver++ with 25 steps (a
1000-step predictor-corrector grid would cost minutes per snapshot on CPU).

The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022) with the v-MSE loss
(docs/parameterizations.md): with epsilon prediction a young network's x0 estimate near t = 1
is its noise error times (sigma / alpha)^2 ~ 24,000, and the deterministic samplers (ode,
ddim, dpm_solver, heun), which follow that estimate, gave saturated images after 600 steps
(60% of DDIM's pixels outside [-0.05, 1.05]); with v the estimate at t = 1 is a bounded output.
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()

  training = config.training
  training.batch_size = 64
  training.n_iters = 2001
  training.snapshot_freq = 500
  training.snapshot_freq_for_preemption = 250
  training.log_freq = 25
  training.eval_freq = 100
  training.n_jitted_steps = 1
  training.reduce_mean = True
  training.ema_warmup = True  # a run this short must not average in the initial network

  config.sampling.batch_size = 64
  config.sampling.method = "dpm_solver"
  config.sampling.steps = 25

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
  model.ema_rate = 0.995
  model.nf = 16
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (7,)
  model.parameterization = "v"
  training.weighting = "v"

  config.optim.lr = 1e-3
  config.optim.warmup = 100
  return default.apply_variant(config, arg)
