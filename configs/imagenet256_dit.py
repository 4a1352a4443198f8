"""The published DiT sizes (Peebles & Xie 2023) on ImageNet 256x256 latents: the network of
facebookresearch/DiT's `DiT-<size>` with `input_size=32, in_channels=4, num_classes=1000,
learn_sigma=True, class_dropout_prob=0.1`, on the latent space of the Stable Diffusion VAE
(256 / 8 = 32, four channels).

    --config=configs/imagenet256_dit.py:XL/2        # also S/2 ... XL/8; default XL/2
    --config=configs/imagenet256_dit.py:tiny        # a 1-block, width-32 DiT on the same data

`python -m score_sde.main --config=configs/imagenet256_dit.py:XL/2 --mode=describe` prints
the exact parameter count (675,129,632 for XL/2, the pos_embed table included) without
allocating the network. The training set-up is the reference train.py's: the discrete VP
chain of 1000 steps with linear betas 1e-4 .. 0.02 (beta_min 0.1, beta_max 20 here),
epsilon prediction, AdamW lr 1e-4 without weight decay, batch 256, EMA 0.9999, 10% of the
labels replaced by the null class (the DiT's own `class_dropout_prob`), and sampling with
250 DDPM steps and the learned variance. The reference's variance (VLB) term is not trained
here: this project's losses fit the mean; imported checkpoints bring a trained variance.
Training needs the latents (`data.latent`, see DESIGN.md "Latent diffusion").
"""

from __future__ import annotations

import ml_collections

from configs import default

SIZES = ("S/2", "S/4", "S/8", "B/2", "B/4", "B/8", "L/2", "L/4", "L/8", "XL/2", "XL/4", "XL/8")
DEFAULT_SIZE = "XL/2"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a size of `SIZES` (default XL/2) or a variant of `default.VARIANTS` (applied to
  XL/2).

  Raises:
    ValueError: an unknown size or variant (the message lists both).
  """
  if arg not in SIZES and arg not in default.VARIANTS:
    raise ValueError(f"Unknown configs/imagenet256_dit.py argument {arg!r}; valid sizes: "
                     f"{SIZES}, variants: {default.VARIANTS}")
  size, variant = (arg, None) if arg in SIZES else (DEFAULT_SIZE, arg)
  config = default.get_config()

  training = config.training
  training.sde = "vpsde"
  training.continuous = False
  training.weighting = "ddpm"
  training.reduce_mean = True
  training.batch_size = 256
  training.n_iters = 400_001
  training.label_dropout = 0.0  # the DiT drops labels itself (model.class_dropout_prob)

  sampling = config.sampling
  sampling.method = "ddpm"
  sampling.steps = 250
  sampling.predictor = "ancestral_sampling"
  sampling.variance = "learned"  # the network's interpolated variance, as sample.py
  sampling.guidance = "cfg"
  sampling.guidance_scale = 3.0  # w = 3: the reference's cfg_scale 4 = 1 + w
  sampling.class_label = 207

  data = config.data
  data.dataset = "imagenet2012"
  data.image_size = 32  # latents of 256 x 256 images (downsampling factor 8)
  data.num_channels = 4
  data.centered = True
  data.random_flip = True

  model = config.model
  model.name = "dit"
  model.dit_size = size
  model.num_classes = 1000
  model.class_dropout_prob = 0.1
  model.learn_sigma = True
  model.ema_rate = 0.9999
  model.parameterization = "auto"  # epsilon for VP

  optim = config.optim
  optim.optimizer = "AdamW"
  optim.lr = 1e-4
  optim.weight_decay = 0.0
  optim.warmup = 0
  optim.grad_clip = -1.0
  return default.apply_variant(config, variant)
