"""Quiet, readable logs for the command-line tools: INFO through absl's handler without the
noise of every run, and log lines that do not tear the tqdm progress bars.

    logs.setup_logging()   # once, after flag parsing
"""

from __future__ import annotations

import logging


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
