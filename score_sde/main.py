"""The command line: train, evaluate or sample.

    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp --mode=train
    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp --mode=eval
    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp \\
        --mode=sample --config.sampling.method=dpm_solver --config.sampling.steps=20
    python -m score_sde.main --config=configs/fashion_mnist_vp.py --workdir=runs/fmnist \
        --mode=train_classifier   # the noise-conditional classifier (docs/guidance.md)
    python -m score_sde.main --config=configs/fashion_mnist_vp.py --workdir=runs/fmnist_ae \
        --mode=train_autoencoder  # latent diffusion's phase 1 (config.autoencoder)
    python -m score_sde.main --config=configs/imagenet256_dit.py:XL/2 --mode=describe
        # one JSON line: "params" (exact) and "flops_per_image" (XLA's count, one forward
        # pass of batch 1), under jax.eval_shape / lowering: nothing allocated, no --workdir

Any config field can be overridden with `--config.<section>.<field>=value`, and
`--config=configs/<file>.py:tiny` picks the file's tiny variant. The config is validated
before anything compiles; training saves it as `workdir/config.json` once the run has
started, and eval / sample start from that file, with the command line's `--config.*`
overrides on top (a change of the network or the SDE is refused unless
`--allow_config_change`).

Exit status: 0 done, 2 bad input (one line on stderr, nothing compiled, nothing written;
also a workdir another process is writing to), 3 a non-finite loss (the last good checkpoint
is kept), 4 a failed write (a checkpoint save or an output file: disk full, no permission;
one line naming the path and the error, the last intact checkpoint untouched).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from score_sde.io import logs

MODES = ("train", "eval", "sample", "train_classifier", "train_autoencoder", "describe")
EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_WRITE_FAILED = 2, 3, 4

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("step", None, "Checkpoint step to resume (train) or to evaluate / sample "
                     "(default: the newest intact one).")
flags.DEFINE_integer("num_samples", None, "Samples for --mode=sample, >= 1 (default: "
                     "config.eval.num_samples).")
flags.DEFINE_bool("allow_config_change", False, "eval / sample: accept --config.* overrides "
                  "of fields that define the trained network or the SDE.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host "
                  "runs; on SLURM, Open MPI and TPU pods the cluster is detected from the "
                  "environment, elsewhere give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process "
                    "0's coordinator (default: detected, or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "mode"], lambda f: f["workdir"] is not None or f["mode"] == "describe",
    message="--workdir is required (except with --mode=describe)")


def run(config, workdir: str, mode: str, *, step: int | None = None,
        num_samples: int | None = None, overrides: Sequence[str] | None = None,
        allow_config_change: bool = False) -> dict | None:
  """What `main` does after parsing flags (callable from Python and tests).

  Args:
    config: the config (file + command-line overrides).
    workdir: the run's directory.
    mode: 'train', 'eval', 'sample', 'train_classifier' or 'describe' (then `workdir` is
      unused: the network's `networks.describe`).
    step: checkpoint to resume from (train) or to use (None: the newest intact one).
    num_samples: for 'sample' (>= 1; None: `config.eval.num_samples`).
    overrides: eval / sample: the field paths given on the command line; the run's
      `config.json` supplies every other field. None: `config` is used as given (its
      network and SDE fields must still match the run's).
    allow_config_change: eval / sample: accept network / SDE fields that differ from the run's.

  Raises:
    ValueError / FileNotFoundError: bad input (before anything compiles).
    FloatingPointError: a non-finite loss while training.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown --mode {mode!r}; valid: {MODES}")
  from score_sde.run import experiment
  if mode == "describe":  # the network's parameter count and flops; nothing allocated or run
    from score_sde.run import networks
    experiment.check_config(config, mode="sample")
    return networks.describe(config)
  from score_sde.io import workdir as workdir_lib

  workdir_lib.check_workdir(workdir, must_exist=mode in ("eval", "sample"))
  if num_samples is not None and (isinstance(num_samples, bool) or num_samples < 1):
    raise ValueError(f"--num_samples must be an integer >= 1, got {num_samples!r}")
  if step is not None and step < 0:
    raise ValueError(f"--step must be >= 0, got {step}")
  if mode == "train":  # takes the workdir's lock itself, once the config is checked
    from score_sde.run import train
    state = train.train(config, workdir, step=step)
    return dict(step=int(state.step))
  import jax
  chief = jax.process_index() == 0
  if mode == "train_classifier":  # the noise-conditional classifier of classifier guidance
    from score_sde.run import classifier as classifier_training
    classifier_training.check_training_config(config)  # a latent config: refused first
    experiment.check_config(config, mode="train")
    with workdir_lib.locked(workdir, mode, enabled=chief):  # one writer per workdir
      state = classifier_training.train_classifier(config, workdir)
    return dict(step=int(state.step))
  if mode == "train_autoencoder":  # latent diffusion's phase 1, into WORKDIR/autoencoder/
    from score_sde.run import autoencoder_training
    with workdir_lib.locked(workdir, mode, enabled=chief):
      state = autoencoder_training.train_autoencoder(config, workdir)
    return dict(step=int(state.step))
  from score_sde.run import evaluate
  with workdir_lib.locked(workdir, mode, enabled=chief):
    config = experiment.config_for_run(config, workdir, overrides=overrides,
                                       allow_change=allow_config_change)
    if mode == "eval":
      return evaluate.evaluate(config, workdir, step=step)
    return evaluate.sample(config, workdir, step=step, num_samples=num_samples)


def _initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                            process_id: int | None) -> None:
  """`jax.distributed.initialize`, with Gloo collectives for processes that run on CPUs (so
  that a multi-process run works on one machine too; GPUs and TPUs use their own)."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def execute(config, workdir: str, mode: str, **kwargs) -> int:
  """`run`, with its outcome as an exit status: 0 (the result printed as one JSON line on
  stdout), 2 bad input, 3 non-finite loss or 4 a failed write (one `error: ...` line on
  stderr each)."""
  try:
    result = run(config, workdir, mode, **kwargs)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Bad input: one clear line, no traceback.
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except FloatingPointError as e:  # train.NonFiniteLossError
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_NON_FINITE
  except OSError as e:  # checkpoints.CheckpointSaveError, a full disk, a read-only workdir
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_WRITE_FAILED
  if result is not None:
    print(json.dumps(result, default=str))
  return 0


# ----------------------------------------------------------------------------------------
# Flags.


def _config_file(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing with config-file errors (missing file, syntax error, `get_config`
  raising) and bad flags as one `error: ...` line and exit status 2."""
  path = _config_file(argv)
  if path is not None:
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      print(f"error: --config={path}: no such config file {os.path.abspath(file)}",
            file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
  try:
    rest = FLAGS(argv)
    if path is not None:
      config = FLAGS.config
      if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"get_config returned a {type(config).__name__}, not an "
                        f"ml_collections.ConfigDict")
      config.get("training")  # a config that failed to load raises on first access
  except Exception as e:  # noqa: BLE001 (flags and config files raise anything)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else type(e).__name__
    if isinstance(e, KeyError):  # an override of a field the config does not have
      detail = "unknown config field " + " ".join(str(e.args[0]).replace("'", "").split())
    elif isinstance(e, SyntaxError):
      detail = f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    elif lines and "Error whilst parsing config file" in lines[0]:
      detail = f"get_config raised {detail}"
    other_flag = (str(e).startswith(("flag --", "flags ")) and
                  not str(e).startswith("flag --config="))
    where = "" if path is None or other_flag else f"--config={path}: "
    print(f"error: {where}{detail}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  return rest


def main(argv) -> None:
  del argv
  logs.setup_logging()
  from score_sde.io import compilation_cache
  compilation_cache.enable()  # before anything compiles; SCORE_SDE_CACHE_DIR= turns it off
  if FLAGS.distributed:
    _initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  overrides = None
  if FLAGS.mode not in ("train", "train_autoencoder"):
    overrides = list(config_flags.get_override_values(FLAGS["config"]))
  sys.exit(execute(FLAGS.config, FLAGS.workdir, FLAGS.mode, step=FLAGS.step,
                   num_samples=FLAGS.num_samples, overrides=overrides,
                   allow_config_change=FLAGS.allow_config_change))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
