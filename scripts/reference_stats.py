"""Computes and caches the reference statistics of a dataset split for FID / KID / precision-
recall, and measures the metric floor: the distance between two splits of the data itself.

    python scripts/reference_stats.py                                      # Fashion-MNIST train, fmnist features
    python scripts/reference_stats.py --split=test --floor_against=train   # + the FD / KID floor
    python scripts/reference_stats.py --config=configs/cifar10_vp.py \
        --config.eval.fid_feature_net=inception \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

Writes an .npz (`--out`, default: the cache file `--mode=eval` looks for,
`~/.cache/score_sde/stats/<dataset>_<split>_<size>_<net>-<sha>.npz`) holding mu, sigma, the
features and logits, and the feature network (name + weights SHA-256), dataset, split and image
size, so that `--mode=eval` refuses statistics of another network or dataset.
`--floor_against=SPLIT` also computes (or loads) the statistics of SPLIT and prints FD, KID,
IS and precision / recall of this split against it: no sampler can be expected to beat that
number with this many samples.

The feature network, its weights and the data folder are the config's
(`--config.eval.fid_feature_net`, `--config.eval.inception_weights`, `--config.data.data_dir`);
`--config=path:arg` picks a variant.
"""

from __future__ import annotations

import json
import os
import sys
import time

import configs
from absl import app, flags
from ml_collections import config_flags

from score_sde import metrics
from score_sde.run import cli, quality

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "fashion_mnist_vp.py"),
    "Config file (its data.* and eval.* are used; default: the Fashion-MNIST demo's).",
    lock_config=True)
flags.DEFINE_string("split", "train", "The split to compute statistics of.")
flags.DEFINE_string("out", None, "The .npz (default: the eval cache file).")
flags.DEFINE_integer("limit", None, "Only the first LIMIT examples.", lower_bound=1)
flags.DEFINE_bool("recompute", False, "Ignore cached files.")
flags.DEFINE_string("floor_against", None, "Another split: print the metrics of --split "
                    "against it.")


def stats_for_split(config, net, split: str, out: str | None, recompute: bool,
                    limit: int | None) -> dict:
  start = time.perf_counter()
  stats, computed = quality.split_stats(config, net, split, path=out, recompute=recompute,
                                        limit=limit, progress=True)
  path = out or quality.default_stats_path(config, net, split)
  if computed:
    print(f"{split}: {len(stats['features'])} images -> {path} "
          f"({time.perf_counter() - start:.1f} s, measured under load)")
  else:
    print(f"{split}: cached statistics {path}")
  return stats


def reference_floor(config, split: str, out: str | None, recompute: bool,
                    limit: int | None, floor_against: str | None) -> dict:
  """Statistics of `split` (cached), and with `floor_against` the metrics of `split`
  against that split (printed and returned; {} without)."""
  net = quality.get_feature_net(config)
  stats = stats_for_split(config, net, split, out, recompute, limit)
  if not floor_against:
    return {}
  other = stats_for_split(config, net, floor_against, None, recompute, limit)
  start = time.perf_counter()
  floor = metrics.feature_metrics(stats["features"], stats["logits"], other,
                                  **quality.metric_options(config))
  floor["seconds"] = time.perf_counter() - start
  floor = quality.name_by_network(floor, net.name)
  print(f"floor: {config.data.dataset} {split} ({len(stats['features'])} images) vs "
        f"{floor_against} ({len(other['features'])}), {net.name} features:")
  print(json.dumps(floor, indent=2))
  return floor


def main(argv) -> None:
  del argv
  cli.setup()
  sys.exit(cli.execute(lambda: reference_floor(FLAGS.config, FLAGS.split, FLAGS.out,
                                               FLAGS.recompute, FLAGS.limit,
                                               FLAGS.floor_against)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
