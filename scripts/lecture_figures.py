"""The lecture notes' pictures from any trained run (`score_sde.run.figures.lecture_figures`).

    python scripts/lecture_figures.py --workdir=runs/fashion_mnist_vp --out_dir=docs

Writes three PNGs into `--out_dir` (EMA weights of the newest checkpoint, or `--step`):

- `lecture_progressive.png`: progressive generation. A deterministic DDIM trajectory from
  x_T to eps; at 10 of its times (columns) the state x_t and the network's estimate of the
  clean image, x0_hat = (x_t + sigma^2 score) / alpha (Tweedie), for 4 draws (row pairs).
- `lecture_interpolation.png`: two test images encoded to x_T by the probability-flow ODE
  (t = eps -> T), spherical interpolation of the two codes, each point decoded by the ODE
  (T -> eps), for 2 pairs.
- `lecture_samplers.png`: the same 8 starting points x_T under every sampler (rows).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from score_sde.run import cli, figures, programs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
flags.DEFINE_multi_string("override", [], "Config override of the run, "
                          "'section.field=value' (repeatable).")
flags.DEFINE_string("out_dir", "docs", "Where the PNGs go.")
flags.DEFINE_integer("seed", 0, "Seed of the starting noise.")
cli.check_flag("seed", cli.seed)
flags.DEFINE_integer("ddim_steps", 100, "Steps of the progressive-generation trajectory.",
                     lower_bound=1)
flags.DEFINE_list("samplers", list(figures.DEMO_SAMPLERS), "Rows of lecture_samplers.png.")
cli.check_flag("samplers", cli.choice(figures.DEMO_SAMPLERS))
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    start = time.perf_counter()
    run = programs.load_run(FLAGS.workdir, step=FLAGS.step, overrides=FLAGS.override)
    for path in figures.lecture_figures(run, FLAGS.out_dir, seed=FLAGS.seed,
                                        ddim_steps=FLAGS.ddim_steps, samplers=FLAGS.samplers):
      print(path, flush=True)
    print(f"checkpoint step {run.step}; {time.perf_counter() - start:.0f} s", flush=True)

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
