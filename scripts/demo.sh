#!/usr/bin/env bash
# Set up the bare edge install in a virtualenv and run the demo: the bundled fan model hears
# a bundled recording (normal running, then a real fault). No broker or microphone needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# shellcheck source=scripts/setup.sh
source scripts/setup.sh
require_python "$PYTHON"
make_venv "$PYTHON" "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/soundsentry" demo "$@"
