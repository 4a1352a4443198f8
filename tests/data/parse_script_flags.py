"""Parses command lines of scripts/ in one process, each with only that script's flags, and
prints one JSON line per case: {"status": exit status, "err": stderr}. Used by
tests/test_bad_input.py (one interpreter start for every row; nothing runs past parsing).

    python tests/data/parse_script_flags.py '[["scripts/inpaint.py", "--scheme=x"], ...]'
"""

import contextlib
import io
import json
import runpy
import sys

from absl import flags

from score_sde.run import cli

FLAGS = flags.FLAGS


def main(cases):
  baseline = set(FLAGS)
  for script, *argv in cases:
    for name in set(FLAGS) - baseline:  # the previous script's flags and their validators
      delattr(FLAGS, name)
    FLAGS.unparse_flags()
    runpy.run_path(script, run_name="parse_only")  # defines its flags; main() is not run
    err = io.StringIO()
    status = 0
    with contextlib.redirect_stderr(err):
      try:
        cli.parse_flags([script, *argv])
      except SystemExit as e:
        status = e.code
    print(json.dumps({"status": status, "err": err.getvalue()}), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
