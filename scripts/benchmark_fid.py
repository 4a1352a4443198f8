"""Times FD-FMNIST of 10,000 samples against cached reference statistics (not a test).

    python scripts/benchmark_fid.py                       # 10,000 Fashion-MNIST test images as "samples"
    python scripts/benchmark_fid.py --num_samples=50000 --kid

Loads the shipped classifier and the cached train-split statistics (computing them first if
missing, not timed), then times, after one warm-up call that compiles the network: feature
extraction of the samples (batched, jitted), their mean and covariance, the Frechet distance,
and with `--kid` the KID (100 subsets of 1000) and precision / recall. The "samples" are test
images (repeated when more are asked for), so the printed FD is also the data floor for this
sample count.
"""

from __future__ import annotations

import os
import sys
import time

import configs
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from score_sde import metrics
from score_sde.io import datasets
from score_sde.run import cli, quality

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "fashion_mnist_vp.py"),
    "Config file (data and feature network; default: the Fashion-MNIST demo's).",
    lock_config=True)
flags.DEFINE_integer("num_samples", 10_000, "Test images used as samples (repeated).",
                     lower_bound=2)
flags.DEFINE_bool("kid", False, "Also time KID and precision / recall.")


def time_fd(config, num_samples: int, kid: bool) -> dict:
  """Times FD (and with `kid` KID, precision / recall) of `num_samples` test images against
  the cached train statistics; prints and returns the values and seconds."""
  net = quality.get_feature_net(config)
  stats = quality.reference_stats(config, net)
  images, _ = datasets.load_idx(config.data.data_dir or datasets.FASHION_MNIST_DIR, "test")
  reps = -(-num_samples // len(images))
  samples = np.tile(images, (reps, 1, 1, 1))[:num_samples].astype(np.float32) / 255.0
  net(samples[:net.batch_size])  # compile

  times = {}
  start = time.perf_counter()
  feats, _ = net(samples)
  times["features"] = time.perf_counter() - start
  t = time.perf_counter()
  mu, sigma = metrics.feature_statistics(feats)
  fd = metrics.frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
  times["statistics + FD"] = time.perf_counter() - t
  result = dict(fd=fd)
  if kid:
    t = time.perf_counter()
    result["kid"] = metrics.kernel_inception_distance(feats, stats["features"])[0]
    times["KID"] = time.perf_counter() - t
    t = time.perf_counter()
    n = min(10_000, len(feats))
    rng = np.random.default_rng(0)
    result["precision_recall"] = metrics.precision_recall(
        stats["features"][rng.choice(len(stats["features"]), n, replace=False)], feats[:n])
    times["precision / recall"] = time.perf_counter() - t
  total = time.perf_counter() - start
  print(f"FD-FMNIST of {num_samples} samples against cached {stats['meta']['split']} "
        f"statistics: {total:.1f} s (measured under load on {os.cpu_count()} CPU cores): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
  print("values:", {k: v for k, v in result.items()})
  return dict(result, seconds=total, **{f"seconds_{k}": v for k, v in times.items()})


def main(argv) -> None:
  del argv
  cli.setup()
  sys.exit(cli.execute(lambda: time_fd(FLAGS.config, FLAGS.num_samples, FLAGS.kid)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
