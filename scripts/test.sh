#!/usr/bin/env bash
# The test command: creates .venv at the repository root when missing, installs the package
# editable with its test extras, and runs pytest (extra arguments are passed to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# TCMalloc when installed (scripts/cpu_env.sh); the tests set their own device count.
source scripts/cpu_env.sh
use_tcmalloc
exec .venv/bin/python -m pytest "$@"
