# shellcheck shell=bash
# Sourced by demo.sh and test.sh: the Debian packages and the virtualenv they need.

# require_python PYTHON: stop with one line unless PYTHON is 3.11 or newer (before any install).
require_python() {
  local python=$1
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "SoundSentry needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
    echo "set PYTHON=python3.11 (or newer) to choose another" >&2
    exit 1
  fi
}

# apt_install WHY PKG...: install the Debian packages not installed yet when root (WHY says what
# needs them), else name them in one line and stop.
apt_install() {
  local why=$1 pkg missing=()
  shift
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} ($why)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages ($why): ${missing[*]} (run: sudo apt-get install ${missing[*]}, then again)" >&2
    exit 1
  fi
}

# make_venv PYTHON VENV: create the virtualenv, or give pip to one an earlier attempt left
# without it. Debian's python3 ships venv's pip in python3.X-venv, which a fresh system may
# lack. A folder at VENV that is not a virtualenv is never touched.
make_venv() {
  local python=$1 venv=$2
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
    echo "$venv exists and is not a virtualenv: move it away, or set VENV to another folder" >&2
    exit 1
  fi
  if ! "$python" -c 'import ensurepip' 2>/dev/null; then
    apt_install "Python's venv needs it" \
      "python$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
  fi
  if [ -x "$venv/bin/python" ]; then  # a virtualenv without pip: its packages are kept
    "$venv/bin/python" -m ensurepip --upgrade >/dev/null
  else
    "$python" -m venv "$venv"
  fi
}
