"""Cold and warm start-up of train, eval and sample: wall time of fresh processes with an
empty and then a filled persistent compilation cache.

    python scripts/startup_benchmark.py --config=configs/fashion_mnist_vp.py
    python scripts/startup_benchmark.py --config=configs/cifar10_vp.py:tiny \\
        --override=data.dataset=synthetic --modes=train

Each round runs, each as a fresh process (`python -m score_sde.main`) in a fresh workdir:
  * train: one step, snapshot sampling and the periodic eval off (the final test loss and
    checkpoint stay): the time to the first step plus one eval and one save;
  * eval: bits/dim of one batch of `--eval_examples` test images (probability-flow ODE at
    rtol = atol = `--tol`; the test loss off, so that the time is start-up, not the split);
  * sample: one batch of `--num_samples` with `--sample_method` (default the ODE sampler,
    at the same tolerances for the adaptive one).
The processes inherit this one's environment: for the demo's CPU settings (one simulated
device per core, TCMalloc), run it after `source scripts/cpu_env.sh; one_device_per_core;
use_tcmalloc`, as scripts/demo.sh does. The first round compiles into an empty cache
directory, the later ones load from it. Prints
one JSON line per process and, per mode, a summary line with warm / cold (best warm round).
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
flags.DEFINE_integer("warm_runs", 2, "Rounds after the cold one.", lower_bound=0)
flags.DEFINE_list("modes", ["train", "eval", "sample"], "Modes to time, in this order "
                  "(eval and sample need train first).")
flags.DEFINE_string("sample_method", "ode", "config.sampling.method of the sample mode.")
flags.DEFINE_integer("num_samples", 8, "Samples drawn (one batch).", lower_bound=1)
flags.DEFINE_integer("eval_examples", 8, "Test images of the bits/dim (one batch).",
                     lower_bound=1)
flags.DEFINE_float("tol", 1e-3, "rtol = atol of the ODE solves (bits/dim, ode sampler).",
                   lower_bound=0)
flags.mark_flags_as_required(["config"])

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("train", "eval", "sample")


def mode_flags(mode: str) -> list[str]:
  """The command-line flags of one timed process of `mode` (besides config and workdir)."""
  if mode == "train":
    return ["--mode=train", "--config.training.snapshot_sampling=False",
            "--config.training.eval_freq=1000000", "--config.training.n_iters=1"]
  if mode == "eval":
    n = FLAGS.eval_examples
    return ["--mode=eval", "--config.eval.enable_loss=False", "--config.eval.enable_bpd=True",
            f"--config.eval.batch_size={n}", f"--config.eval.bpd_num_examples={n}",
            f"--config.eval.bpd_rtol={FLAGS.tol}", f"--config.eval.bpd_atol={FLAGS.tol}"]
  n = FLAGS.num_samples
  out = ["--mode=sample", f"--config.sampling.method={FLAGS.sample_method}",
         f"--config.sampling.batch_size={n}", f"--num_samples={n}"]
  if FLAGS.sample_method == "ode":
    out += [f"--config.sampling.rtol={FLAGS.tol}", f"--config.sampling.atol={FLAGS.tol}"]
  return out


def one_run(mode: str, workdir: str, cache_dir: str) -> float:
  """Seconds of one fresh process."""
  cmd = [sys.executable, "-m", "score_sde.main", f"--config={FLAGS.config}",
         f"--workdir={workdir}", *mode_flags(mode), *(f"--config.{o}" for o in FLAGS.override)]
  env = dict(os.environ, SCORE_SDE_CACHE_DIR=cache_dir)
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f"{mode} run failed ({out.returncode}): {' '.join(cmd)}\n"
                     f"{out.stderr[-3000:]}")
  return seconds


def main(argv) -> None:
  del argv
  unknown = [m for m in FLAGS.modes if m not in MODES]
  if unknown or not FLAGS.modes:
    raise app.UsageError(f"--modes: unknown {unknown or FLAGS.modes}; valid: {list(MODES)}")
  if FLAGS.modes[0] != "train":
    raise app.UsageError("--modes must start with train (eval and sample read its checkpoint)")
  times: dict[str, list[float]] = {m: [] for m in FLAGS.modes}
  with tempfile.TemporaryDirectory(prefix="score_sde_startup_") as tmp:
    cache = os.path.join(tmp, "cache")
    for i in range(1 + FLAGS.warm_runs):
      workdir = os.path.join(tmp, f"run{i}")
      for mode in FLAGS.modes:
        seconds = one_run(mode, workdir, cache)
        times[mode].append(seconds)
        print(json.dumps({"config": FLAGS.config, "mode": mode,
                          "run": "cold" if i == 0 else "warm", "seconds": round(seconds, 2)}),
              flush=True)
  for mode, t in times.items():
    warm = min(t[1:]) if len(t) > 1 else float("nan")
    print(json.dumps({"config": FLAGS.config, "mode": mode, "cold_s": round(t[0], 2),
                      "warm_s": round(warm, 2), "warm_over_cold": round(warm / t[0], 3)}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
