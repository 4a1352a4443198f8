"""Cold and warm start-up: wall time of a one-step training run, with an empty and then a
filled persistent compilation cache.

    python scripts/startup_benchmark.py --config=configs/fashion_mnist_vp.py
    python scripts/startup_benchmark.py --config=configs/cifar10_vp.py:tiny \\
        --override=data.dataset=synthetic

Each run is a fresh process (`python -m score_sde.main --mode=train`) in a fresh workdir that
trains one step with snapshot sampling and the periodic eval off, so its wall time is the time to the first step plus one checkpoint save.
The first run compiles into an empty cache directory, the later ones load from it. Prints
one JSON line per run and a summary line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from score_sde.run import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file, optionally ':tiny' (passed to score_sde.main).")
flags.DEFINE_multi_string("override", [], "Config override section.field=value (repeatable).")
flags.DEFINE_integer("warm_runs", 2, "Runs after the cold one.", lower_bound=0)
flags.mark_flags_as_required(["config"])

ROOT = pathlib.Path(__file__).resolve().parents[1]


def one_run(config: str, overrides: list[str], workdir: str, cache_dir: str) -> float:
  """Seconds of one fresh one-step training process."""
  cmd = [sys.executable, "-m", "score_sde.main", f"--config={config}", f"--workdir={workdir}",
         "--mode=train", "--config.training.snapshot_sampling=False",
         "--config.training.eval_freq=1000000", "--config.training.n_iters=1",
         *(f"--config.{o}" for o in overrides)]
  env = dict(os.environ, SCORE_SDE_CACHE_DIR=cache_dir)
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f"run failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return seconds


def main(argv) -> None:
  del argv

  with tempfile.TemporaryDirectory(prefix="score_sde_startup_") as tmp:
    cache = os.path.join(tmp, "cache")
    times = []
    for i in range(1 + FLAGS.warm_runs):
      seconds = one_run(FLAGS.config, FLAGS.override, os.path.join(tmp, f"run{i}"), cache)
      times.append(seconds)
      print(json.dumps({"config": FLAGS.config, "run": "cold" if i == 0 else "warm",
                        "seconds": round(seconds, 2)}), flush=True)
  warm = min(times[1:]) if len(times) > 1 else float("nan")
  print(json.dumps({"config": FLAGS.config, "cold_s": round(times[0], 2),
                    "warm_s": round(warm, 2), "warm_over_cold": round(warm / times[0], 3)}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
