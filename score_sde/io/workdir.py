"""The run directory: its checks, its `config.json`, and output names that never overwrite.

A workdir holds `config.json` (the config the run was trained with: the source of truth for
evaluation and sampling), `checkpoints/`, `samples/`, `eval/`, `tensorboard/` and
`metrics.jsonl`. Nothing a user made is replaced: outputs get fresh names, and a changed
`config.json` keeps the previous one as `config.<k>.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import re
import socket
import sys
import time

import numpy as np

from score_sde.io import files

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
    ValueError: the file is not valid JSON, not a JSON object, or has null sections.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      plain = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it or start a new --workdir"
                     ) from None
  if not isinstance(plain, dict):
    raise ValueError(f"{path} holds a JSON {type(plain).__name__}, not an object of config "
                     f"sections; restore it (a config.<k>.json beside it is an earlier one) or "
                     f"start a new --workdir")
  empty = sorted(k for k, v in plain.items() if v is None)
  if empty:
    raise ValueError(f"{path}: section(s) {empty} are null; restore it (a config.<k>.json "
                     f"beside it is an earlier one) or start a new --workdir")
  return plain


def save_config(plain: dict, workdir: str) -> str | None:
  """Writes `plain` (a config as plain JSON data) to `config.json`, atomically; an existing,
  different one is first linked to `config.<k>.json` (so at every moment `config.json` is
  either the old file or the new one, and the old one is never lost).

  Returns:
    The path the previous config was kept as, or None.
  """
  path, moved = config_path(workdir), None
  if os.path.isfile(path):
    try:
      with open(path) as f:
        if json.load(f) == plain:
          return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass
    while moved is None:
      candidate = fresh_stem(workdir, "config", (".json",)) + ".json"  # config.<k>.json
      try:
        os.link(path, candidate)
        moved = candidate
      except FileExistsError:  # taken meanwhile: try the next name
        continue
      except OSError:  # no hard links here: a copy, written atomically
        with open(path, "rb") as f:
          data = f.read()
        moved = files.write_atomic(candidate, lambda f: f.write(data))
  files.write_json(path, plain, sort_keys=True, allow_nan=True, overwrite=True)
  return moved


# ----------------------------------------------------------------------------------------
# One owner per workdir.

LOCK_FILE = "lock.json"
# The modes that write a run's checkpoints and config.json share LOCK_FILE; every other
# writing mode (eval, sample, train_classifier) has a lock of its own, so that a run can be
# evaluated or sampled while it trains (as the reference codebase's eval job does), and
# two evaluations of one workdir cannot interleave their files.
CHECKPOINT_WRITERS = ("train", "import")


def lock_file(mode: str) -> str:
  """The lock file's name in a workdir for `mode`: `lock.json` for the checkpoint writers
  (train, import), `lock.<mode>.json` for the others."""
  return LOCK_FILE if mode in CHECKPOINT_WRITERS else f"lock.{mode}.json"


class WorkdirBusyError(ValueError):
  """Another process holds the workdir's lock (a second writer)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  except OSError:
    return True
  return True


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _acquire(path: str, mine: dict) -> dict | None:
  """Puts the lock file `mine` in place if there is none (atomically: a complete file is
  linked to `path`, which fails if it exists); returns None, or the holder's record."""
  try:
    files.write_json(path, mine)
    return None
  except FileExistsError:
    holder = _read_lock(path)
    return {} if holder is None else holder


@contextlib.contextmanager
def locked(workdir: str, mode: str, *, enabled: bool = True):
  """Holds `workdir/lock_file(mode)` (the holder's host, pid and mode) while the body runs:
  one writer of a workdir per kind of output (train and import: the checkpoints and
  config.json; eval, sample and train_classifier: each its own files).

  A lock of a dead process of this host (e.g. after SIGKILL) is taken over with a warning; a
  lock of a live process, or of another host, is a `WorkdirBusyError` naming the holder.
  An import interrupted after its checkpoint was complete is finished first by the next
  checkpoint writer (`finish_import`).

  Args:
    workdir: the run's directory (created if missing).
    mode: what the holder does, for the message of a second writer.
    enabled: False: no lock (the non-chief processes of a multi-host run).

  Raises:
    WorkdirBusyError: another process holds the lock.
  """
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock_file(mode))
  host = socket.gethostname()
  mine = dict(host=host, pid=os.getpid(), mode=mode, since=time.strftime("%Y-%m-%dT%H:%M:%S"))
  for _ in range(3):
    holder = _acquire(path, mine)
    if holder is None:
      break
    pid = holder.get("pid")
    stale = (holder.get("host") == host and isinstance(pid, int) and pid != os.getpid()
             and not _pid_alive(pid))
    if not stale:
      who = (f"{holder.get('mode', '?')} process {pid} on host {holder.get('host')}"
             if holder else "an unreadable lock")
      raise WorkdirBusyError(
          f"--workdir={workdir} is in use by {who} (since {holder.get('since', '?')}); "
          f"wait for it to finish or use another --workdir (if that process is gone, "
          f"remove {path})")
    logging.warning("Taking over the stale lock %s of process %d on %s (no longer running)",
                    path, pid, host)
    aside = f"{path}.stale-{pid}-{os.getpid()}"
    try:
      os.replace(path, aside)
      if _read_lock(aside) != holder:  # another process took it over meanwhile: put it back
        try:
          os.link(aside, path)
        except FileExistsError:
          pass
      os.unlink(aside)
    except FileNotFoundError:
      pass
  else:
    raise WorkdirBusyError(f"--workdir={workdir}: could not take the lock {path}")
  try:
    if mode in CHECKPOINT_WRITERS:
      finish_import(workdir)
    yield
  finally:
    if _read_lock(path) == mine:
      os.unlink(path)


