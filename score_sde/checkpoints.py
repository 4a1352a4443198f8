"""Checkpoints of a train state with orbax-checkpoint: save, restore, resume.

A workdir holds `checkpoints/<step>/`, one directory per saved step. Orbax writes each one
into a temporary directory and renames it only once complete, so a crash (or SIGKILL) during
a save leaves the previous checkpoints intact and the partial one invisible to `latest_step`.

Retention: the `keep` most recent checkpoints (the preemption checkpoints) plus every step
that is a multiple of `keep_period` (the snapshots evaluated later), as in the reference
codebase's split between `checkpoints-meta` and `checkpoints`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """Where the checkpoints of `workdir` live."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def get_manager(workdir: str | os.PathLike, *, keep: int = 2, keep_period: int | None = None,
                read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax `CheckpointManager` for `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    keep: how many of the most recent checkpoints to keep (>= 1).
    keep_period: also keep every checkpoint whose step is a multiple of this (None: none).
    read_only: open for restoring only (evaluation); never creates or deletes anything.

  Returns:
    The manager; close it (or use it as a context manager) so pending saves finish.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  cm = ocp.checkpoint_managers
  policies = [cm.LatestN(n=keep)]
  if keep_period:
    policies.append(cm.EveryNSteps(interval_steps=int(keep_period)))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies), create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` (any pytree of arrays) as checkpoint `step` (asynchronously: the call
  returns once the arrays are copied; the write finishes in the background)."""
  manager.save(int(step), args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, int] | None:
  """Restores a checkpoint into the structure, shapes and shardings of `abstract_state`.

  Args:
    manager: from `get_manager`.
    abstract_state: a pytree like the saved state: arrays or `jax.ShapeDtypeStruct`s (with
      `sharding` set to place the restored arrays), e.g. from `jax.eval_shape`.
    step: the step to restore; None: the latest.

  Returns:
    `(state, step)`, or None when there is no checkpoint (and `step` is None).

  Raises:
    FileNotFoundError: `step` was asked for and is not there (the message lists those that are).
  """
  available = sorted(manager.all_steps())
  if step is None:
    if not available:
      return None
    step = available[-1]
  elif step not in available:
    raise FileNotFoundError(f"No checkpoint for step {step} in {manager.directory}; "
                            f"available steps: {available or 'none'}")
  target = jax.tree_util.tree_map(
      lambda a: a if isinstance(a, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
      abstract_state)
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  return state, int(step)
