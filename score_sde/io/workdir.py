"""The run directory: its checks, its `config.json`, and output names that never overwrite.

A workdir holds `config.json` (the config the run was trained with: the source of truth for
evaluation and sampling), `checkpoints/`, `samples/`, `eval/`, `tensorboard/` and
`metrics.jsonl`. Nothing a user made is replaced: outputs get fresh names, and a changed
`config.json` keeps the previous one as `config.<k>.json`.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

CONFIG_FILE = "config.json"


def check_workdir(workdir: str, *, must_exist: bool = False) -> None:
  """Raises ValueError if `workdir` is a file (or otherwise not a directory), and
  FileNotFoundError if `must_exist` and it does not exist."""
  if not workdir:
    raise ValueError("--workdir must name a directory, got an empty string")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory; give the run's "
                     f"directory")
  if must_exist and not os.path.isdir(workdir):
    raise FileNotFoundError(f"No run in --workdir={workdir} (no such directory); train first "
                            f"(--mode=train with that --workdir)")


def fresh_stem(directory: str, stem: str, suffixes: tuple[str, ...]) -> str:
  """`directory/stem` if no `stem + suffix` exists there, else `directory/stem.<k>` with the
  smallest k >= 1 for which none does (e.g. for an `.npz` + `.png` pair)."""
  base = os.path.join(directory, stem)
  candidate, k = base, 1
  while any(os.path.exists(candidate + s) for s in suffixes):
    candidate, k = f"{base}.{k}", k + 1
  return candidate


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def load_config(workdir: str) -> dict | None:
  """The run's saved config as a plain dict (None: no `config.json`).

  Raises:
    ValueError: the file is not valid JSON.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it or start a new --workdir"
                     ) from None


def save_config(plain: dict, workdir: str) -> str | None:
  """Writes `plain` (a config as plain JSON data) to `config.json`; an existing, different
  one is kept as `config.<k>.json`.

  Returns:
    The path the previous config was moved to, or None.
  """
  path, moved = config_path(workdir), None
  if os.path.isfile(path):
    try:
      with open(path) as f:
        if json.load(f) == plain:
          return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass
    moved = fresh_stem(workdir, "config", (".json",)) + ".json"  # config.<k>.json
    os.replace(path, moved)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(plain, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return moved


def latest_samples(workdir: str, method: str) -> tuple[np.ndarray, int]:
  """`(samples, step)`: the samples of the highest step k for `method` in `workdir/samples`,
  from the newest file of that step, `<method>_step_<k>[_<settings>].npz` (what
  `--mode=sample` writes).

  Raises:
    FileNotFoundError: there is none.
  """
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
