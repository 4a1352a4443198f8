"""Logs: quiet, readable log lines for the command-line tools (INFO through absl's handler
without the noise of every run, lines that do not tear the tqdm progress bars), and a run's
scalar log (`MetricsWriter`: TensorBoard events and `metrics.jsonl`, each line appended whole
so that a kill never leaves half a line; `read_metrics` skips a torn line with a warning).

    logs.setup_logging()   # once, after flag parsing
    records = logs.read_metrics("WORKDIR/metrics.jsonl")
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np


class QuietLogs(logging.Filter):
  """Drops the noise of every run: orbax's INFO chatter (it logs every save phase), its
  'read only' warnings (evaluation opens checkpoints read-only on purpose) and its errors
  about unreadable step metadata (`checkpoints.restore` reports those), and JAX's INFO line
  about a TPU backend it probed for and did not find."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "/orbax/" in record.pathname:
      # Unreadable step metadata: `checkpoints.restore` warns itself, naming the checkpoint.
      said = ("read only", "read_only=True", "Metadata file")
      return record.levelno >= logging.WARNING and not any(s in message for s in said)
    return not message.startswith("Unable to initialize backend")


class _TqdmStream:
  """A log stream that writes through `tqdm.write`, so log lines and progress bars do not
  interleave."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm
    if text.strip():
      tqdm.write(text.rstrip("\n"), file=self._stream)

  def flush(self) -> None:
    self._stream.flush()

  def close(self) -> None:  # the stream (stderr) is not ours to close
    self.flush()


def setup_logging() -> None:
  """INFO logs through absl's handler, filtered by `QuietLogs`, written around tqdm bars."""
  from absl import logging as absl_logging
  logging.getLogger().setLevel(logging.INFO)
  handler = absl_logging.get_absl_handler()
  for h in {*logging.getLogger().handlers, *logging.getLogger("absl").handlers, handler}:
    h.addFilter(QuietLogs())
  python_handler = handler.python_handler
  python_handler.stream = _TqdmStream(python_handler.stream)


def summary_writer(logdir: str):
  """tensorboardX's `SummaryWriter(logdir)`, imported without PyTorch. tensorboardX imports
  torch, when it is installed, only to accept torch tensors; the writers here log NumPy
  values and Python floats, and that import cost 1.6 s of every run's start-up (2-core CPU,
  torch 2.13). So while tensorboardX loads, `import torch` fails as if torch were absent
  (its own fallback), unless torch is already imported."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricsWriter:
  """The run's scalar and image log: TensorBoard events and `metrics.jsonl` lines, written
  by the chief process only (on the others every call does nothing).

  A record `{"loss": 1.0}` in section "train" at step 5 becomes the TensorBoard scalar
  `train/loss` and the line `{"step": 5, "loss": 1.0}`; in another section, e.g. "eval",
  the scalar `eval/loss` and the key `eval_loss`.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      self._tensorboard = summary_writer(os.path.join(workdir, "tensorboard"))
      _end_torn_line(self.jsonl_path)

  def scalars(self, step: int, section: str, record: dict[str, float]) -> None:
    """Logs `record`'s values at `step`; non-finite ones become `null` in the JSON line."""
    if not self.enabled:
      return
    for name, value in record.items():
      self._tensorboard.add_scalar(f"{section}/{name}", value, step)
    prefix = "" if section == "train" else f"{section}_"
    line = {"step": step, **{prefix + name: _json_number(value) for name, value in record.items()}}
    append_line(self.jsonl_path, json.dumps(line, allow_nan=False))

  def image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self.enabled:
      self._tensorboard.add_image(name, grid, step, dataformats="HWC")

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _json_number(value: float) -> float | None:
  """`value` as a float, or None (JSON `null`) if it is NaN or infinite."""
  value = float(value)
  return value if np.isfinite(value) else None


def append_line(path: str, text: str) -> None:
  """Appends `text` and a newline to `path` (created if missing) in one `os.write` on an
  `O_APPEND` descriptor: the line lands at the end of the file in one piece, even beside
  another writer. A kill can still cut the write that is under way (Linux may stop a write
  to a regular file between pages on a fatal signal), so only the last line of a killed
  writer's file can be torn: `read_metrics` skips it, and a new `MetricsWriter` ends it
  before it appends. Short writes (a full disk) are finished by further writes."""
  data = (text.rstrip("\n") + "\n").encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    while data:
      data = data[os.write(fd, data):]
  finally:
    os.close(fd)


def _end_torn_line(path: str) -> None:
  """Ends a last line left without its newline (a file written by an older version, cut by a
  full disk), so that the next appended line is not glued onto it."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      if f.tell() == 0:
        return
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  except FileNotFoundError:
    return
  if torn:
    append_line(path, "")


def read_metrics(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file, in order.

  A line that is not a JSON object (a line torn by a kill or a full disk) is skipped, with a
  warning naming the file and the line number; every other line is returned.

  Raises:
    FileNotFoundError: no such file.
  """
  records = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
      if not isinstance(record, dict):
        logging.warning("%s: line %d is not a complete JSON record (torn by an interrupt?); "
                        "skipped: %r", path, number, raw[:80])
        continue
      records.append(record)
  return records
