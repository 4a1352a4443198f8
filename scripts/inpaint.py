"""Inpaints or colorizes test images with a trained model (any sampler of config.sampling).

    python scripts/inpaint.py --config=configs/fashion_mnist_vp.py --workdir=runs/fmnist \\
        --task=inpaint --mask=right_half --num_images=16
    python scripts/inpaint.py --config=configs/cifar10_vp.py --workdir=runs/cifar10 \\
        --task=colorize --config.sampling.method=pc --config.sampling.corrector=langevin

`--mask` is a name (left_half, right_half, top_half, bottom_half, center, checkerboard; 1 =
known) or a `.npy` file of 0/1 values broadcastable to [H, W, C]. The scheme defaults to the
re-imposing predictor-corrector inpainter for `sampling.method=pc` and to replacement inside
the score function for the other samplers (`--scheme` overrides; see score_sde/guidance.py).
Writes `workdir/<task>/<mask|gray>_step_<k>.{png,npz}`: originals, inputs and completions.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

import common  # noqa: E402,F401  scripts/common.py: the repository root on sys.path

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints are read).")
flags.DEFINE_enum("task", "inpaint", ["inpaint", "colorize"], "What to do.")
flags.DEFINE_string("mask", "right_half", "Mask name or .npy file (inpaint).")
flags.DEFINE_integer("num_images", 16, "Test images to complete.")
flags.DEFINE_string("scheme", None, "'reimpose' (pc only) or 'score' (default: by method).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  from score_sde.io import logs
  logs.setup_logging()
  from score_sde.run import guided as controllable

  try:
    result = controllable.complete_test_images(
        FLAGS.config, FLAGS.workdir, FLAGS.task, mask=FLAGS.mask, num_images=FLAGS.num_images,
        scheme=FLAGS.scheme, step=FLAGS.step)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
