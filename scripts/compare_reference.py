"""This project against the reference PyTorch implementation on the same network, one command:
forward and train-step images/s side by side, as a Markdown table.

    python scripts/compare_reference.py --reference_dir=PATH/score_sde_pytorch \\
        --config=configs/cifar10_vp.py:small --batch_size=32

Runs, one after the other, each in a fresh process: `scripts/benchmark.py` on 1 device and
on `--devices` simulated devices (XLA:CPU runs each simulated device's share of the batch on
one core, so on a CPU the devices are how this project uses the cores; the demo uses as many
as there are cores), then `scripts/benchmark_reference.py` with `--threads` torch threads.
Prints each measurement's JSON line as it comes and the table at the end. Needs torch and a
checkout of yang-song/score_sde_pytorch.

Each side runs with its project's CPU default: this project with TCMalloc preloaded when
Debian's libtcmalloc-minimal4 is installed (as `scripts/cpu_env.sh` does for the demo and the
tests), the reference with the system allocator. `--preload_ours` / `--preload_reference`
set the library each side preloads ('' for none), e.g. the same for both.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from absl import app, flags

from score_sde.run import cli

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
TCMALLOC = next(iter(sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4"))), "")

FLAGS = flags.FLAGS
flags.DEFINE_string("reference_dir", None, "Checkout of yang-song/score_sde_pytorch.")
flags.DEFINE_string("config", "configs/cifar10_vp.py:small", "This project's config[:variant].")
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("runs", 5, "Timed calls (median).", lower_bound=1)
flags.DEFINE_integer("devices", os.cpu_count(), "Simulated devices of this project's "
                     "data-parallel run.", lower_bound=1)
flags.DEFINE_integer("threads", os.cpu_count(), "torch threads.", lower_bound=1)
flags.DEFINE_string("preload_ours", TCMALLOC, "LD_PRELOAD of this project's runs ('' for none).")
flags.DEFINE_string("preload_reference", "", "LD_PRELOAD of the reference's run ('' for none).")
flags.mark_flags_as_required(["reference_dir"])


def run(args: list[str], env: dict | None = None) -> list[dict]:
  """The JSON lines a script prints (echoed as they come)."""
  out = subprocess.run([sys.executable, *args], env={**os.environ, **(env or {})},
                       capture_output=True, text=True, check=True).stdout
  lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  for line in lines:
    print(json.dumps(line), flush=True)
  return lines


def compare(args) -> None:
  """Runs the three measurements and prints the table (`args`: the flags)."""
  common_args = [f"--config={args.config}", f"--batch_size={args.batch_size}",
                 f"--runs={args.runs}"]
  rows = []  # (label, forward images/s, train images/s)
  for devices in sorted({1, args.devices}):
    xla_flags = os.environ.get("XLA_FLAGS", "")
    env = {"XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices}",
           "LD_PRELOAD": args.preload_ours}
    lines = run([os.path.join(SCRIPTS, "benchmark.py"), *common_args, f"--devices={devices}"],
                env)
    by_mode = {line["mode"]: line["images_per_s"] for line in lines}
    rows.append((f"this project, {devices} device{'s' * (devices > 1)}"
                 + (f", {os.path.basename(args.preload_ours)}" if args.preload_ours else ""),
                 by_mode["forward"], by_mode["train_step"]))
  lines = run([os.path.join(SCRIPTS, "benchmark_reference.py"), *common_args,
               f"--reference_dir={args.reference_dir}", f"--threads={args.threads}"],
              {"LD_PRELOAD": args.preload_reference})
  by_mode = {line["mode"]: line["images_per_s"] for line in lines}
  reference = (by_mode["forward"], by_mode["train_step"])
  rows.append((f"score_sde_pytorch, {args.threads} threads"
               + (f", {os.path.basename(args.preload_reference)}" if args.preload_reference
                  else ""), *reference))

  print(f"\n{args.config}, batch {args.batch_size}, images/s (median of {args.runs} calls)\n")
  print("| | forward | train step | forward vs reference | train vs reference |")
  print("|---|---|---|---|---|")
  for label, forward, train in rows:
    print(f"| {label} | {forward:.1f} | {train:.1f} | {forward / reference[0]:.2f}x | "
          f"{train / reference[1]:.2f}x |")


def main(argv) -> None:
  del argv
  sys.exit(cli.execute(lambda: compare(FLAGS)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
