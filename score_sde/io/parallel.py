"""Data parallelism: the device mesh, sharding host batches over it, gathering results back.

Every compiled function of a run works on a 1-D mesh with axis `"batch"`: batches are
sharded along it, the train state is replicated (the `jit` + `NamedSharding` form of `pmap`).
On several hosts each host feeds its own rows and `to_host` gathers everyone's.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis `"batch"` over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("batch",))


def check_batch(batch_size: int, mesh: Mesh, what: str = "config.training.batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over devices and hosts.

  Args:
    batch_size: the global batch size.
    mesh: the device mesh.
    what: the name of the value in the message (a config field).
  """
  n, hosts = mesh.devices.size, jax.process_count()
  if batch_size % n or batch_size % hosts:
    raise ValueError(f"{what}={batch_size} is not divisible by the number of devices ({n}) "
                     f"and hosts ({hosts}); use a multiple of {n}")


def shard_batch(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
  """Places host-local arrays as one global array sharded over `"batch"` along `axis` (each
  host passes its own rows; on one host, the whole batch)."""
  spec = P(*([None] * axis), "batch")
  sharding = NamedSharding(mesh, spec)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places `tree` replicated on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(tree: Any) -> Any:
  """Global (sharded or replicated) arrays -> numpy arrays with every host's rows, on every
  host (`device_get` alone only reaches this host's devices)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


class Prefetcher:
  """Runs `produce(i)` for i = 0, 1, ... in a background thread, `size` items ahead of the
  consumer, so that host-side batch preparation (reading, stacking, the transfer to the
  devices) overlaps the devices' work on the previous batch.

      with Prefetcher(lambda i: shard_batch(host_batch(i), mesh), count=n) as batches:
        for batch in batches: ...

  Items come out in order. An exception in `produce` is raised in the consumer at the item
  that failed. Leaving the `with` block (or `close()`) stops the thread.
  """

  def __init__(self, produce, count: int, size: int = 2):
    import queue
    import threading

    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._count = count

    def work() -> None:
      for i in range(count):
        try:
          item = (True, produce(i))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
          item = (False, e)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set() or not item[0]:
          return

    self._thread = threading.Thread(target=work, name="prefetch", daemon=True)
    self._thread.start()

  def __iter__(self):
    for _ in range(self._count):
      ok, item = self._queue.get()
      if not ok:
        raise item
      yield item

  def close(self) -> None:
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
