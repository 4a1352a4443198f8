"""Computes and caches the reference statistics of a dataset split for FID / KID / precision-
recall, and measures the metric floor: the distance between two splits of the data itself.

    python scripts/reference_stats.py                                      # Fashion-MNIST train, fmnist features
    python scripts/reference_stats.py --split=test --floor_against=train   # + the FD / KID floor
    python scripts/reference_stats.py --config=configs/cifar10_vp.py --feature_net=inception \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth

Writes an .npz (`--out`, default: the cache file `--mode=eval` looks for,
`~/.cache/score_sde/stats/<dataset>_<split>_<size>_<net>-<sha>.npz`) holding mu, sigma, the
features and logits, and the feature network (name + weights SHA-256), dataset, split and image
size, so that `--mode=eval` refuses statistics of another network or dataset.
`--floor_against=SPLIT` also computes (or loads) the statistics of SPLIT and prints FD, KID,
IS and precision / recall of this split against it: no sampler can be expected to beat that
number with this many samples.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common  # scripts/common.py: the repository root on sys.path, config files
from score_sde import metrics
from score_sde.run import quality

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "fashion_mnist_vp.py")


def stats_for_split(config, net, split: str, out: str | None, recompute: bool,
                    limit: int | None) -> dict:
  path = out or quality.default_stats_path(config, net, split)
  if os.path.exists(path) and not recompute:
    print(f"{split}: cached statistics {path}")
    return metrics.load_reference_stats(path, **quality._provenance(config, net, split))
  start = time.perf_counter()
  stats = quality.compute_reference_stats(config, net, path, split=split, limit=limit,
                                          progress=True)
  print(f"{split}: {len(stats['features'])} images -> {path} "
        f"({time.perf_counter() - start:.1f} s, measured under load)")
  return stats


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (its data.* is used)")
  p.add_argument("--config_arg", default=None, help="argument of get_config (e.g. tiny)")
  p.add_argument("--feature_net", default=None,
                 help="fmnist | inception (default: the config's eval.fid_feature_net)")
  p.add_argument("--inception_weights", default=None, help="pt_inception-2015-12-05-*.pth")
  p.add_argument("--data_dir", default=None, help="overrides config.data.data_dir")
  p.add_argument("--split", default="train")
  p.add_argument("--out", default=None, help="the .npz (default: the eval cache file)")
  p.add_argument("--limit", type=int, default=None, help="only the first LIMIT examples")
  p.add_argument("--recompute", action="store_true", help="ignore cached files")
  p.add_argument("--floor_against", default=None,
                 help="another split: print the metrics of --split against it")
  args = p.parse_args(argv)

  spec = f"{args.config}:{args.config_arg}" if args.config_arg else args.config
  config = common.load_config(spec)
  if args.feature_net:
    config.eval.fid_feature_net = args.feature_net
  if args.inception_weights:
    config.eval.inception_weights = args.inception_weights
  if args.data_dir:
    config.data.data_dir = args.data_dir
  net = quality.get_feature_net(config)
  stats = stats_for_split(config, net, args.split, args.out, args.recompute, args.limit)
  if not args.floor_against:
    return {}
  other = stats_for_split(config, net, args.floor_against, None, args.recompute, args.limit)
  start = time.perf_counter()
  e = config.eval
  floor = metrics.feature_metrics(stats["features"], stats["logits"], other,
                                 kid_subsets=int(e.get("kid_subsets", 100)),
                                 kid_subset_size=int(e.get("kid_subset_size", 1000)),
                                 pr_k=int(e.get("pr_k", 3)),
                                 pr_num_real=int(e.get("pr_num_real", 10_000)))
  floor["seconds"] = time.perf_counter() - start
  floor = quality.name_by_network(floor, net.name)
  print(f"floor: {config.data.dataset} {args.split} ({len(stats['features'])} images) vs "
        f"{args.floor_against} ({len(other['features'])}), {net.name} features:")
  print(json.dumps(floor, indent=2))
  return floor


if __name__ == "__main__":
  main()
