"""Exports a checkpoint of this project in score_sde_pytorch's format (a `.pth` file).

    python scripts/export_checkpoint.py --config=configs/cifar10_vp.py \\
        --workdir=runs/cifar10_vp --output=checkpoint_exported.pth [--step=K]

The file is what the reference's `save_checkpoint` writes (`{'optimizer', 'model', 'ema',
'step'}`, model keys `module.all_modules.<i>...`), so its `restore_checkpoint` and
`torch.load(path, weights_only=True)` read it; written without torch. The Adam moments are
not exported (the optimizer entry holds the hyper-parameters and an empty state).
The file is written atomically (a temporary file renamed into place), and an existing
`--output` is refused unless `--overwrite`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from score_sde.run import cli, reference

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file of the run.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run directory to read the checkpoint from.")
flags.DEFINE_string("output", None, "The .pth file to write.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists (atomically).")
cli.check_flag("output", cli.new_file_in_existing_dir)
flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    step = reference.export_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.output,
                                       step=FLAGS.step, overwrite=FLAGS.overwrite)
    print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.output}")

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
