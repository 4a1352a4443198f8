"""Every config field and its default (Song et al.'s CIFAR-10 set-up, DDPM++ network).

Experiment files call `get_config()` here and override only what differs. Field names follow
yang-song/score_sde so its users feel at home; additions: `training.weighting`,
`training.ema_warmup`, `training.importance_sampling`, `training.eps`,
`training.{time_sampling, p_mean, p_std}`, `sampling.{steps, rtol, atol, solver, eta, order,
rho, s_churn, eps, batch_size, threshold, threshold_percentile}`, `eval.{bpd_num_examples,
bpd_rtol, bpd_atol}`, `eval.{enable_fid, fid_*, kid_*, pr_*, inception_weights}`,
`model.{schedule, num_classes, parameterization, sigma_data}`, `data.data_dir`.
Guidance adds `training.label_dropout`, `sampling.{guidance, guidance_scale, class_label}` and
the `classifier` section (the noise-conditional classifier of classifier guidance).
Mixed precision adds `training.precision`, `eval.precision` and `sampling.precision`
('float32' | 'bfloat16': the networks' compute dtype; see docs/precision.md).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

VARIANTS = (None, "", "tiny", "small")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg='tiny'` shrinks it (see `apply_variant`)."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Training.
  config.training = training = ml_collections.ConfigDict()
  training.sde = "vpsde"  # 'vpsde' | 'subvpsde' | 'vesde' | 'rectified_flow' | 'trigflow'
  training.batch_size = 128
  training.n_iters = 1_300_001
  training.snapshot_freq = 50_000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10_000  # extra checkpoints to resume after preemption
  training.snapshot_sampling = True  # draw samples at every snapshot
  training.continuous = True  # continuous-time t (vs. the N discrete steps)
  training.reduce_mean = False  # mean (vs. sum) of the loss over dimensions
  training.weighting = "sigma2"  # lambda(t): 'sigma2' | 'likelihood' | 'ddpm' | 'smld'
  training.importance_sampling = False  # importance-sampled t for 'likelihood' weighting
  training.n_jitted_steps = 5  # train steps per compiled call
  training.eps = 1e-5  # smallest training time
  training.ema_warmup = False  # EMA decay min(ema_rate, (1 + n) / (10 + n)) at step n
  # Distribution of the training times: 'uniform' in [eps, T] | 'log_normal' (EDM: log of
  # sigma / alpha ~ N(p_mean, p_std^2)); weighting also takes 'x0' | 'v' | 'edm'.
  training.time_sampling = "uniform"
  training.p_mean = -1.2
  training.p_std = 1.2

  # Sampling.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "pc"  # 'pc' | 'ode' | 'ddpm' | 'ddim' | 'heun' | 'dpm_solver' | 'sde' | ...
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.unipc_corrector = True  # unipc's UniC corrector (method 'unipc')
  sampling.snr = 0.16
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.steps = config_dict.placeholder(int)  # None: sde.N
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.solver = "dopri5"
  sampling.eta = 0.0
  # ddpm's variance: 'beta' | 'posterior' | 'learned' (the network's, Nichol & Dhariwal: a
  # DiT with learn_sigma=True; sampling.ddpm_sample).
  sampling.variance = "beta"
  # The dial (method 'sde'): dx = [f - (1 + w^2)/2 g^2 s] dt + w g dW; 0: the probability-flow
  # ODE, 1: the reverse SDE. Its solver ('euler' | 'heun') is `sampling.solver`.
  sampling.w = 1.0
  sampling.order = 2
  sampling.rho = 7.0
  sampling.s_churn = 0.0
  sampling.eps = 1e-3
  sampling.batch_size = 64
  # Clipping of the denoised estimate in ddpm / ddim / heun / dpm_solver: 'none' | 'static'
  # (to the data range) | 'dynamic' (Saharia et al. 2022, at threshold_percentile).
  sampling.threshold = "none"
  sampling.threshold_percentile = 0.995

  # Evaluation.
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50_000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"
  evaluate.bpd_num_examples = config_dict.placeholder(int)  # None: the whole test split
  evaluate.bpd_rtol = 1e-5  # probability-flow ODE tolerances for bits/dim
  evaluate.bpd_atol = 1e-5
  # Sample quality (score_sde.run.quality): FID / KID / IS / precision / recall of the
  # eval.num_samples samples against cached statistics of the data.
  evaluate.enable_fid = False
  evaluate.fid_feature_net = "auto"  # 'auto' (fashion_mnist -> 'fmnist', else) | 'inception'
  evaluate.inception_weights = config_dict.placeholder(str)  # pt_inception-2015-12-05-*.pth
  evaluate.fid_stats = config_dict.placeholder(str)  # None: computed once, cached in ~/.cache
  evaluate.fid_split = "train"  # the data split the samples are compared with
  evaluate.kid_subsets = 100
  evaluate.kid_subset_size = 1000
  evaluate.pr_k = 3  # precision / recall: k-th nearest neighbour radii
  evaluate.pr_num_real = 10_000  # ... on at most this many data (and sample) features

  # Data.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False  # False: data in [0, 1]; True: in [-1, 1]
  data.uniform_dequantization = False
  data.tfds_data_dir = config_dict.placeholder(str)
  data.data_dir = config_dict.placeholder(str)

  # Model.
  config.model = model = ml_collections.ConfigDict()
  model.name = "ncsnpp"  # 'ncsnpp' | 'ddpmpp' (alias) | 'ddpm'
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.schedule = "linear"  # VP / sub-VP betas: 'linear' | 'cosine' | 'quadratic' | 'sigmoid'
  # What the network predicts: 'auto' (epsilon for VP / sub-VP, the score for VE) | 'epsilon'
  # | 'x0' | 'v' | 'score' | 'edm' (EDM preconditioning with sigma_data).
  model.parameterization = "auto"
  model.sigma_data = 0.5
  model.dropout = 0.1
  model.embedding_type = "fourier"  # 'fourier' | 'positional'
  model.fourier_scale = 16.0
  model.ema_rate = 0.9999
  model.scale_by_sigma = False
  model.conditional = True
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.fir = False
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = "biggan"  # 'ddpm' | 'biggan'
  model.progressive = "none"  # 'none' | 'output_skip' | 'residual'
  model.progressive_input = "none"  # 'none' | 'input_skip' | 'residual'
  model.progressive_combine = "sum"  # 'sum' | 'cat'
  model.attention_type = "ddpm"
  model.init_scale = 0.0
  model.conv_size = 3
  model.num_classes = 0  # > 0: class-conditional, label num_classes = null label
  # DiT (model.name = 'dit'; score_sde/models/dit.py). dit_size names a published size
  # ('S/2' ... 'XL/8') and then fixes patch_size, hidden_size, depth and num_heads, which
  # must stay at these defaults; unset, those four give the shape. The U-Net-only fields
  # above (nf, ch_mult, attn_resolutions, dropout, ...) must stay at their defaults for a DiT,
  # and these DiT fields at theirs for a U-Net. class_dropout_prob is the DiT's own label
  # dropout (the reference's; > 0 also adds the null class row); with it > 0,
  # training.label_dropout must be 0 (exactly one of the two drops labels).
  model.dit_size = config_dict.placeholder(str)
  model.patch_size = 2
  model.hidden_size = 384
  model.depth = 12
  model.num_heads = 6
  model.mlp_ratio = 4.0
  model.class_dropout_prob = 0.1
  model.learn_sigma = False
  # jax.nn.dot_product_attention's implementation: None (JAX 0.10: its XLA einsum-softmax-
  # einsum on every backend) | 'xla' | 'cudnn' (cuDNN's fused flash attention, NVIDIA GPUs,
  # bfloat16 / float16 compute only: with sampling/training.precision = 'bfloat16').
  model.attention_implementation = config_dict.placeholder(str)

  # Optimization.
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "Adam"  # 'Adam' | 'AdamW'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.0
  optim.weight_decay = 0.0

  # Guidance (score_sde.guidance): label dropout for classifier-free guidance, and how
  # --mode=sample guides. The noise-conditional classifier (--mode=train_classifier).
  training.label_dropout = 0.0  # fraction of labels replaced by the null label (CFG training)
  sampling.guidance = "none"  # 'none' | 'cfg' | 'classifier'
  sampling.guidance_scale = 0.0  # w of CFG ((1 + w) s(y) - w s(null)); scale of classifier
  sampling.class_label = 0  # the class to sample (num_classes: unconditional, CFG only)
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.num_classes = 10
  classifier.nf = 32
  classifier.ch_mult = (1, 2, 2)
  classifier.num_res_blocks = 1
  classifier.dropout = 0.0
  classifier.batch_size = 128
  classifier.n_iters = 5000
  classifier.lr = 1e-3
  classifier.warmup = 100
  classifier.eps = 1e-3  # smallest noise time of the training data
  classifier.log_freq = 50
  classifier.snapshot_freq = 1000

  # Latent diffusion. Phase 1 (--mode=train_autoencoder, score_sde.run.autoencoder_training):
  # the KL autoencoder of config.data, in WORKDIR/autoencoder/. LDM's objective without LPIPS:
  # reconstruction ('l1' | 'l2', per-example sums) + kl_weight KL + the adaptive-weighted
  # hinge term of a patch discriminator from disc_start on (disc_weight 0: none).
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.block_out_channels = (32, 64)  # 2 levels: a downsampling factor of 2
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 16
  ae.mid_block_add_attention = True
  ae.scaling_factor = 1.0  # stored with the autoencoder; phase 2 may use it or compute 'auto'
  ae.reconstruction = "l1"
  ae.kl_weight = 1e-6
  ae.disc_weight = 0.0  # LDM: 0.5
  ae.disc_start = 0
  ae.disc_nf = 32
  ae.disc_layers = 2
  ae.lr = 1e-4
  ae.disc_lr = 1e-4
  ae.beta1 = 0.5  # LDM's Adam betas
  ae.beta2 = 0.9
  ae.ema_rate = 0.999
  ae.batch_size = 64
  ae.n_iters = 5000
  ae.log_freq = 100
  ae.eval_freq = 1000  # reconstruction PSNR of the EMA weights on the test split
  ae.eval_num_examples = 1000
  ae.snapshot_freq = 1000
  # Phase 2: data.latent names an autoencoder (a phase-1 workdir, an imported workdir or a
  # diffusers folder); the network, SDE, loss and sampler then work on its latents
  # (z - shift) * scale, and samples are decoded to pixels.
  data.latent = config_dict.placeholder(str)
  data.latent_sample = "mean"  # what encodes an image: the posterior 'mean' or a 'sample'
  # 'auto': 1 / std of the encoded train latents (computed once, stored in WORKDIR/latent.json)
  # | 'autoencoder': the autoencoder's own scaling_factor (SD: 0.18215) | a number (as a
  # string, e.g. '0.18215': the field is a string).
  data.latent_scaling_factor = "auto"
  data.latent_stats_examples = 2048  # train images encoded for 'auto'

  # Mixed precision (docs/precision.md): the score network's compute dtype when training,
  # evaluating (the loss, bits/dim) and sampling, 'float32' | 'bfloat16'. Parameters,
  # optimizer state and EMA are float32 at every precision.
  training.precision = "float32"
  evaluate.precision = "float32"
  sampling.precision = "float32"

  return apply_variant(config, arg)


def _unset_dit_size(model: ml_collections.ConfigDict) -> None:
  """Replaces `model.dit_size` ('XL/8') by its patch size (the variants keep the patch)."""
  if model.dit_size:
    model.patch_size = int(str(model.dit_size).rsplit("/", 1)[-1])
    model.dit_size = None


def apply_variant(config: ml_collections.ConfigDict, arg: str | None
                  ) -> ml_collections.ConfigDict:
  """Applies a named variant to a finished experiment config.

  `None` / '': unchanged. 'tiny': the same experiment with a small network (nf <= 16, one
  residual block per resolution, no dropout) and short, small-batch training and sampling,
  for tests and smoke runs; the architecture options (block type, FIR, pyramids,
  embeddings) stay as they are. 'small': the same experiment with a CPU-sized network
  (nf=32, ch_mult=(1, 2, 2), 2 residual blocks, attention at 16x16; 1.75M parameters for
  DDPM++ on CIFAR-10), the network of the CPU benchmark against the reference
  (docs/benchmarks.md). For a DiT (`model.name='dit'`) both shrink the transformer instead
  (tiny: hidden_size 32, depth 1, 2 heads; small: 192, 6, 3 heads; the patch size kept) and
  leave the U-Net fields at their defaults.

  Raises:
    ValueError: unknown variant.
  """
  if arg not in VARIANTS:
    raise ValueError(f"Unknown config variant {arg!r}; valid: {VARIANTS}")
  dit = config.model.name == "dit"
  if arg == "small" and dit:
    _unset_dit_size(config.model)
    config.model.update(hidden_size=192, depth=6, num_heads=3)
  elif arg == "small":
    config.model.nf = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
  if arg == "tiny" and dit:  # a tiny transformer, U-Net fields as they are
    _unset_dit_size(config.model)
    config.model.update(hidden_size=32, depth=1, num_heads=2)
  elif arg == "tiny":
    config.model.nf = min(16, config.model.nf // 2)
    config.model.num_res_blocks = 1
    config.model.dropout = 0.0
  if arg == "tiny":
    config.training.batch_size = 8
    config.training.n_iters = 10
    config.training.snapshot_freq = 5
    config.training.snapshot_freq_for_preemption = 5
    config.training.log_freq = 1
    config.training.eval_freq = 5
    config.training.n_jitted_steps = 1
    config.sampling.steps = 10
    config.sampling.batch_size = 4
    config.eval.batch_size = 8
    config.eval.num_samples = 8
    config.optim.warmup = 2
    config.classifier.update(nf=8, batch_size=8, n_iters=4, log_freq=1, snapshot_freq=2,
                             warmup=2)
    config.autoencoder.update(block_out_channels=(8, 16), norm_num_groups=4, batch_size=8,
                              n_iters=4, log_freq=1, eval_freq=2, eval_num_examples=8,
                              snapshot_freq=2, disc_nf=8)
    config.data.latent_stats_examples = 16
  return config


def use_rectified_flow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` turned into a flow-matching run: the rectified-flow process (alpha = 1 - t,
  sigma = t), a velocity-predicting network, the conditional flow-matching loss and
  logit-normal training times (SD3's, m = 0, s = 1)."""
  config.training.sde = "rectified_flow"
  config.model.parameterization = "velocity"
  config.training.weighting = "flow_matching"
  config.training.time_sampling = "logit_normal"
  config.training.p_mean = 0.0
  config.training.p_std = 1.0
  return config
