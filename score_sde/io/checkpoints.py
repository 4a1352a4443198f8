"""Checkpoints of a train state with orbax-checkpoint: save, restore, resume.

A workdir holds `checkpoints/<step>/`, one directory per saved step. Orbax writes each one
into a temporary directory and renames it only once complete, so a crash (or SIGKILL) during
a save leaves the previous checkpoints intact and the partial one invisible to `latest_step`.

A checkpoint that cannot be read (truncated, overwritten) is skipped with a warning naming it:
`restore` falls back to the newest intact one. A checkpoint whose arrays do not fit the
network of the config (other shapes or names) is a `CheckpointMismatchError`, not a fallback.

Retention: the `keep` most recent checkpoints (the preemption checkpoints) plus every step
that is a multiple of `keep_period` (the snapshots evaluated later), as in the reference
codebase's split between `checkpoints-meta` and `checkpoints`.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from score_sde.io import workdir as workdir_lib

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """Where the checkpoints of `workdir` live."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether `workdir/checkpoints` holds a (complete or not) checkpoint directory."""
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


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
  if not read_only:  # retention deletes: only inside this run
    workdir_lib.check_inside(os.fspath(workdir), checkpoint_dir(workdir), "its checkpoints")
  cm = ocp.checkpoint_managers
  policies = [cm.LatestN(n=keep)]
  if keep_period:
    policies.append(cm.EveryNSteps(interval_steps=int(keep_period)))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies), create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  directory = checkpoint_dir(workdir)
  try:
    return ocp.CheckpointManager(directory, options=options)
  except (ValueError, TypeError, KeyError) as e:
    # orbax reads every step's _CHECKPOINT_METADATA when it opens the directory; a file that
    # is valid JSON but not an object (a corrupted one) stops it before any restore is tried.
    bad = [name for name in sorted(os.listdir(directory)) if name.isdigit()
           and not _metadata_is_object(os.path.join(directory, name))]
    if not bad:
      raise
    raise FileNotFoundError(
        f"No intact checkpoint in {directory} can be opened: the metadata of step(s) "
        f"{[int(b) for b in bad]} is corrupt ({_short(e)}); move those step folders out of "
        f"{directory} (the others are then tried in order)") from None


def _metadata_is_object(step_dir: str) -> bool:
  """Whether `step_dir/_CHECKPOINT_METADATA` is missing, unparsable (orbax skips both) or a
  JSON object (what orbax reads); False for valid JSON of another type."""
  try:
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "rb") as f:
      value = json.loads(f.read())
  except (OSError, ValueError):
    return True
  return isinstance(value, dict)


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (disk full, no permission, ...): the message names the
  directory and the error; the checkpoints saved before are untouched."""


def _save_error(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointSaveError:
  directory = os.fspath(manager.directory)
  last = manager.latest_step()
  reason = _short(error)
  code = re.search(r"os_error_code='(\d+)'", str(error))  # tensorstore's errors
  if code:
    reason = f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  for cause in (error, getattr(error, "__cause__", None)):  # the OS's words, if any
    if isinstance(cause, OSError) and cause.strerror:
      reason = f"[Errno {cause.errno}] {cause.strerror} ({cause.filename or directory})"
  return CheckpointSaveError(
      f"Saving a checkpoint into {directory} failed: {reason}. Last intact checkpoint: "
      f"{'step ' + str(last) if last is not None else 'none'} (untouched). Free space or fix "
      f"the permissions, then run again to resume")


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` (any pytree of arrays) as checkpoint `step` (asynchronously: the call
  returns once the arrays are copied; the write finishes in the background).

  Raises:
    CheckpointSaveError: this save, or an earlier one still finishing in the background,
      failed (e.g. ENOSPC, EACCES).
  """
  try:
    manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
  except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise ValueError, OSError, ...)
    raise _save_error(manager, e) from e


def check_saves(manager: ocp.CheckpointManager, *, wait: bool = False) -> None:
  """Raises CheckpointSaveError if a background save has failed (`wait`: after waiting for
  the pending one)."""
  try:
    if wait:
      manager.wait_until_finished()
    else:
      manager.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise _save_error(manager, e) from e


