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

from score_sde import guidance
from score_sde.run import cli, guided

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints are read).")
flags.DEFINE_enum("task", "inpaint", ["inpaint", "colorize"], "What to do.")
flags.DEFINE_string("mask", "right_half", "Mask name or .npy file (inpaint).")
flags.DEFINE_integer("num_images", 16, "Test images to complete.", lower_bound=1)
flags.DEFINE_string("scheme", None, "'reimpose' (pc only) or 'score' (default: by method).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])
cli.check_flag("scheme", cli.choice(guidance.INPAINT_SCHEMES))
cli.check_flag("mask", lambda what, value: (cli.existing_file(what, value) if value.endswith(
    ".npy") else cli.choice(guided.MASKS)(what, value)))


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    result = guided.complete_test_images(
        FLAGS.config, FLAGS.workdir, FLAGS.task, mask=FLAGS.mask, num_images=FLAGS.num_images,
        scheme=FLAGS.scheme, step=FLAGS.step)
    print(json.dumps(result))

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
