"""Measures the bias of the inpainting / colorization schemes against an exact conditional
(`score_sde.run.inpainting_bias`: two Gaussian-mixture problems whose exact conditional is
known).

    python scripts/inpainting_bias.py [--n=4000] [--out=docs/inpainting_bias.md]

Writes a Markdown table: per scheme and sampler, the exact and sampled weight of mode 0, the
error of the mean of the unknown coordinates (in units of the component std), and NFE.
"""

from __future__ import annotations

import sys

from absl import app, flags

from score_sde import sde as sde_lib
from score_sde.run import cli, inpainting_bias

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 4000, "Completions per scheme and sampler.", lower_bound=2)
flags.DEFINE_enum("sde", "vpsde", sorted(sde_lib.SDES), "Forward process.")
flags.DEFINE_string("out", None, "Markdown file for the table.")


def main(argv) -> None:
  del argv

  def work():
    table = inpainting_bias.bias_table(sde_lib.get_sde(FLAGS.sde), FLAGS.n,
                                       log=lambda line: print(line, flush=True))
    print(table)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        f.write(f"Measured by `python scripts/inpainting_bias.py --n={FLAGS.n} "
                f"--sde={FLAGS.sde}`\n\n{table}\n")

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
