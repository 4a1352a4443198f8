"""Logs: quiet, readable log lines for the command-line tools (INFO through absl's handler
without the noise of every run, lines that do not tear the tqdm progress bars), and a run's
scalar log (`MetricsWriter`: TensorBoard events and `metrics.jsonl`).

    logs.setup_logging()   # once, after flag parsing
"""

from __future__ import annotations

import json
import logging
import os

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
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, section: str, record: dict[str, float]) -> None:
    """Logs `record`'s values at `step`; non-finite ones become `null` in the JSON line."""
    if not self.enabled:
      return
    for name, value in record.items():
      self._tensorboard.add_scalar(f"{section}/{name}", value, step)
    prefix = "" if section == "train" else f"{section}_"
    line = {"step": step, **{prefix + name: _json_number(value) for name, value in record.items()}}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(line, allow_nan=False) + "\n")

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
