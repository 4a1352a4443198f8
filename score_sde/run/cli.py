"""What the command-line tools under scripts/ share with `score_sde.main`: absl flag parsing
whose errors are one `error: ...` line and exit status 2, and bad input raised later (a
ValueError or FileNotFoundError) reported the same way.

    from absl import app, flags
    from score_sde.run import cli

    flags.DEFINE_integer("num_samples", 64, "Samples, >= 1.", lower_bound=1)

    def main(argv):
      cli.setup()
      sys.exit(cli.execute(lambda: do_the_work(FLAGS.num_samples)))

    if __name__ == "__main__":
      app.run(main, flags_parser=cli.parse_flags)

Flag values are checked while parsing (absl's `lower_bound` / `upper_bound`, `DEFINE_enum`,
`flags.register_validator`, and `check_flag` with the checks below: `choice`, `existing_file`,
`new_file_in_existing_dir`, `seed`), before anything compiles.

    cli.check_flag("format", cli.choice(reference.FORMATS))
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import flags
import ml_collections

from score_sde.checks import check_choice
from score_sde.io import logs

EXIT_BAD_INPUT, EXIT_WRITE_FAILED = 2, 4
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)

FLAGS = flags.FLAGS


def one_line(error: BaseException) -> str:
  """The error's message on one line."""
  return " ".join(str(error).split())


def _config_file(argv: Sequence[str]) -> str | None:
  """The value of `--config` in `argv`, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_flag(name: str, check: Callable[[str, Any], None]) -> None:
  """Checks flag `--name` while parsing: `check("--name", value)` raises ValueError (or
  FileNotFoundError) for a bad value; `parse_flags` reports it as one line, `error: flag
  --name=VALUE: <the message>`, exit 2. A flag left at None (not given, no default) is not
  checked."""
  def validator(value):
    if value is None:
      return True
    try:
      check(f"--{name}", value)
    except BAD_INPUT as e:
      raise flags.ValidationError(one_line(e)) from None
    return True
  flags.register_validator(name, validator)


def choice(valid) -> Callable[[str, Any], None]:
  """A check for `check_flag`: the value (each value of a list flag, at least one) is one
  of `valid`."""
  def check(what, value):
    if isinstance(value, list) and not value:
      raise ValueError(f"{what} needs at least one value, of {sorted(valid)}")
    for v in (value if isinstance(value, list) else [value]):
      check_choice(what, v, valid)
  return check


def existing_file(what: str, value: str) -> None:
  """A check for `check_flag`: the value names an existing file (or directory)."""
  del what  # absl's message names the flag and its value
  if not os.path.exists(value):
    raise FileNotFoundError(f"no such file or directory ({os.path.abspath(value)})")


def new_file_in_existing_dir(what: str, value: str) -> None:
  """A check for `check_flag`: the value is a file name whose directory exists."""
  parent = os.path.dirname(os.path.abspath(value))
  if os.path.isdir(value):
    raise ValueError(f"is a directory; name the file {what} writes")
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"its directory {parent} does not exist")


def seed(what: str, value: int) -> None:
  """A check for `check_flag`: a seed `jax.random.PRNGKey` takes (64 bits, signed)."""
  if not -2 ** 63 <= int(value) < 2 ** 63:
    raise ValueError(f"{what} must be a 64-bit integer, in [-2**63, 2**63), got {value}")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing (for `app.run(main, flags_parser=parse_flags)`) with bad flags and
  config-file errors (missing file, syntax error, `get_config` raising, unknown
  `--config.<field>`) as one `error: ...` line on stderr and exit status 2.

  Returns:
    The arguments absl leaves (the program name and the positional arguments).
  """
  path = _config_file(argv)
  if path is not None:
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      print(f"error: --config={path}: no such config file {os.path.abspath(file)}",
            file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
  try:
    rest = FLAGS(argv)
    if path is not None and not isinstance(FLAGS.config, str):
      # A config file flag: a config that failed to load raises on first access.
      config = FLAGS.config
      if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"get_config returned a {type(config).__name__}, not an "
                        f"ml_collections.ConfigDict")
      config.get("training")  # a config that failed to load raises on first access
  except Exception as e:  # noqa: BLE001 (flags and config files raise anything)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else type(e).__name__
    if isinstance(e, KeyError):  # an override of a field the config does not have
      detail = "unknown config field " + " ".join(str(e.args[0]).replace("'", "").split())
    elif isinstance(e, SyntaxError):
      detail = f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    elif lines and "Error whilst parsing config file" in lines[0]:
      detail = f"get_config raised {detail}"
    other_flag = str(e).startswith("flag --") and not str(e).startswith("flag --config=")
    where = "" if path is None or other_flag else f"--config={path}: "
    print(f"error: {where}{detail}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  return rest


def execute(work: Callable[[], Any]) -> int:
  """`work()`, with bad input (ValueError, FileNotFoundError, FileExistsError) as one
  `error: ...` line on stderr and status 2, a failed write (another OSError: disk full, no
  permission) as one line and status 4; 0 otherwise."""
  try:
    work()
  except BAD_INPUT as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except OSError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_WRITE_FAILED
  return 0


def setup() -> None:
  """Logging as the CLI's (no orbax / JAX chatter between progress bars)."""
  logs.setup_logging()
