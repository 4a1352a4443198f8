"""Atomic writes that never replace a user's file.

Every file this project writes for a user (a run's `config.json`, `imported_from.json`,
metrics, `.npz` samples, PNG grids, exported checkpoints) goes through `write_atomic`: the
bytes are written to a temporary file in the same directory, flushed to disk (fsync), and
only then put in place under their name. An interrupt (Ctrl-C, SIGTERM, SIGKILL) or a full
disk at any moment leaves either no file (or the old one) or the complete new one, never a
torn file; a leftover temporary file is named `.<name>.tmp-<pid>-<random>`.

An existing file is never replaced unless the caller says so (`overwrite=True`, which the
command-line tools tie to a flag): the new file is linked into place with `os.link`, which
fails if the name exists, so even two writers racing for one name cannot replace each
other's file.

    files.write_atomic(path, lambda f: f.write(data))                  # bytes
    files.write_json(path, {"a": 1})
    files.save_npz(path, samples=x)
    files.write_atomic(path, write, overwrite=True, flag="--overwrite")  # replaces
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from typing import Any, Callable, IO

import numpy as np


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def exists_error(path: str, flag: str | None) -> FileExistsError:
  """The error for an output `path` that exists (naming `flag`, the option that allows
  replacing it, if there is one)."""
  allow = (f"pass {flag} to replace it" if flag else "it is never replaced")
  return FileExistsError(f"{path} already exists; {allow}, or choose another name")


def check_new(path: str | os.PathLike, *, overwrite: bool = False, flag: str | None = None
              ) -> str:
  """Raises FileExistsError if `path` exists and `overwrite` is False (the check to make
  before any work whose result goes to `path`), and ValueError if it is a directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; give a file name")
  if os.path.lexists(path) and not overwrite:
    raise exists_error(path, flag)
  return path


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *,
                 overwrite: bool = False, flag: str | None = None) -> str:
  """Writes a file atomically: `write(f)` fills a temporary file next to `path` (binary
  mode), which is fsync-ed and then moved to `path`.

  Args:
    path: the file to write (its directory is created if missing).
    write: called with the open temporary file.
    overwrite: replace an existing `path` (atomically: readers see the old or the new file).
    flag: the command-line option that sets `overwrite`, named in the error.

  Returns:
    `path`.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False (nothing written).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  check_new(path, overwrite=overwrite, flag=flag)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory,
                     f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    with open(tmp, "xb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)  # fails if `path` exists: never replaces
      except FileExistsError:
        raise exists_error(path, flag) from None
      except OSError as e:  # a file system without hard links
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                           errno.EMLINK):
          raise
        if os.path.lexists(path):
          raise exists_error(path, flag) from None
        os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)
  _fsync_directory(directory)
  return path


def write_text(path: str | os.PathLike, text: str, **kwargs) -> str:
  """`text` (UTF-8) to `path` with `write_atomic` (same keyword arguments)."""
  return write_atomic(path, lambda f: f.write(text.encode("utf-8")), **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False,
               allow_nan: bool = False, **kwargs) -> str:
  """`obj` as JSON (strict unless `allow_nan`) to `path` with `write_atomic`."""
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
  return write_text(path, text + "\n", **kwargs)


def save_npz(path: str | os.PathLike, *, overwrite: bool = False, flag: str | None = None,
             **arrays: np.ndarray) -> str:
  """`np.savez_compressed(path, **arrays)` with `write_atomic`."""
  return write_atomic(path, lambda f: np.savez_compressed(f, **arrays), overwrite=overwrite,
                      flag=flag)