def check_inside(workdir: str, directory: str, what: str) -> None:
  """Raises ValueError if `directory` (e.g. `checkpoints/`) is a symlink, or lies through
  one, outside `workdir`: writing there (retention, set-aside) would change another run."""
  real_workdir = os.path.realpath(workdir)
  real = os.path.realpath(directory)
  if os.path.commonpath([real_workdir, real]) != real_workdir:
    raise ValueError(f"{directory} ({what}) is a symlink to {real}, outside --workdir="
                     f"{workdir}; this run would move or delete files there. Replace the "
                     f"symlink by a directory, or use that run's own --workdir")


# ----------------------------------------------------------------------------------------
# Imports: a new checkpoint is put in place only once complete.

IMPORT_MARKER = "import.pending.json"
SET_ASIDE_DIR = "checkpoints_set_aside"


def keep_aside(workdir: str, name: str) -> str:
  """A fresh path `workdir/checkpoints_set_aside/<name>[.k]`."""
  base = os.path.join(workdir, SET_ASIDE_DIR, name)
  target, k = base, 1
  while os.path.lexists(target):
    target, k = f"{base}.{k}", k + 1
  os.makedirs(os.path.dirname(target), exist_ok=True)
  return target


def exchange(a: str, b: str) -> bool:
  """Swaps the paths `a` and `b` atomically (Linux `renameat2(RENAME_EXCHANGE)`): readers
  see both before or both after, never neither. Returns False (nothing done) where the
  system or file system does not support it."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
    return False
  raise OSError(code, os.strerror(code), a)


NEW_SENTINEL = ".imported-new"  # in a staged checkpoints/ until it is in place


def finish_import(workdir: str) -> list[str]:
  """Completes an import whose staged files are complete (`IMPORT_MARKER` names the staging
  directory): the staged `checkpoints/` and the workdir's are exchanged atomically, the old
  one then moved to `checkpoints_set_aside/checkpoints.before_import[.k]`, and the staged
  `config.json` / `imported_from.json` replace the workdir's (a different old one is kept
  as `config.<k>.json` / `imported_from.<k>.json`). The workdir holds the old checkpoints
  or the new one at every moment (where the file system cannot exchange, two renames leave
  a moment without `checkpoints/`, which this function, called again, repairs), and it is
  idempotent: after an interrupt at any point, calling it again finishes the job.

  Returns:
    The paths old files were moved to.
  """
  marker = os.path.join(workdir, IMPORT_MARKER)
  record = _read_lock(marker)
  if record is None:
    return []
  moved = []
  staging = os.path.join(workdir, str(record.get("staging", "")))
  if not record.get("staging") or not os.path.isdir(staging):
    os.unlink(marker)
    return moved
  staged = os.path.join(staging, "checkpoints")
  current = os.path.join(workdir, "checkpoints")
  if os.path.exists(os.path.join(staged, NEW_SENTINEL)):  # not yet in place
    if not os.path.lexists(current):
      os.rename(staged, current)
    elif not exchange(staged, current):
      target = keep_aside(workdir, "checkpoints.before_import")
      os.rename(current, target)
      moved.append(target)
      os.rename(staged, current)
  if os.path.isdir(staged):  # the old checkpoints, after the exchange
    target = keep_aside(workdir, "checkpoints.before_import")
    os.rename(staged, target)
    moved.append(target)
  if os.path.exists(os.path.join(current, NEW_SENTINEL)):
    os.unlink(os.path.join(current, NEW_SENTINEL))
  for name in ("config.json", "imported_from.json"):
    source = os.path.join(staging, name)
    if not os.path.isfile(source):
      continue
    with open(source) as f:
      plain = json.load(f)
    target = os.path.join(workdir, name)
    if name == CONFIG_FILE:
      previous = save_config(plain, workdir)
    else:
      previous = None
      if os.path.isfile(target) and _read_lock(target) != plain:
        previous = fresh_stem(workdir, "imported_from", (".json",)) + ".json"
        os.link(target, previous)
      files.write_json(target, plain, overwrite=True)
    if previous:
      moved.append(previous)
    os.unlink(source)
  for name in os.listdir(staging):  # orbax's leftovers of a complete save (none expected)
    path = os.path.join(staging, name)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
  try:
    os.rmdir(staging)
  except OSError:
    pass
  os.unlink(marker)
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
