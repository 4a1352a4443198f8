"""Shapes and dtypes of a network's variables, kept beside the persistent compilation cache.

Restoring a checkpoint needs the state's shapes first, and `jax.eval_shape` of a network's
initializer traces the whole network (about a second on a CPU for the demo's DDPM++, a large
part of a warm eval or sample start). The persistent compilation cache stores compiled
programs, not such shapes; this module stores them, as one small JSON file per key, in
`<compilation cache dir>/score_sde_shapes/`:

    tree = shape_cache.load(key)          # None: not stored (or unreadable)
    shape_cache.save(key, tree)           # nested dicts of jax.ShapeDtypeStruct

It is on exactly when the compilation cache is (`compilation_cache.enable`). The caller's
key must name everything the shapes depend on (`source_digest` names this package's code
and the library versions); an entry that cannot be read is ignored, and a failed write only
logged: the shapes are then traced, as without the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from score_sde.io import files

SUBDIR = "score_sde_shapes"
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]


def beside_cache(subdir: str) -> str | None:
  """`subdir` of the compilation cache's directory, or None when that cache is off: where
  this module's and `io.executable_cache`'s entries live."""
  cache_dir = jax.config.jax_compilation_cache_dir
  return os.path.join(cache_dir, subdir) if cache_dir else None


def entry_path(where: str | None, key: str, suffix: str) -> str | None:
  """The file of `key` in the directory `where` (its SHA-256, then `suffix`), or None when
  `where` is (the compilation cache off)."""
  if where is None:
    return None
  return os.path.join(where, hashlib.sha256(key.encode()).hexdigest() + suffix)


def directory() -> str | None:
  """Where the entries live, or None when the compilation cache is off."""
  return beside_cache(SUBDIR)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """A digest of this package's Python sources and the jax / jaxlib / flax versions: part of
  every key, so an edit of the code (a network's layers, say) or an upgrade never reads
  shapes stored before it. Computed once per process (the code a process runs is the code
  it imported)."""
  digest = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__} {flax.__version__}"
                          .encode())
  for path in sorted(_PACKAGE.rglob("*.py")):
    digest.update(str(path.relative_to(_PACKAGE)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _to_plain(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _to_plain(v) for k, v in tree.items()}
  return {"shape": list(tree.shape), "dtype": np.dtype(tree.dtype).name}


def _from_plain(plain: Any) -> Any:
  if set(plain) == {"shape", "dtype"} and isinstance(plain["shape"], list):
    return jax.ShapeDtypeStruct(tuple(int(n) for n in plain["shape"]),
                                jnp.dtype(plain["dtype"]))
  return {k: _from_plain(v) for k, v in plain.items()}


def load(key: str) -> Any | None:
  """The tree stored under `key` (nested dicts of `jax.ShapeDtypeStruct`), or None when the
  cache is off, nothing is stored, or the entry cannot be read."""
  path = entry_path(directory(), key, ".json")
  if path is None or not os.path.isfile(path):
    return None
  try:
    with open(path, "rb") as f:
      entry = json.loads(f.read())
    if entry.get("key") != key:  # a hash collision or a foreign file: not ours
      return None
    return _from_plain(entry["tree"])
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    logging.warning("Ignoring the unreadable shape-cache entry %s (%s)", path, e)
    return None


def save(key: str, tree: Any) -> None:
  """Stores `tree` (nested dicts with string keys of arrays or `jax.ShapeDtypeStruct`s:
  only shapes and dtypes are kept) under `key`; nothing when the cache is off. A failed
  write is a warning."""
  path = entry_path(directory(), key, ".json")
  if path is None:
    return
  data = json.dumps({"key": key, "tree": _to_plain(tree)}, sort_keys=True).encode()
  try:
    files.write_atomic(path, lambda f: f.write(data), overwrite=True)
  except OSError as e:
    logging.warning("Could not write the shape-cache entry %s (%s)", path, e)
