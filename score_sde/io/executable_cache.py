"""Compiled executables kept beside the persistent compilation cache, so a warm start neither
traces nor lowers its big programs.

JAX's persistent compilation cache is keyed by the lowered program: a warm start still traces
the Python function and lowers it to StableHLO before the cache can answer (about 4 s for the
demo's ODE sampler on 2 CPU cores). This module stores the compiled executable itself
(`jax.experimental.serialize_executable`) under a key the caller builds without tracing,
one file per key in `<compilation cache dir>/score_sde_executables/`:

    compiled = executable_cache.load(key)      # a jax.stages.Compiled, or None
    compiled = executable_cache.compile(jax.jit(f).lower(*args))   # storable
    executable_cache.save(key, compiled)

It is on exactly when the compilation cache is (`compilation_cache.enable`). The key must
name everything the program depends on besides its inputs' types; `environment()` gives
the part common to every program: this package's sources and the jax / jaxlib / flax
versions (`shape_cache.source_digest`), `XLA_FLAGS`, every `jax.config` value, and the
backend's platform, version, device kinds and counts. A program whose output holds a pytree
node that is not a tuple, list, dict or None cannot be stored (its tree does not survive
pickling: e.g. a `diffrax.RESULTS` item; return its code instead) and is refused by `save`.
An entry that cannot be read or loaded is ignored with a log line (the caller compiles, as
without the cache), and a failed write is only logged.

The entries are pickles read back with Python's unpickler (`deserialize_and_load` itself is
one): as JAX's documentation warns of its compilation cache, whoever can write to the cache
directory can make this process run code. Keep it private.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from score_sde.io import files, shape_cache

SUBDIR = "score_sde_executables"


def directory() -> str | None:
  """Where the entries live, or None when the compilation cache is off."""
  return shape_cache.beside_cache(SUBDIR)


def environment() -> str:
  """What every compiled program depends on besides its own code and inputs: this package's
  sources and library versions, the XLA flags, every `jax.config` value (x64, matmul
  precision, PRNG implementation, ...), and the devices (platform, its version, each
  device's kind, the local and global device counts, the process count)."""
  devices = jax.devices()
  backend = devices[0].client
  settings = ";".join(f"{name}={value!r}" for name, value in sorted(jax.config.values.items()))
  return (f"code={shape_cache.source_digest()} xla_flags={os.environ.get('XLA_FLAGS', '')!r} "
          f"libtpu_init_args={os.environ.get('LIBTPU_INIT_ARGS', '')!r} "
          f"platform={backend.platform} platform_version={backend.platform_version!r} "
          f"devices={[d.device_kind for d in devices]} local={jax.local_device_count()} "
          f"processes={jax.process_count()} jax_config={settings}")


def _plain_tree(treedef) -> bool:
  """Whether every inner node of `treedef` is a tuple, list, dict or None: the trees whose
  pickle reads back as the same tree (a custom node's pickled aux data may not)."""
  if jax.tree_util.treedef_is_leaf(treedef):
    return True
  node_type, _ = treedef.node_data()
  return (node_type in (tuple, list, dict, type(None))
          and all(_plain_tree(child) for child in treedef.children()))


def compile(lowered) -> Any:  # noqa: A001  (the verb of jax.stages.Lowered)
  """`lowered.compile()` for a `jax.stages.Lowered`, as an executable that `save` can store.

  Compiled as a plain call would (through JAX's persistent compilation cache). When XLA did
  not compile it afresh (JAX's cache answered, or the lowering held an executable already),
  it is compiled again with JAX's cache off and `xla_embed_ir_in_executable` (which changes
  no code, only what the executable carries): with this JAX (0.10) on the CPU, an executable
  that JAX's cache answered serializes without its kernels, and the copy read back fails
  when it runs ("NOT_FOUND: Function sine_reduce_fusion not found"); so did one compiled
  again in the same process with the same options. The second compile is paid once per
  key, by the process that stores it."""
  events = []

  def on_event(name, *args, **kwargs):
    if name in ("/jax/compilation_cache/cache_hits", "/jax/core/compile/backend_compile_duration"):
      events.append(name)

  jax.monitoring.register_event_listener(on_event)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    compiled = lowered.compile()
  finally:
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_event)
  if events == ["/jax/core/compile/backend_compile_duration"]:  # compiled here, no cache hit
    return compiled
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  jax_compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used
  try:
    return lowered.compile(compiler_options={"xla_embed_ir_in_executable": True})
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    jax_compilation_cache.reset_cache()


def load(key: str) -> Any | None:
  """The `jax.stages.Compiled` stored under `key`, loaded onto the devices it was compiled
  for (by id), or None
  when the cache is off, nothing is stored, or the entry cannot be read or loaded (logged)."""
  path = shape_cache.entry_path(directory(), key, ".pkl")
  if path is None or not os.path.isfile(path):
    return None
  try:
    with open(path, "rb") as f:
      entry = pickle.loads(f.read())
    if entry["key"] != key:  # a hash collision or a foreign file: not ours
      return None
    by_id = {d.id: d for d in jax.local_devices()}
    devices = [by_id[i] for i in entry["device_ids"]]  # a KeyError: not these devices
    return serialize_executable.deserialize_and_load(
        entry["executable"], entry["in_tree"], entry["out_tree"],
        execution_devices=devices)
  except Exception as e:  # noqa: BLE001  a corrupt file fails in pickle, XLA or anywhere
    logging.warning("Ignoring the unreadable executable-cache entry %s (%s: %s); compiling "
                    "instead", path, type(e).__name__, e)
    return None


def save(key: str, compiled: Any) -> bool:
  """Stores `compiled` (a `jax.stages.Compiled`) and the ids of the devices it runs on under
  `key`; nothing when the cache is off or in a multi-process run.
  Returns whether it was written. A program that cannot be serialized (its output tree has
  other nodes than tuples, lists, dicts and None, or XLA refuses) or a failed write is a
  warning."""
  path = shape_cache.entry_path(directory(), key, ".pkl")
  if path is None:
    return False
  if jax.process_count() > 1:  # the executable's devices are this process's: one host only
    return False
  if not (_plain_tree(compiled.in_tree) and _plain_tree(compiled.out_tree)):
    logging.warning("Not storing the executable of key %.80s...: its inputs or outputs are "
                    "not plain tuples, lists and dicts", key)
    return False
  try:
    executable, in_tree, out_tree = serialize_executable.serialize(compiled)
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    data = pickle.dumps({"key": key, "executable": executable, "in_tree": in_tree,
                         "out_tree": out_tree, "device_ids": device_ids},
                        protocol=pickle.HIGHEST_PROTOCOL)
  except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as e:
    logging.warning("Could not serialize the executable of key %.80s... (%s)", key, e)
    return False
  try:
    files.write_atomic(path, lambda f: f.write(data), overwrite=True)
  except OSError as e:
    logging.warning("Could not write the executable-cache entry %s (%s)", path, e)
    return False
  return True
