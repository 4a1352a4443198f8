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
