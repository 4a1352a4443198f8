"""Sample quality of a config's samples: cached reference statistics and metrics against them.

The FID part of `evaluate`, reading `config.eval` and `config.data`:

    eval.enable_fid           compute FID / KID / IS / precision / recall of the eval samples
    eval.fid_feature_net      'auto' (Fashion-MNIST -> 'fmnist', else 'inception') | 'fmnist' | 'inception'
    eval.inception_weights    path of pytorch-fid's pt_inception-2015-12-05-*.pth ('inception')
    eval.fid_stats            reference statistics (.npz); None: the cache file of
                              `default_stats_path`, computed on first use
    eval.fid_split            the data split of the reference ('train', as for published FIDs)
    eval.kid_subsets, eval.kid_subset_size, eval.pr_k, eval.pr_num_real

    stats = reference_stats(config, net)              # load, or compute and cache
    result = sample_quality(config, images)           # images [N, H, W, C] in [0, 1]

A statistics file records the feature network (name and weights SHA-256), the dataset, the
split and the image size; `reference_stats` refuses a file made with any other of these.
"""

from __future__ import annotations

import logging
import os
import time

import ml_collections
import numpy as np

from score_sde import metrics
from score_sde.checks import check_choice
from score_sde.models import features as features_lib
from score_sde.io import inception_files, logs
from score_sde.run import experiment

STATS_CACHE_DIR = os.path.join("~", ".cache", "score_sde", "stats")


def feature_net_name(config: ml_collections.ConfigDict) -> str:
  """`eval.fid_feature_net`, with 'auto' resolved by the dataset."""
  name = config.eval.get("fid_feature_net", "auto")
  if name == "auto":
    return "fmnist" if config.data.dataset == "fashion_mnist" else "inception"
  return name


def get_feature_net(config: ml_collections.ConfigDict) -> features_lib.FeatureNet:
  """The feature network of `eval.fid_feature_net` (weights: `eval.inception_weights`).

  Raises:
    ValueError: unknown name, or a weights file that is not the FID Inception-v3.
    FileNotFoundError: 'inception' without its weights file (the message says where to get it).
  """
  name = feature_net_name(config)
  if name != "inception":
    return features_lib.get_feature_net(name)
  path = config.eval.get("inception_weights")
  state_dict = inception_files.load_inception_variables(path)
  return features_lib.get_feature_net(name, inception_state_dict=state_dict,
                                      inception_sha256=inception_files.sha256_of_file(path))


def _provenance(config, net: features_lib.FeatureNet, split: str) -> dict:
  return dict(feature_net=net.name, weights_sha256=net.weights_sha256,
              dataset=config.data.dataset, split=split,
              extra=dict(image_size=int(config.data.image_size)))


def default_stats_path(config: ml_collections.ConfigDict, net: features_lib.FeatureNet,
                       split: str | None = None) -> str:
  """`~/.cache/score_sde/stats/<dataset>_<split>_<size>_<net>-<sha[:12]>.npz`."""
  split = split or config.eval.get("fid_split", "train")
  name = (f"{config.data.dataset.replace('/', '-')}_{split}_{config.data.image_size}_"
          f"{net.name}-{net.weights_sha256[:12]}.npz")
  return os.path.join(os.path.expanduser(STATS_CACHE_DIR), name)


