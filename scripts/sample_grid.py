"""Puts sample sets of one run side by side in one PNG (e.g. the PC and ODE samplers).

    python scripts/sample_grid.py --workdir=runs/fashion_mnist_vp --out=pc_vs_ode.png pc ode

Reads, for each method, the newest file of the highest step k in `workdir/samples`:
`<method>_step_<k>_<sampler settings>_n<N>[.<i>].npz` (written by
`python -m score_sde.main --mode=sample`; older runs wrote `<method>_step_<k>.npz`).
"""

from __future__ import annotations

import argparse
import glob
import os
import re

import common  # noqa: F401  scripts/common.py; puts the repository root on sys.path
import numpy as np

from score_sde.io import images


def latest_samples(workdir: str, method: str) -> tuple[np.ndarray, int]:
  """The samples of the highest step for `method` (the newest file of that step); raises
  FileNotFoundError if none."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "samples", f"{method}_step_*.npz")):
    match = re.fullmatch(rf"{re.escape(method)}_step_(\d+)(_.*)?\.npz", os.path.basename(path))
    if match:
      step = int(match.group(1))
      if step not in found or os.path.getmtime(path) > os.path.getmtime(found[step]):
        found[step] = path
  if not found:
    raise FileNotFoundError(f"No {method}_step_*.npz in {workdir}/samples; run "
                            f"`python -m score_sde.main --mode=sample "
                            f"--config.sampling.method={method} ...` first")
  step = max(found)
  return np.load(found[step])["samples"], step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("methods", nargs="+", help="sampling methods to show, e.g. pc ode")
  args = parser.parse_args(argv)
  panels = {}
  for method in args.methods:
    x, step = latest_samples(args.workdir, method)
    panels[f"{method} (step {step}, {len(x)} samples)"] = x
  print(images.save_side_by_side(panels, args.out))


if __name__ == "__main__":
  main()