def finish_saves(manager: ocp.CheckpointManager, finished: bool) -> None:
  """Waits for the pending background save, then closes `manager`.

  `finished`: the loop ran to its end, so its last save must be complete (CheckpointSaveError
  otherwise); else an error is already being raised, which wins, and a failed save is only
  logged."""
  try:
    if finished:
      check_saves(manager, wait=True)
    else:
      try:
        manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001
        logging.warning("A background checkpoint save failed too: %s", _short(e))
  finally:
    manager.close()


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the network it is loaded into: an orbax checkpoint holds other
  arrays than the state it is restored into (the config's network or optimizer differs from
  the run's), or a reference checkpoint's keys or shapes do not fit the config's network."""


def _path_name(key) -> str:
  for attribute in ("name", "key", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{"params/Conv_0/kernel": (shape, dtype)}` for every array of a pytree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_path_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in flat}


def _saved_tree(directory: str, step: int) -> Any:
  """The metadata tree of checkpoint `step` (`ocp.metadata.ArrayMetadata` leaves; raises if
  unreadable)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(pathlib.Path(directory, str(step), "default"))
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  if not tree:
    raise ValueError("its metadata cannot be read")
  return tree


def _saved_leaves(directory: str, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """The arrays checkpoint `step` holds, from its metadata (raises if unreadable)."""
  return _leaves(_saved_tree(directory, step))


def _check_fits(saved: dict, expected: dict, step: int, directory: str) -> None:
  """Raises CheckpointMismatchError if the network parameters (by name and shape) or the
  other arrays (by shape) of a checkpoint differ from those expected."""
  # The network's parameters: "params/...", or "ema_params/..." in a restore of the EMA
  # weights alone (`restore(..., partial=True)`).
  prefix = "params/" if any(k.startswith("params/") for k in expected) else "ema_params/"

  def params(table):
    return {k: v for k, v in table.items() if k.startswith(prefix)}

  saved_params, expected_params = params(saved), params(expected)
  differing = sorted(k for k in set(saved_params) | set(expected_params)
                     if saved_params.get(k, (None,))[0] != expected_params.get(k, (None,))[0])
  if differing:
    shown = "; ".join(f"{k}: checkpoint {saved_params[k][0] if k in saved_params else 'none'},"
                      f" config {expected_params[k][0] if k in expected_params else 'none'}"
                      for k in differing[:3])
    raise CheckpointMismatchError(
        f"Checkpoint {step} in {directory} holds another network than the config describes "
        f"({len(differing)} parameter(s) differ, e.g. {shown}): the config's config.model / "
        f"config.data fields differ from those the run was trained with (see its config.json)")
  shapes = sorted(str(v[0]) for v in saved.values())
  if shapes != sorted(str(v[0]) for v in expected.values()):
    raise CheckpointMismatchError(
        f"Checkpoint {step} in {directory} holds another optimizer state than the config "
        f"describes ({len(saved)} vs {len(expected)} arrays): config.optim (optimizer, "
        f"grad_clip on/off) differs from the run's")


def _short(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _saved_names(directory: str, step: int) -> set[str] | None:
  """The array paths ('params/Conv_0/kernel') of checkpoint `step`, from the tree its
  `_METADATA` file lists (JSON, no array opened), or None where that file does not read
  as expected (then the caller reads the metadata the slow way)."""
  try:
    with open(os.path.join(directory, str(step), "default", "_METADATA"), "rb") as f:
      tree = json.loads(f.read())["tree_metadata"]
    return {"/".join(str(k) for k in ast.literal_eval(path)) for path in tree}
  except Exception:  # noqa: BLE001 (any surprise: read it the slow way)
    return None


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any, partial: bool
                  ) -> Any:
  """Checkpoint `step` restored into `target`; with `partial`, only the arrays `target`
  names are read (orbax's partial restore, which leaves a name the checkpoint lacks as it
  was: such a leaf is a mismatch, raised as a ValueError here)."""
  if not partial:
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  restore_args = jax.tree_util.tree_map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape),
      target)
  path = os.path.join(os.fspath(manager.directory), str(step), "default")
  with ocp.PyTreeCheckpointer() as checkpointer:
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True))
  missing = [k for k, leaf in _flat(state).items() if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"checkpoint {step} has no array {missing[0]} ({len(missing)} missing)")
  return state


def _flat(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_path_name(k) for k in path): leaf for path, leaf in flat}


def restore_intact(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
                   *, partial: bool = False) -> tuple[Any, int, list[int]] | None:
  """Like `restore`, and also returns the newer steps that were skipped as unreadable.

  Returns:
    `(state, step, skipped_steps)`, or None when there is no checkpoint (and `step` is None).

  Raises:
    FileNotFoundError: `step` is not there, or no checkpoint could be read (the message lists
      each one tried and why it failed).
    CheckpointMismatchError: a readable checkpoint holds other arrays than `abstract_state`.
  """
  available = sorted(manager.all_steps())
  directory = os.fspath(manager.directory)
  if step is None:
    if not available:
      return None
    candidates = available[::-1]
  elif step not in available:
    raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; "
                            f"available steps: {available or 'none'}")
  else:
    candidates = [int(step)]
  target = jax.tree_util.tree_map(
      lambda a: a if isinstance(a, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
      abstract_state)
  expected, failures = _leaves(target), []
  wanted = {k.split("/")[0] for k in expected}

  def part(names):  # the checkpoint's arrays in the entries the target names
    return {k: names[k] for k in names if k.split("/")[0] in wanted} if partial else names

  for candidate in candidates:
    # Restore first: orbax refuses a target of other names or shapes (a structure or shape
    # mismatch is a ValueError), so the checkpoint's metadata, which takes as long to read as
    # the arrays themselves, is read only to say why a restore failed: another network
    # (CheckpointMismatchError) or an unreadable checkpoint (the next one is tried).
    # A partial restore reads only the arrays named, so the names it would not see (arrays
    # of the checkpoint's that the target lacks) are compared first, from the metadata file.
    try:
      if partial:
        names = _saved_names(directory, candidate)
        if names is None:  # a metadata file of another layout: read it the slow way
          names = set(_saved_leaves(directory, candidate))
        differing = sorted(set(part(dict.fromkeys(names))) ^ set(expected))
        if differing:
          _check_fits(part(_saved_leaves(directory, candidate)), expected, candidate,
                      directory)
          raise CheckpointMismatchError(
              f"Checkpoint {candidate} in {directory} holds other arrays than the config "
              f"describes ({len(differing)} differ, e.g. {differing[0]})")
      state = _restore_step(manager, candidate, target, partial)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 (any read error means: not intact)
      try:
        saved = _saved_leaves(directory, candidate)
      except Exception:  # noqa: BLE001
        saved = None
      if saved is not None:
        _check_fits(part(saved), expected, candidate, directory)
      failures.append((candidate, e))
      logging.warning("Checkpoint %s is unreadable (%s); trying an older one",
                      os.path.join(directory, str(candidate)), _short(e))
      continue
    if failures:
      logging.warning("Restored checkpoint %d, the newest intact one (skipped: %s)", candidate,
                      ", ".join(str(s) for s, _ in failures))
    return state, candidate, [s for s, _ in failures]
  tried = "; ".join(f"step {s}: {_short(e)}" for s, e in failures)
  hint = ("" if step is not None else
          " Move them out of the way (or start a new --workdir) to train from scratch.")
  raise FileNotFoundError(f"No intact checkpoint in {directory}; tried {tried}.{hint}")


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
            *, partial: bool = False) -> tuple[Any, int] | None:
  """Restores a checkpoint into the structure, shapes and shardings of `abstract_state`.

  Args:
    manager: from `get_manager`.
    abstract_state: a pytree like the saved state: arrays or `jax.ShapeDtypeStruct`s (with
      `sharding` set to place the restored arrays), e.g. from `jax.eval_shape`.
    step: the step to restore; None: the latest intact one (unreadable newer ones are
      skipped with a warning).
    partial: `abstract_state` is a dict of some of the saved state's top-level entries
      (e.g. `{"step", "ema_params", "constants"}` of a `TrainState`); only those are read
      and checked (each entry whole: the same arrays by name and shape), the rest of the
      checkpoint is not read. Returns that dict.

  Returns:
    `(state, step)`, or None when there is no checkpoint (and `step` is None).

  Raises:
    FileNotFoundError: `step` was asked for and is not there (the message lists those that
      are), or no checkpoint could be read (the message says what was tried).
    CheckpointMismatchError: the checkpoint's arrays differ from `abstract_state`'s.
  """
  restored = restore_intact(manager, abstract_state, step, partial=partial)
  return None if restored is None else restored[:2]


def restore_as_saved(manager: ocp.CheckpointManager, step: int | None = None, *,
                     sharding: jax.sharding.Sharding | None = None) -> tuple[Any, int] | None:
  """Checkpoint `step` (None: the latest) as it was saved (nested dicts of arrays, no target
  structure needed), or None when there is none.

  Every array is placed by `sharding` (default: the first local device), never by the
  sharding it was saved with: that names the devices of the machine that wrote it, and orbax
  refuses it ("Topology mismatch") where those devices are not, e.g. a checkpoint written on
  2 devices restored on 1. (`restore` places arrays by its target's shardings.)

  Raises:
    FileNotFoundError: `step` is not there (the message lists those that are).
  """
  available = sorted(manager.all_steps())
  if step is None:
    if not available:
      return None
    step = available[-1]
  elif step not in available:
    raise FileNotFoundError(f"No checkpoint for step {step} in {os.fspath(manager.directory)}; "
                            f"available steps: {available or 'none'}")
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
      if isinstance(leaf, ocp.metadata.ArrayMetadata) else leaf,
      _saved_tree(os.fspath(manager.directory), int(step)))
  return manager.restore(int(step), args=ocp.args.StandardRestore(target)), int(step)


SET_ASIDE_DIR = "checkpoints_set_aside"


def set_aside(workdir: str | os.PathLike, steps, reason: str) -> list[str]:
  """Moves checkpoints `steps` of `workdir` to `workdir/checkpoints_set_aside/<step>.<reason>`
  (never deletes: e.g. unreadable ones, or those after the step a run is resumed from).

  Returns:
    The new paths.

  Raises:
    ValueError: `checkpoints/` or `checkpoints_set_aside/` is a symlink leaving `workdir`.
  """
  root = os.path.abspath(os.fspath(workdir))
  workdir_lib.check_inside(root, checkpoint_dir(workdir), "its checkpoints")
  workdir_lib.check_inside(root, os.path.join(root, SET_ASIDE_DIR), "its set-aside folder")
  moved = []
  for step in steps:
    source = os.path.join(checkpoint_dir(workdir), str(step))
    base = os.path.join(os.path.abspath(os.fspath(workdir)), SET_ASIDE_DIR, f"{step}.{reason}")
    target, copy = base, 1
    while os.path.exists(target):
      target, copy = f"{base}.{copy}", copy + 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    moved.append(target)
  return moved
