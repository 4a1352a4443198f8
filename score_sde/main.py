"""The command line: train, evaluate or sample.

    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp --mode=train
    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp --mode=eval
    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/cifar10_vp \\
        --mode=sample --config.sampling.method=dpm_solver --config.sampling.steps=20

Any config field can be overridden with `--config.<section>.<field>=value`, and
`--config=configs/<file>.py:tiny` picks the file's tiny variant. The config is validated
before anything compiles and saved as `workdir/config.json` (train) so the run is
reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files import their defaults as `from configs import default`: make the repository's
# `configs` package importable wherever the command is started from.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "configs")) and _REPO not in sys.path:
  sys.path.append(_REPO)

MODES = ("train", "eval", "sample")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("step", None, "Checkpoint step for eval / sample (default: latest).")
flags.DEFINE_integer("num_samples", None, "Samples for --mode=sample (default: "
                     "config.eval.num_samples).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host "
                  "runs; on SLURM, Open MPI and TPU pods the cluster is detected from the "
                  "environment, elsewhere give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process "
                    "0's coordinator (default: detected, or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _save_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def run(config, workdir: str, mode: str, *, step: int | None = None,
        num_samples: int | None = None) -> dict | None:
  """What `main` does after parsing flags (callable from Python and tests).

  Raises:
    ValueError: unknown mode or a bad config (before anything compiles).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; valid: {MODES}")
  from score_sde import evaluate, experiment, train  # Heavy imports after flag parsing.

  experiment.check_config(config)
  if mode == "train":
    import jax
    if jax.process_index() == 0:
      _save_config(config, workdir)
    state = train.train(config, workdir)
    return dict(step=int(state.step))
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


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO chatter (it logs every save phase) but keeps its warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietOrbax())
  from score_sde import compilation_cache
  compilation_cache.enable()  # before anything compiles; SCORE_SDE_CACHE_DIR= turns it off
  if FLAGS.distributed:
    _initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    result = run(FLAGS.config, FLAGS.workdir, FLAGS.mode, step=FLAGS.step,
                 num_samples=FLAGS.num_samples)
  except (ValueError, FileNotFoundError) as e:
    # Bad input: one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # train.NonFiniteLossError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if result is not None:
    print(json.dumps(result, default=str))


if __name__ == "__main__":
  app.run(main)
