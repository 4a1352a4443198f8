"""The reference PyTorch implementation's forward pass and train step, measured like
`scripts/benchmark.py` measures this project's, on the same network.

    python scripts/benchmark_reference.py --reference_dir=PATH/score_sde_pytorch \\
        --config=configs/cifar10_vp.py:small --batch_size=32 --threads=2

Needs torch and a checkout of yang-song/score_sde_pytorch (not part of this project; used
only to measure it). The reference network is built from the reference's own config file for
the experiment (`--reference_config`, relative to the checkout) with every `config.model`
field that both projects name the same copied from this project's config, and the parameter
counts of the two networks are checked to be equal, so both sides measure the same network.
The reference's custom CUDA kernels are compiled at import in the reference; their loader is
replaced by a stub and its FIR up/down-sampling (`upfirdn2d`) always takes the reference's own
pure-PyTorch path (`upfirdn2d_native`, which it uses on CPUs), on a GPU too (`--device=cuda`):
its pure-torch ops, nothing compiled.

Prints one JSON line per measurement, with the fields of `scripts/benchmark.py`'s lines:
images/s from the median of `--runs` timed calls after one warm-up call. The forward pass is
the network in eval mode under `torch.no_grad()`; the train step is the reference's
`losses.get_step_fn` (loss, backward, Adam with gradient clipping, EMA update).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import resource
import sys

import configs
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from score_sde import models
from score_sde.run import cli, networks, timing

# Where this project's `configs` package is imported from (kept out of the reference's way).
OUR_ROOT = pathlib.Path(configs.__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("reference_dir", None, "Checkout of yang-song/score_sde_pytorch.")
config_flags.DEFINE_config_file("config", None, "This project's config, optionally ':variant'.",
                                lock_config=True)
flags.DEFINE_string("reference_config", "configs/vp/cifar10_ddpmpp_continuous.py",
                    "The reference's config file of the same experiment (relative to "
                    "--reference_dir).")
flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
flags.DEFINE_integer("runs", 5, "Timed calls (median).", lower_bound=1)
flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default).", lower_bound=0)
flags.DEFINE_enum("mode", "both", ["forward", "train", "both"], "What to measure.")
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "torch device.")
flags.mark_flags_as_required(["reference_dir", "config"])

# config.model fields that are this project's only (or mean something else here).
NOT_IN_REFERENCE = ("schedule", "num_classes", "parameterization", "sigma_data", "norm_groups")


def import_reference(reference_dir: pathlib.Path):
  """The reference's modules (`losses`, `sde_lib`, `models.utils`, `models.ema`), imported
  from `reference_dir` with its CUDA-extension loader stubbed out."""
  import torch.utils.cpp_extension

  if not (reference_dir / "models" / "ncsnpp.py").is_file():
    raise FileNotFoundError(f"--reference_dir={str(reference_dir)!r} is not a checkout of "
                            "score_sde_pytorch (no models/ncsnpp.py)")
  sys.path.insert(0, str(reference_dir))
  real_load = torch.utils.cpp_extension.load
  torch.utils.cpp_extension.load = lambda *args, **kwargs: None  # CUDA kernels: unused on CPU
  try:
    import losses
    import sde_lib
    from models import ddpm, ema, ncsnpp, up_or_down_sampling, utils  # noqa: F401
    upfirdn2d_module = importlib.import_module("op.upfirdn2d")  # `op.upfirdn2d` is also
    # the name of the function that `op/__init__.py` exports
  finally:
    torch.utils.cpp_extension.load = real_load

  def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):  # the reference's CPU branch
    return upfirdn2d_module.upfirdn2d_native(input, kernel, up, up, down, down, pad[0],
                                             pad[1], pad[0], pad[1])

  up_or_down_sampling.upfirdn2d = upfirdn2d
  return losses, sde_lib, utils, ema


def reference_config(reference_dir: pathlib.Path, config_path: str, ours):
  """The reference's config for the experiment, with the shared model fields of `ours`."""
  path = reference_dir / config_path
  # Both projects have a `configs` package: the reference's config imports its own.
  ours_modules = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "configs"}
  for name in ours_modules:
    del sys.modules[name]
  saved_path = list(sys.path)
  # The reference's `configs` has no __init__.py: this project's package would win over it.
  sys.path[:] = [str(reference_dir)] + [p for p in sys.path if p not in ("", str(OUR_ROOT))
                                        and pathlib.Path(p or ".").resolve() != OUR_ROOT]
  try:
    spec = importlib.util.spec_from_file_location("_reference_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  finally:
    sys.path[:] = saved_path
    for name in [n for n in sys.modules if n.split(".")[0] == "configs"]:
      del sys.modules[name]
    sys.modules.update(ours_modules)
  for name, value in ours.model.items():
    if name in config.model and name not in NOT_IN_REFERENCE:
      old = config.model[name]
      # Same value, the reference's type (it has e.g. the integer fourier_scale = 16).
      config.model[name] = type(old)(value) if isinstance(old, (int, float)) else value
  config.training.batch_size = ours.training.batch_size
  config.data.image_size = int(ours.data.image_size)  # the same input shape as ours
  return config


def benchmark_reference(args, config_name: str) -> None:
  """Measures the reference on `args.config`'s network (`args`: the flags); prints JSON lines.

  Raises:
    FileNotFoundError: not a checkout; ValueError: not the same network, or not a VP SDE.
  """
  reference_dir = pathlib.Path(args.reference_dir)
  import torch  # optional: only this script needs it

  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  if device.type == "cuda" and not torch.cuda.is_available():
    raise ValueError("--device=cuda, but torch sees no CUDA device; valid here: cpu")
  ours = args.config
  ours_params = models.count_params(
      jax.eval_shape(lambda k: networks.init_model(k, ours), jax.random.key(0)))
  losses, sde_lib, mutils, ema_lib = import_reference(reference_dir)
  config = reference_config(reference_dir, args.reference_config, ours)
  config.device = device
  torch.manual_seed(config.seed)
  net = mutils.get_model(config.model.name)(config).to(device)
  n_params = sum(p.numel() for p in net.parameters())
  if n_params != ours_params:
    raise ValueError(f"the reference network has {n_params} parameters, this project's "
                     f"{ours_params}: not the same network (check --reference_config)")
  base = {"project": "score_sde_pytorch", "config": config_name, "model": config.model.name,
          "n_params": n_params, "batch_size": args.batch_size, "platform": device.type,
          "torch": torch.__version__, "threads": torch.get_num_threads()}
  if device.type == "cuda":
    base["device_kind"] = torch.cuda.get_device_name(device)
    torch.backends.cudnn.benchmark = True

  def synced(call):  # CUDA calls are asynchronous: wait for the result before the clock
    def run():
      out = call()
      if device.type == "cuda":
        torch.cuda.synchronize(device)
      return out
    return run

  def memory() -> dict:
    if device.type == "cuda":
      return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
              "memory_source": "device"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_source": "process_max_rss"}
  shape = (args.batch_size, config.data.num_channels, config.data.image_size,
           config.data.image_size)
  gen = torch.Generator().manual_seed(0)

  def report(mode: str, seconds: float) -> None:
    print(json.dumps({**base, "mode": mode, "median_s": round(seconds, 5),
                      "images_per_s": round(args.batch_size / seconds, 2), **memory()}),
          flush=True)

  if args.mode in ("forward", "both"):
    net.eval()
    x = torch.randn(shape, generator=gen).to(device)
    labels = torch.linspace(0.1, 0.9, args.batch_size).to(device) * 999

    def forward():
      with torch.no_grad():
        net(x, labels)

    report("forward", timing.median_seconds(synced(forward), args.runs))

  if args.mode in ("train", "both"):
    net.train()
    kind = config.training.sde.lower()
    if kind == "vpsde":
      sde = sde_lib.VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max,
                          N=config.model.num_scales)
    elif kind == "vesde":
      sde = sde_lib.VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max,
                          N=config.model.num_scales)
    else:
      raise ValueError(f"only VP- and VE-SDE experiments are measured; got "
                       f"{config.training.sde!r}; valid: ['vpsde', 'vesde']")
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optim.lr,
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay)
    state = dict(optimizer=optimizer, model=net, step=0,
                 ema=ema_lib.ExponentialMovingAverage(net.parameters(),
                                                      decay=config.model.ema_rate))
    step_fn = losses.get_step_fn(sde, train=True,
                                 optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=config.training.reduce_mean,
                                 continuous=config.training.continuous,
                                 likelihood_weighting=config.training.likelihood_weighting)
    batch = torch.from_numpy(
        np.random.default_rng(0).random(shape, dtype=np.float32) * 2 - 1).to(device)
    report("train_step", timing.median_seconds(synced(lambda: step_fn(state, batch)),
                                               args.runs))


def main(argv) -> None:
  del argv
  name = config_flags.get_config_filename(FLAGS["config"])
  sys.exit(cli.execute(lambda: benchmark_reference(FLAGS, name)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
