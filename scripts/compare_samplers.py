"""Compare samplers by accuracy, distribution distance and speed at equal numbers of score
evaluations (NFE), all from the same starting noise x_T (`score_sde.run.compare`).

    python scripts/compare_samplers.py                                  # 2-D mixture, VP SDE
    python scripts/compare_samplers.py --sde=vesde --mixture=image --image_shape=8,8,1
    python scripts/compare_samplers.py --grid=log_snr      # one time grid for every sampler
    python scripts/compare_samplers.py --score=mlp --mlp_width=1024 --num_samples=512 \\
        --samplers=ddim,dpm_solver2 --nfe=50                           # per-NFE overhead
    python scripts/compare_samplers.py --sde=rectified_flow --samplers=sde,ddim --w=0,0.5,1,2
    python scripts/compare_samplers.py --workdir=runs/cifar10_vp --num_samples=64
                                                                       # a trained run

Metrics (pathwise RMSE against a tight ODE solve, sliced W1 and mode-weight TV against the
mixture, time per NFE against a bare score call, FD / KID for trained runs) are described in
`score_sde/run/compare.py`. Writes `results.csv`, `results.md` and `results.png` under
`--out` and prints the table. Exit status 2 with one `error: ...` line on bad input.
"""

from __future__ import annotations

import sys

from absl import app, flags

from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.run import cli, compare

FLAGS = flags.FLAGS
flags.DEFINE_enum("problem", None, list(compare.PROBLEMS),
                  "Score source (default: checkpoint if --workdir is given, else mixture).")
flags.DEFINE_enum("mixture", "three_gaussians", list(compare.MIXTURES),
                  "Data mixture of --problem=mixture.")
flags.DEFINE_list("image_shape", ["8", "8", "1"], "Event shape of --mixture=image.")
flags.DEFINE_enum("sde", "vpsde", sorted(sde_lib.SDES), "Forward process (mixtures).")
flags.DEFINE_enum("score", "exact", list(compare.SCORES),
                  "exact (mixture score) or mlp (exact + a random MLP, for timing).")
flags.DEFINE_integer("mlp_width", 512, "Hidden units of --score=mlp.", lower_bound=1)
flags.DEFINE_integer("mlp_depth", 3, "Hidden layers of --score=mlp.", lower_bound=1)
flags.DEFINE_float("mlp_scale", 0.01, "Factor of the MLP's output.")
flags.DEFINE_string("workdir", None, "A trained run's directory (config.json, checkpoints).")
flags.DEFINE_string("model", None, "A registered pretrained model by name "
                    "(score_sde.run.pretrained.MODELS; SHA-256 checked at load).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: newest).",
                     lower_bound=0)
flags.DEFINE_multi_string("override", [], "Config override of the run, "
                          "'section.field=value' (repeatable), e.g. sampling.precision=bfloat16.")
flags.DEFINE_list("samplers", list(compare.SAMPLER_GRID),
                  f"Subset of {list(compare.SAMPLER_GRID)}.")
flags.DEFINE_list("nfe", ["10", "20", "50", "100", "200"],
                  "NFE budgets of the fixed-step samplers.")
flags.DEFINE_enum("grid", None, list(sampling.GRIDS),
                  "Time grid of every fixed-step sampler (default: each method's own grid).")
flags.DEFINE_list("w", ["0", "0.5", "1", "2"],
                  "Stochasticities of the dial samplers (sde, sde_heun): 0 is the "
                  "probability-flow ODE, 1 the reverse SDE.")
flags.DEFINE_list("ode_tols", ["1e-2", "1e-3", "1e-4", "1e-5"],
                  "rtol = atol values of the adaptive 'ode' sampler.")
flags.DEFINE_integer("num_samples", 2000, "Samples per sampler.", lower_bound=1)
flags.DEFINE_float("eps", None, "Data-end time (default sampling.default_eps(sde)).")
flags.DEFINE_string("reference_solver", "dopri8", "Solver of the reference ODE solve.")
flags.DEFINE_float("reference_tol", 1e-8, "rtol = atol of the reference.", lower_bound=0)
flags.DEFINE_enum("reference_dtype", "float64", list(compare.REFERENCE_DTYPES),
                  "Precision of the reference.")
flags.DEFINE_integer("projections", 256, "Directions of sliced W1.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed runs per sampler (best kept).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed.")
cli.check_flag("seed", cli.seed)
flags.DEFINE_bool("quality", True, "Trained runs: FD / KID (--noquality skips them).")
flags.DEFINE_string("inception_weights", None,
                    "pt_inception-2015-12-05-*.pth (feature net 'inception').")
flags.DEFINE_string("out", "runs/compare_samplers", "Output directory.")
flags.DEFINE_bool("overwrite", False, "Replace results.{csv,md,png} in --out if they exist.")


def _numbers(name: str, kind):
  values = FLAGS[name].value
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name}={','.join(values)}: not a list of {kind.__name__}s") from None


def options_from_flags() -> compare.CompareOptions:
  """The flags as `CompareOptions` (raises ValueError naming a bad value)."""
  problem = FLAGS.problem or ("checkpoint" if FLAGS.workdir or FLAGS.model else "mixture")
  return compare.CompareOptions(
      problem=problem, mixture=FLAGS.mixture, image_shape=_numbers("image_shape", int),
      sde=FLAGS.sde, score=FLAGS.score, mlp_width=FLAGS.mlp_width, mlp_depth=FLAGS.mlp_depth,
      mlp_scale=FLAGS.mlp_scale, workdir=FLAGS.workdir, model=FLAGS.model, step=FLAGS.step,
      overrides=tuple(FLAGS.override), samplers=tuple(FLAGS.samplers),
      nfe=_numbers("nfe", int), grid=FLAGS.grid, w=_numbers("w", float),
      ode_tols=_numbers("ode_tols", float),
      num_samples=FLAGS.num_samples, eps=FLAGS.eps, reference_solver=FLAGS.reference_solver,
      reference_tol=FLAGS.reference_tol, reference_dtype=FLAGS.reference_dtype,
      projections=FLAGS.projections, repeats=FLAGS.repeats, seed=FLAGS.seed,
      quality=FLAGS.quality, inception_weights=FLAGS.inception_weights)


def main(argv) -> None:
  del argv
  cli.setup()
  try:
    options = options_from_flags()  # validated before anything compiles
    compare.results_paths(FLAGS.out, overwrite=FLAGS.overwrite)  # never replaced silently
  except (ValueError, FileExistsError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(cli.EXIT_BAD_INPUT)

  def work():
    rows, summary = compare.run_comparison(options)
    paths = compare.write_results(rows, summary, FLAGS.out, overwrite=FLAGS.overwrite)
    print(compare.markdown_table(rows, summary))
    print(compare.timing_line(rows, summary))
    print("wrote " + ", ".join(paths.values()))

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
