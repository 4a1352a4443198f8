"""Puts sample sets of one run side by side in one PNG (e.g. the PC and ODE samplers).

    python scripts/sample_grid.py --workdir=runs/fashion_mnist_vp --out=pc_vs_ode.png pc ode

The positional arguments are the sampling methods to show.

Reads, for each method, the newest file of the highest step k in `workdir/samples`:
`<method>_step_<k>_<sampler settings>_n<N>[.<i>].npz` (written by
`python -m score_sde.main --mode=sample`; older runs wrote `<method>_step_<k>.npz`).
"""

from __future__ import annotations

import sys

from absl import app, flags

from score_sde.io import files, images, workdir
from score_sde.run import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (samples/ is read).")
flags.DEFINE_string("out", None, "PNG to write.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
  methods = argv[1:]
  if not methods:
    print("error: name the sampling methods to show, e.g. `... pc ode`", file=sys.stderr)
    sys.exit(cli.EXIT_BAD_INPUT)

  def work():
    files.check_new(FLAGS.out, overwrite=FLAGS.overwrite, flag="--overwrite")
    panels = {}
    for method in methods:
      x, step = workdir.latest_samples(FLAGS.workdir, method)
      panels[f"{method} (step {step}, {len(x)} samples)"] = x
    print(images.save_side_by_side(panels, FLAGS.out, overwrite=FLAGS.overwrite,
                                   flag="--overwrite"))

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
