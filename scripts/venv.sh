# shellcheck shell=bash
# Sourced by demo.sh and test.sh: make_venv PYTHON VENV creates the virtualenv, or gives pip
# to one an earlier attempt left without it. Debian's python3 ships venv's pip in
# python3.X-venv, which a fresh system may lack: installed when root, else named in one line.
# A folder at VENV that is not a virtualenv is never touched.
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
    local pkg
    pkg="python$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing $pkg (Python's venv needs it)" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    else
      echo "$python cannot create a virtualenv: run sudo apt-get install $pkg, then again" >&2
      exit 1
    fi
  fi
  if [ -x "$venv/bin/python" ]; then  # a virtualenv without pip: its packages are kept
    "$venv/bin/python" -m ensurepip --upgrade >/dev/null
  else
    "$python" -m venv "$venv"
  fi
}
