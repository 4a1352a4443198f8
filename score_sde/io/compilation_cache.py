"""JAX's persistent compilation cache, on by default for the command-line tools.

A restarted or resumed run, an eval and a second sample command compile the same XLA
programs as the run before them; with the cache they load them from disk instead.

    cache_dir = compilation_cache.enable()     # before the first compilation

The directory is `~/.cache/score_sde/jax`, or `$SCORE_SDE_CACHE_DIR`; an empty
`SCORE_SDE_CACHE_DIR` turns the cache off. A directory that cannot be written is a warning,
and the run goes on without the cache. As JAX's documentation warns, whoever can write to the
cache directory can make this process run code: keep it private.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Mapping

ENV_VAR = "SCORE_SDE_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "score_sde", "jax")


def cache_dir_from_env(environ: Mapping[str, str] | None = None) -> str | None:
  """The cache directory `environ` asks for (default: `os.environ`): `$SCORE_SDE_CACHE_DIR`
  if set (None when it is empty: the cache is off), else `~/.cache/score_sde/jax`. The
  path is user- and variable-expanded and absolute."""
  environ = os.environ if environ is None else environ
  path = environ.get(ENV_VAR, DEFAULT_DIR)
  if not path.strip():
    return None
  return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def _writable(path: str) -> str | None:
  """None if `path` exists (or can be made) as a directory we can write to, else why not."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    return f"{type(e).__name__}: {e}"
  return None


def enable(cache_dir: str | None = None, *, min_compile_time_secs: float = 0.0,
           environ: Mapping[str, str] | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; call it before the first compilation.

  Args:
    cache_dir: the directory; None: from the environment (`cache_dir_from_env`).
    min_compile_time_secs: programs that compile faster than this are not stored. 0 (JAX's
      own default is 1 s): a start-up compiles a handful of sub-second programs (the run's
      keys: `jit__threefry_split`, `jit_unstack`, `jit__threefry_fold_in`, ...) that would
      otherwise be compiled again by every process; loading one costs a few milliseconds.
    environ: the environment to read when `cache_dir` is None (default: `os.environ`).

  Returns:
    The cache directory in use, or None when the cache is off (asked for by an empty
    `SCORE_SDE_CACHE_DIR`, or the directory cannot be written: then a warning is logged).
  """
  import jax

  path = cache_dir_from_env(environ) if cache_dir is None else cache_dir
  if path is None:
    return None
  problem = _writable(path)
  if problem is not None:
    logging.warning("Compilation cache directory %s cannot be written (%s); running without "
                    "the persistent compilation cache. Set %s to a writable directory, or to "
                    "an empty value to turn the cache off.", path, problem, ENV_VAR)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
