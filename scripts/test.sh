#!/usr/bin/env bash
# Install what the test suite needs and run it: Debian packages (when root), a virtualenv
# with the training, report, test and dashboard extras, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto mosquitto-clients pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins libsndfile1)
APT_PACKAGES+=(systemd shellcheck)  # tests/test_deploy.py: systemd-analyze verify/security, shellcheck
APT_PACKAGES+=(chromium chromium-driver)  # tests/test_web.py: the dashboard in a real browser
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# shellcheck source=scripts/setup.sh
source scripts/setup.sh
require_python "$PYTHON"
apt_install "the test suite uses them" "${APT_PACKAGES[@]}"
make_venv "$PYTHON" "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[train,report,dev,web]'
exec "$VENV/bin/python" -m pytest "$@"
