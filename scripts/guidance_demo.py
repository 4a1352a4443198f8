"""Guidance results of a trained class-conditional run: per-class grids at several CFG
weights, an inpainting grid of test images, and the class accuracy of guided samples against
the guidance weight (as judged by a classifier), with a plot (`score_sde.run.guidance_demo`).

    python -m score_sde.main --config=configs/fashion_mnist_cond.py --workdir=runs/fmnist_cond
    python scripts/guidance_demo.py --workdir=runs/fmnist_cond --out=docs/guidance

Writes into `--out`: `cfg_grid.png` (one panel per weight in `--grid_weights`, one row per
class), `inpaint.png` (originals / masked inputs / completions), `accuracy.json` and
`accuracy.png` (accuracy of `--acc_samples` samples per weight, classes cycled). The judge
(`--judge`): 'fmnist' is the shipped Fashion-MNIST classifier; 'noise_classifier' is this
run's noise-conditional classifier (`--mode=train_classifier`) at the smallest time; 'none'
skips the accuracy. Sampling uses the run's `config.sampling` (change it with
`--override=sampling.method=ddim`); every sample of one weight comes from one compiled
program, whose labels and weight are inputs (one compile for all weights and classes).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from score_sde.run import cli, guidance_demo, guided, programs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The conditional run's directory (config.json, "
                    "checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
flags.DEFINE_multi_string("override", [], "Config override of the run, "
                          "'section.field=value' (repeatable).")
flags.DEFINE_string("out", "docs/guidance", "Output directory.")
flags.DEFINE_list("grid_weights", ["0", "1", "3"], "CFG weights w of the per-class grids.")
flags.DEFINE_integer("per_class", 8, "Samples per class in the grids.", lower_bound=1)
flags.DEFINE_list("acc_weights", ["-1", "0", "0.5", "1", "2", "3", "5"],
                  "CFG weights of the accuracy curve (-1: unconditional).")
flags.DEFINE_integer("acc_samples", 200, "Samples per weight for the accuracy.", lower_bound=1)
flags.DEFINE_enum("judge", "fmnist", list(guidance_demo.JUDGES),
                  "Who judges the class of a sample.")
flags.DEFINE_string("mask", "right_half", "Mask of the inpainting grid: one of "
                    f"{list(guided.MASKS)} or a .npy file (see scripts/inpaint.py).")
flags.mark_flags_as_required(["workdir"])


def _weights(values) -> bool:
  try:
    return bool(values) and all(float(v) == float(v) for v in values)
  except ValueError:
    return False


flags.register_validator("grid_weights", _weights, "must be a list of numbers")
flags.register_validator("acc_weights", _weights, "must be a list of numbers")


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    run = programs.load_run(FLAGS.workdir, step=FLAGS.step, overrides=FLAGS.override)
    result = guidance_demo.guidance_report(
        run, FLAGS.out, grid_weights=FLAGS.grid_weights, per_class=FLAGS.per_class,
        acc_weights=FLAGS.acc_weights, acc_samples=FLAGS.acc_samples, judge_name=FLAGS.judge,
        mask=FLAGS.mask)
    print(json.dumps(result))

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
