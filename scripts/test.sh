#!/usr/bin/env bash
# Install what the test suite needs and run it: Debian packages (when root), a virtualenv
# with the training, report, test and dashboard extras, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins libsndfile1)
APT_PACKAGES+=(systemd shellcheck)  # tests/test_deploy.py: systemd-analyze verify/security, shellcheck
APT_PACKAGES+=(chromium chromium-driver)  # tests/test_web.py: the dashboard in a real browser
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
make_venv "$PYTHON" "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[train,report,dev,web]'
exec "$VENV/bin/python" -m pytest "$@"
