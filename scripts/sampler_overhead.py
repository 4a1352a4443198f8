"""Per-NFE time of every sampler against a bare call of the config's score network.

    python scripts/sampler_overhead.py --config=configs/cifar10_vp.py --batch_size=128
    python scripts/sampler_overhead.py --config=configs/cifar10_vp.py:tiny --batch_size=2 \\
        --steps=3 --methods=ddim,ode

Prints one JSON line for the bare score call, then one per sampler: NFE, median ms per call
and per NFE, and `per_nfe_over_bare` (1.0: the sampler adds nothing to the network's cost).
See `score_sde.run.overhead`.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from score_sde import sampling
from score_sde.run import cli, overhead

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:tiny]).",
                                lock_config=False)
flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 10, "Steps of the fixed-step samplers.", lower_bound=2)
flags.DEFINE_list("methods", list(sampling.SAMPLERS), "Samplers to time.")
flags.DEFINE_float("ode_tol", 1e-3, "rtol = atol of the adaptive ODE sampler.", lower_bound=0)
flags.DEFINE_integer("runs", 5, "Timed calls (median).", lower_bound=1)
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
  del argv
  cli.setup()
  name = config_flags.get_config_filename(FLAGS["config"])

  def measure():
    for line in overhead.sampler_overhead(FLAGS.config, batch_size=FLAGS.batch_size,
                                          steps=FLAGS.steps, methods=FLAGS.methods,
                                          ode_tol=FLAGS.ode_tol, runs=FLAGS.runs):
      print(json.dumps({"config": name, **line}), flush=True)

  sys.exit(cli.execute(measure))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
