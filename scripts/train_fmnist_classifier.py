"""Trains the Fashion-MNIST feature network (`score_sde.models.fmnist_classifier`) and writes
its weights, the test accuracy and the SHA-256 to put into `WEIGHTS_SHA256`.

    python scripts/train_fmnist_classifier.py                       # -> score_sde/assets/fmnist_classifier.npz
    python scripts/train_fmnist_classifier.py --epochs=1 --out=/tmp/c.npz   # a quick try

Reads the idx files with `score_sde.io.datasets.load_idx` (default folder: the Debian package
`dataset-fashion-mnist`); the training is `score_sde.run.feature_classifier.train` (Adam,
cosine decay, flips and optional shifts; deterministic for a given `--seed` on one machine).
"""

from __future__ import annotations

import sys

from absl import app, flags

from score_sde.io import datasets
from score_sde.models import fmnist_classifier as fc
from score_sde.run import cli, feature_classifier

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", datasets.FASHION_MNIST_DIR, "Folder of the four idx files.")
flags.DEFINE_string("out", fc.WEIGHTS_PATH, "The .npz of the weights to write.")
flags.DEFINE_integer("epochs", 8, "Epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_float("lr", 2e-3, "Peak learning rate.", lower_bound=0)
flags.DEFINE_integer("shift", 0, "Random shifts of up to SHIFT pixels.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed.")
cli.check_flag("seed", cli.seed)


def main(argv) -> None:
  del argv
  sys.exit(cli.execute(lambda: feature_classifier.train(
      FLAGS.data_dir, FLAGS.out, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
      lr=FLAGS.lr, shift=FLAGS.shift, seed=FLAGS.seed)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
