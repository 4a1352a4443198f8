"""Every sampler from the same noise on one trained run: one PNG panel and per-sampler
numbers (`score_sde.run.figures.sampler_panel`).

    python scripts/sampler_panel.py --workdir=runs/fashion_mnist_vp \\
        --out=runs/fashion_mnist_vp/all_samplers.png

For each method (default: pc, ode, ddim, dpm_solver, heun) it draws `--num_samples` images
from the same x_T with the EMA weights of the newest checkpoint (or `--step`) and reports, in
[0, 1] pixel units and before any clipping: the fraction of saturated pixels (outside
[-0.05, 1.05]), the pixel mean and std, next to the same numbers of test images; and the NFE
and wall time. Writes the panel PNG and `<out>.json`. The samplers' settings are the demo's
(`figures.DEMO_SAMPLERS`); for others use `python -m score_sde.main --mode=sample`, whose
batches also start from shared noise.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from score_sde import sampling
from score_sde.io import files
from score_sde.run import cli, figures, programs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
flags.DEFINE_multi_string("override", [], "Config override of the run, "
                          "'section.field=value' (repeatable).")
flags.DEFINE_string("out", None, "PNG to write (and <out>.json).")
flags.DEFINE_list("methods", ["pc", "ode", "ddim", "dpm_solver", "heun"],
                  f"Samplers to run, of {list(figures.DEMO_SAMPLERS)}.")
cli.check_flag("methods", cli.choice(figures.DEMO_SAMPLERS))
flags.DEFINE_integer("num_samples", 36, "Samples per sampler (divisible by the devices).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the shared starting noise.")
cli.check_flag("seed", cli.seed)
flags.DEFINE_enum("threshold", "none", list(sampling.THRESHOLDS),
                  "Clipping of the denoised estimate for ddpm / ddim / heun / dpm_solver.")
flags.DEFINE_bool("quality", False, "Also score each sampler's samples (clipped to [0, 1]) "
                  "with the config's feature network against the train-split statistics "
                  "(FD, KID, precision / recall; docs/metrics.md), next to the same number "
                  "of test images: the floor at this sample count.")
flags.DEFINE_bool("overwrite", False, "Replace --out and <out>.json if they exist.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    json_path = str(pathlib.Path(FLAGS.out).with_suffix(".json"))
    for path in (FLAGS.out, json_path):  # before any work: outputs are never replaced silently
      files.check_new(path, overwrite=FLAGS.overwrite, flag="--overwrite")
    run = programs.load_run(FLAGS.workdir, step=FLAGS.step, overrides=FLAGS.override)
    samples, stats, data_stats = figures.sampler_panel(run, FLAGS.methods, FLAGS.num_samples,
                                                       FLAGS.seed, FLAGS.threshold)
    if FLAGS.quality:
      stats["quality"] = figures.panel_quality(run, samples, FLAGS.num_samples)
    print(figures.save_panel(samples, stats, FLAGS.out, overwrite=FLAGS.overwrite))
    record = dict(stats, data=data_stats, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                  threshold=FLAGS.threshold, saturation_range=figures.SATURATION)
    files.write_json(json_path, record, indent=1, allow_nan=True, overwrite=FLAGS.overwrite,
                     flag="--overwrite")

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
