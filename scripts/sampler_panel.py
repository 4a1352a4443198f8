"""Every sampler from the same noise on one checkpoint: one PNG panel and per-sampler numbers.

    python scripts/sampler_panel.py --config=configs/fashion_mnist_vp.py \
        --workdir=runs/fashion_mnist_vp --out=runs/fashion_mnist_vp/all_samplers.png

For each method (default: pc, ode, ddim, dpm_solver, heun) it draws `--num_samples` images
from the same x_T with the EMA weights of the latest checkpoint and reports, in [0, 1] pixel
units and before any clipping: the fraction of saturated pixels (outside [-0.05, 1.05]), the
pixel mean and std, next to the same numbers of as many test images; and the NFE and wall
time. Writes the panel PNG and `<out>.json`. The samplers' settings are the demo's
(`SETTINGS`); for others use `python -m score_sde.main --mode=sample`, whose batches also
start from shared noise.
"""

from __future__ import annotations

import json
import pathlib
import time

import common  # noqa: F401  scripts/common.py: the repository root on sys.path
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from score_sde.io import datasets, images
from score_sde.run import evaluate
from score_sde import models, sampling
from score_sde.run import experiment
from score_sde.io import parallel

# The demo's sampler settings: NFE in brackets (with denoising).
SETTINGS = {
    "pc": dict(predictor="reverse_diffusion", corrector="langevin", steps=150),  # [300]
    "ode": dict(solver="tsit5", rtol=1e-3, atol=1e-3),  # [adaptive]
    "ddim": dict(steps=50),  # [51]
    "dpm_solver": dict(steps=25, order=2),  # [26]
    "heun": dict(steps=18),  # [35]
    "ddpm": dict(steps=200),  # [200]
}
SATURATION = (-0.05, 1.05)  # pixels outside this range of [0, 1] count as saturated

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command-line flags (defined only when run as a script, so that tests can import
  this module next to others that define --config)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
  flags.DEFINE_string("out", None, "PNG to write (and <out>.json).")
  flags.DEFINE_list("methods", ["pc", "ode", "ddim", "dpm_solver", "heun"], "Samplers to run.")
  flags.DEFINE_integer("num_samples", 36, "Samples per sampler (divisible by the devices).")
  flags.DEFINE_integer("seed", 0, "Seed of the shared starting noise.")
  flags.DEFINE_enum("threshold", "none", list(sampling.THRESHOLDS),
                    "Clipping of the denoised estimate for ddpm / ddim / heun / dpm_solver.")
  flags.DEFINE_bool("quality", False, "Also score each sampler's samples (clipped to [0, 1]) "
                    "with the config's feature network against the train-split statistics "
                    "(FD, KID, precision / recall; docs/metrics.md), next to the same number "
                    "of test images: the floor at this sample count.")
  flags.mark_flags_as_required(["config", "workdir", "out"])


def pixel_stats(x01: np.ndarray) -> dict:
  """Saturated fraction, mean and std of images in [0, 1] units (not clipped)."""
  x = np.asarray(x01, np.float64)
  lo, hi = SATURATION
  return dict(saturated=float(np.mean((x < lo) | (x > hi))), mean=float(x.mean()),
              std=float(x.std()))


def run_samplers(config, workdir: str, methods, num_samples: int, seed: int = 0,
                 threshold: str = "none") -> tuple[dict, dict, dict]:
  """`(samples, stats, data_stats)`: per method the images `[N, H, W, C]` in [0, 1] units
  (unclipped) and their `pixel_stats` plus NFE and seconds; the test images' stats."""
  mesh = parallel.make_mesh()
  state, step, model, sde = evaluate.load_checkpoint(config, workdir, mesh=mesh)
  score_fn = models.get_score_fn(sde, model, state.variables(ema=True), train=False,
                                 continuous=bool(config.training.continuous))
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  shape = (num_samples, *models.image_shape(config))
  sharding = NamedSharding(mesh, P("batch"))
  key = jax.random.PRNGKey(seed)
  x_T = jax.device_put(sde.prior_sampling(jax.random.fold_in(key, 0), shape), sharding)
  data_range = experiment.data_range(config)
  samples, stats = {}, {}
  for method in methods:
    options = dict(SETTINGS[method])
    if threshold != "none" and "threshold" in sampling.sampler_options(method):
      options.update(threshold=threshold, data_range=data_range)
    fn = jax.jit(lambda k, x: sampling.sample(k, score_fn, sde, shape, method=method,
                                              x_T=x, **options))
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(fn(jax.random.fold_in(key, 1), x_T))
    seconds = time.perf_counter() - start
    samples[method] = np.asarray(inverse_scaler(x))
    stats[method] = dict(pixel_stats(samples[method]), nfe=int(nfe), seconds=seconds,
                         options={k: v for k, v in options.items() if k != "data_range"})
    print(f"{method:11s} NFE {int(nfe):4d}  {seconds:6.1f} s  saturated "
          f"{stats[method]['saturated']:.3f}  mean {stats[method]['mean']:.3f}  std "
          f"{stats[method]['std']:.3f}", flush=True)
  test = datasets.get_dataset(config.copy_and_resolve_references(), "test",
                              process_index=0, process_count=1)
  batch = next(iter(test))
  data = np.asarray(batch["image"]).reshape(-1, *shape[1:])[:256]
  data_stats = pixel_stats(data)
  print(f"{'test data':11s} saturated {data_stats['saturated']:.3f}  mean "
        f"{data_stats['mean']:.3f}  std {data_stats['std']:.3f}", flush=True)
  return samples, dict(step=step, methods=stats), data_stats


def sample_quality(config, samples: dict, num_samples: int) -> dict:
  """Per method the quality metrics of its samples (`quality.sample_quality`), and under
  'test data' those of as many test images: what a perfect sampler would score."""
  from score_sde.run import quality
  net = quality.get_feature_net(config)
  test = datasets.get_dataset(config.copy_and_resolve_references(), "test",
                              process_index=0, process_count=1, batch_size=num_samples)
  out = {"test data": quality.sample_quality(config, next(iter(test))["image"], net)}
  for method, x in samples.items():
    out[method] = quality.sample_quality(config, np.clip(x, 0.0, 1.0), net)
  for name, result in out.items():
    print(f"{name:11s} " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()
                                     if isinstance(v, float) and "seconds" not in k), flush=True)
  return out


def main(argv) -> None:
  del argv
  from score_sde.io import logs
  logs.setup_logging()
  config = FLAGS.config
  samples, stats, data_stats = run_samplers(config, FLAGS.workdir, FLAGS.methods,
                                            FLAGS.num_samples, FLAGS.seed, FLAGS.threshold)
  if FLAGS.quality:
    stats["quality"] = sample_quality(config, samples, FLAGS.num_samples)
  panels = {f"{m} (NFE {stats['methods'][m]['nfe']}, sat. "
            f"{100 * stats['methods'][m]['saturated']:.0f}%)": x for m, x in samples.items()}
  print(images.save_side_by_side(panels, FLAGS.out))
  record = dict(stats, data=data_stats, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                threshold=FLAGS.threshold, saturation_range=SATURATION)
  with open(pathlib.Path(FLAGS.out).with_suffix(".json"), "w") as f:
    json.dump(record, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
