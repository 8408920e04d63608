#!/usr/bin/env bash
# Set up the bare edge install in a virtualenv and run the demo: the bundled fan model hears
# a bundled recording (normal running, then a real fault). No broker or microphone needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "SoundSentry needs Python 3.11 or newer (found: $("$PYTHON" --version))" >&2
  exit 1
fi
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
make_venv "$PYTHON" "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/soundsentry" demo "$@"