def compute_reference_stats(config: ml_collections.ConfigDict, net: features_lib.FeatureNet,
                            path: str, *, split: str | None = None,
                            limit: int | None = None, progress: bool = False) -> dict:
  """Features of a data split (no flips, no dequantization) -> statistics file at `path`.

  Args:
    config: reads `data.*` (the dataset as training sees it, in [0, 1]).
    net: the feature network.
    path: the .npz to write.
    split: 'train' or 'test'; None: `eval.fid_split`.
    limit: use only the first `limit` examples (None: all).

  Returns:
    The statistics, as `metrics.load_reference_stats` returns them.
  """
  from tqdm import tqdm

  split = split or config.eval.get("fid_split", "train")
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.uniform_dequantization = False
  config.data.random_flip = False
  size = experiment.make_dataset(config, split, batch_size=1).num_examples
  data = experiment.make_dataset(config, split, batch_size=min(1000, size))
  limit = data.num_examples if limit is None else min(limit, data.num_examples)
  feats, logits, seen, start = [], [], 0, time.perf_counter()
  for batch in tqdm(data.iterate_once(), total=-(-limit // data.batch_size),
                    desc=f"features of {config.data.dataset} {split}", disable=not progress):
    keep = batch["mask"][:limit - seen]
    f, lg = net(batch["image"][:len(keep)][keep])
    feats.append(f)
    logits.append(lg)
    seen += len(f)
    if seen >= limit:
      break
  prov = _provenance(config, net, split)
  metrics.save_reference_stats(path, np.concatenate(feats), logits=np.concatenate(logits),
                               **prov)
  logging.info("reference statistics of %d %s %s images (%s features) in %.1f s -> %s", seen,
               config.data.dataset, split, net.name, time.perf_counter() - start, path)
  return metrics.load_reference_stats(path, **prov)


def split_stats(config: ml_collections.ConfigDict, net: features_lib.FeatureNet, split: str,
                *, path: str | None = None, recompute: bool = False, limit: int | None = None,
                progress: bool = False) -> tuple[dict, bool]:
  """Statistics of the data split `split`: read from `path` (None: `default_stats_path`) when
  it exists and `recompute` is False, else computed (`compute_reference_stats`) and written
  there.

  Returns:
    `(stats, computed)`: `computed` is False when the file was read.

  Raises:
    ValueError: the file was made with another feature network, weights, dataset, split or
      image size.
  """
  path = path or default_stats_path(config, net, split)
  if os.path.exists(path) and not recompute:
    return metrics.load_reference_stats(path, **_provenance(config, net, split)), False
  logging.info("no reference statistics at %s: computing them", path)
  return compute_reference_stats(config, net, path, split=split, limit=limit,
                                 progress=progress), True


def reference_stats(config: ml_collections.ConfigDict, net: features_lib.FeatureNet) -> dict:
  """Loads `eval.fid_stats` (None: the cache file), computing and caching it when missing.

  Raises:
    ValueError: the file was made with another feature network, weights, dataset, split or
      image size.
  """
  split = config.eval.get("fid_split", "train")
  return split_stats(config, net, split, path=config.eval.get("fid_stats") or None)[0]


def metric_options(config: ml_collections.ConfigDict) -> dict:
  """The `metrics.feature_metrics` options of `config.eval` (KID subsets, precision / recall
  neighbours and real-sample count)."""
  e = config.eval
  return dict(kid_subsets=int(e.get("kid_subsets", 100)),
              kid_subset_size=int(e.get("kid_subset_size", 1000)), pr_k=int(e.get("pr_k", 3)),
              pr_num_real=int(e.get("pr_num_real", 10_000)))


FID_SPLITS = ("train", "test")


def _check_stats_file(path: str) -> None:
  """Raises ValueError if `path` is not a readable statistics file (cut short, foreign)."""
  try:
    metrics.load_reference_stats(path)
  except Exception as err:  # noqa: BLE001 (a cut or foreign .npz raises anything)
    raise ValueError(f"config.eval.fid_stats: {path} is not a statistics file of "
                     f"scripts/reference_stats.py ({type(err).__name__}: {err})") from None


FEATURE_NETS = ("auto", "fmnist", "inception")


def check_settings(config: ml_collections.ConfigDict) -> features_lib.FeatureNet:
  """Every FID / KID / precision-recall setting of `config.eval`, checked before any work
  (`evaluate` calls it before the test loss and the samples): the feature network's name
  and weights, the split, the KID and PR counts, and the statistics file if there is one
  (readable, and made with this network, weights, dataset, split and image size).

  Returns:
    The feature network (to pass on to `sample_quality`).

  Raises:
    ValueError / FileNotFoundError: naming the setting, the bad value and the valid ones.
  """
  e = config.eval
  check_choice("config.eval.fid_feature_net", e.get("fid_feature_net", "auto"), FEATURE_NETS)
  split = e.get("fid_split", "train")
  check_choice("config.eval.fid_split", split, FID_SPLITS)
  for field, default in (("kid_subsets", 100), ("kid_subset_size", 1000), ("pr_k", 3),
                         ("pr_num_real", 10_000)):
    value = e.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.eval.{field} must be an integer >= 1, got {value!r}")
  given = e.get("fid_stats")
  if given:  # readable before the feature network is even built
    parent = os.path.dirname(os.path.abspath(given))
    if os.path.isfile(given):
      _check_stats_file(given)
    elif os.path.exists(given) or not os.path.isdir(parent):
      # A missing file in an existing folder is computed there (as the cache is).
      raise FileNotFoundError(f"config.eval.fid_stats={given}: no such file, and its folder "
                              f"{parent} does not exist; compute it with `python "
                              f"scripts/reference_stats.py --out={given} ...`, or set "
                              f"fid_stats=None to use (and fill) the cache")
  net = get_feature_net(config)
  path = given or default_stats_path(config, net, split)
  if os.path.isfile(path):
    if not given:
      _check_stats_file(path)
    try:
      metrics.load_reference_stats(path, **_provenance(config, net, split))
    except (FileNotFoundError, ValueError) as err:
      raise ValueError(f"config.eval.fid_stats: {err}") from None
  return net


def sample_quality(config: ml_collections.ConfigDict, images: np.ndarray,
                   net: features_lib.FeatureNet | None = None) -> dict:
  """FID / KID / IS / precision / recall / class histogram of `images` in [0, 1].

  Keys are prefixed by the feature network when it is not Inception (`fd_fmnist`, ...), so
  a number on classifier features is never mistaken for a published FID.

  Raises:
    ValueError: wrong image shape or range, non-finite images (naming how many), statistics
      of another network or dataset.
  """
  net = get_feature_net(config) if net is None else net
  stats = reference_stats(config, net)
  start = time.perf_counter()
  feats, logits = net(images)
  out = metrics.feature_metrics(feats, logits, stats, **metric_options(config),
                                seed=int(config.get("seed", 0)))
  out["seconds"] = time.perf_counter() - start
  return name_by_network(out, net.name)


def name_by_network(result: dict, feature_net: str) -> dict:
  """Prefixes metric names by the feature network unless it is Inception (`fid` -> `fmnist_fd`,
  `kid` -> `fmnist_kid`, ...)."""
  if feature_net == "inception":
    return dict(result)
  return {f"{feature_net}_{'fd' if k == 'fid' else k}": v for k, v in result.items()}


def log_metrics(result: dict, step: int, workdir: str) -> None:
  """Logs the scalar sample-quality numbers of `result` and writes them to TensorBoard
  (`workdir/tensorboard`, tags `eval/<name>`), on the chief process only."""
  import jax

  if jax.process_index() != 0:
    return
  names = ("fid", "kid", "inception_score", "precision", "recall", "fd")
  scalars = {k: float(v) for k, v in result.items()
             if isinstance(v, (int, float)) and any(k.endswith(n) for n in names)}
  logging.info("step %d: %s", step, ", ".join(f"{k} {v:.5g}" for k, v in scalars.items()))
  with logs.summary_writer(os.path.join(workdir, "tensorboard")) as writer:
    for k, v in scalars.items():
      writer.add_scalar(f"eval/{k}", v, step)
