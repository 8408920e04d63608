#!/usr/bin/env bash
# Install, upgrade or remove SoundSentry as a systemd service (Raspberry Pi OS / Debian /
# Ubuntu, 64-bit). Safe to run again: an upgrade keeps the config, the models and the spool.
#
#   sudo deploy/install.sh                  install or upgrade from this source tree, start
#   sudo deploy/install.sh --uninstall      remove venv and units; keep config, state and user
#   sudo deploy/install.sh --purge          ... and remove config and state too
#   deploy/install.sh --root /tmp/tree      everything under /tmp/tree, nothing on the host
#
# The unit files are the real files next to this script (deploy/*.service), copied as-is.
set -euo pipefail
# A hardened image's umask (027, kept by sudo) made the venv unreadable for the service's user:
# the unit could not start. What this installs is meant to be world-readable; secrets get
# their own modes below.
umask 022

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNITS=(soundsentry.service soundsentry@.service)
SERVICE_USER=soundsentry
AUDIO_GROUP=audio
MIN_PYTHON=3.11
APT_PACKAGES=(python3 python3-venv libportaudio2 libsndfile1 alsa-utils ca-certificates)

ROOT=""
SOURCE=$(cd "$DEPLOY_DIR/.." && pwd)
PYTHON=python3
PYTHON_GIVEN=0  # --python names the interpreter the venv must be made by
ACTION=install
START=1
FRESH=1 # no soundsentry.service before this run: a first install, not an upgrade
ENABLE=(soundsentry.service) # enabled and started by a first install

usage() {
  sed -n '2,9s/^# \{0,1\}//p' "$0"
  echo "options: --root DIR  --source PATH (source tree or wheel)  --python PY  --no-start"
  echo "         --uninstall  --purge  -h|--help"
}

say() { echo "soundsentry-install: $*"; }
die() {
  echo "soundsentry-install: error: $*" >&2
  exit 1
}

# Commands that change the host outside ROOT (apt, users, the running systemd): with --root
# they are printed, not run.
host() {
  if [ -n "$ROOT" ]; then
    say "would run: $*"
  else
    "$@"
  fi
}

# install(1) with an owner, except with --root, where the soundsentry user need not exist.
install_as() {
  local user=$1 group=$2
  shift 2
  if [ -n "$ROOT" ]; then
    install "$@"
  else
    install -o "$user" -g "$group" "$@"
  fi
}

# systemctl calls that talk to the running systemd: printed with --root, skipped (with a
# note) where systemd is not running, e.g. in a container or a chroot.
live_systemctl() {
  if [ -n "$ROOT" ]; then
    say "would run: systemctl $*"
  elif [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: skipped systemctl $*"
  else
    systemctl "$@"
  fi
}

# enable/disable only write symlinks: with --root, systemctl does that inside ROOT.
systemctl_root() {
  if [ -n "$ROOT" ]; then
    systemctl --quiet --root="$ROOT" "$@"
  else
    systemctl --quiet "$@"
  fi
}

parse_args() {
  local given="$*"  # for the hint below: the loop shifts them away
  while (($#)); do
    case "$1" in
      --root) ROOT=${2:?--root needs a directory}; shift ;;
      --source) SOURCE=${2:?--source needs a path}; shift ;;
      --python) PYTHON=${2:?--python needs an interpreter}; PYTHON_GIVEN=1; shift ;;
      --no-start) START=0 ;;
      --uninstall) ACTION=uninstall ;;
      --purge) ACTION=purge ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
    shift
  done
  if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
  elif [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0${given:+ $given}), or use --root DIR to install into a directory"
  fi
  # An absolute path, so pip never mistakes it for a package name on PyPI.
  local src
  src=$(realpath -e "$SOURCE" 2>/dev/null) || die "--source $SOURCE: no such file or directory"
  SOURCE=$src
  SERVICE_STATE=/var/lib/soundsentry  # the units' StateDirectory and WorkingDirectory
  VENV="$ROOT/opt/soundsentry/venv"
  CONF_DIR="$ROOT/etc/soundsentry"
  STATE_DIR="$ROOT$SERVICE_STATE"
  LOGS_DIR="$ROOT/var/log/soundsentry"
  UNIT_DIR="$ROOT/etc/systemd/system"
}

check_platform() {
  local id="" id_like="" arch
  if [ -r /etc/os-release ]; then
    # shellcheck source=/dev/null
    id=$(. /etc/os-release && echo "${ID:-}")
    # shellcheck source=/dev/null
    id_like=$(. /etc/os-release && echo "${ID_LIKE:-}")
  fi
  case " $id $id_like " in
    *" debian "* | *" ubuntu "* | *" raspbian "*) ;;
    *) die "unsupported OS '${id:-unknown}': needs Raspberry Pi OS, Debian or Ubuntu" ;;
  esac
  # The userland's architecture, not the kernel's: 32-bit Pi OS often runs a 64-bit kernel.
  arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
  case "$arch" in
    arm64 | aarch64 | amd64 | x86_64) ;;
    *) die "unsupported architecture '$arch': needs 64-bit (arm64 or amd64); LiteRT has no 32-bit build" ;;
  esac
}

check_python() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: needs Python >= $MIN_PYTHON"
  "$PYTHON" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" ||
    die "needs Python >= $MIN_PYTHON, found $("$PYTHON" -c 'import platform; print(platform.python_version())') ($PYTHON)"
}

install_apt_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [ -n "$ROOT" ] || say "installing ${missing[*]}"  # with --root: the "would run" lines say it
  host apt-get update -qq
  host env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

create_user() {
  if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null; then
    host usermod -a -G "$AUDIO_GROUP" "$SERVICE_USER"
    return
  fi
  # --uninstall keeps the group when it has other members (an admin added to it): use it.
  local group=(--user-group)
  if [ -z "$ROOT" ] && getent group "$SERVICE_USER" >/dev/null; then
    group=(-g "$SERVICE_USER")
  fi
  host useradd --system "${group[@]}" --groups "$AUDIO_GROUP" --home-dir /var/lib/soundsentry \
    --no-create-home --shell /usr/sbin/nologin --comment "SoundSentry detector" "$SERVICE_USER"
}

# The edge runtime with the dashboard's one small package ([web]: prometheus-client, pure
# Python), so that `[web] enabled = true` works; no TensorFlow. A venv made by another Python
# version (an OS upgrade from Bookworm to Trixie) is rebuilt, since its site-packages would not
# be found. The version is read from pyvenv.cfg: the venv's python is a link to the OS's,
# which reports the new version once the OS has moved on.
# The extras an earlier venv holds (by its packages' folders: after an OS upgrade its python
# may be gone): a rebuild installs them again, instead of a Pi that trained or drew reports on
# site losing `train` or `evaluate --report` at the next upgrade.
kept_extras() {
  local extras="web"
  if compgen -G "$VENV/lib/python*/site-packages/tensorflow" >/dev/null; then extras+=",train"; fi
  if compgen -G "$VENV/lib/python*/site-packages/matplotlib" >/dev/null; then extras+=",report"; fi
  echo "$extras"
}

install_venv() {
  local want have="" extras made_by asked
  rm -rf "$VENV.prev"  # left by an upgrade cut short: the venv itself is checked below
  extras=$(kept_extras)
  want=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -f "$VENV/pyvenv.cfg" ]; then
    have=$(sed -n 's/^version\(_info\)\{0,1\} *= *\([0-9]*\.[0-9]*\).*/\2/p' "$VENV/pyvenv.cfg" | head -n 1)
    [ -n "$have" ] || have="unknown"
  fi
  # the interpreter it was made by, and the one --python asks for (a rerun with --python after
  # check_service_python refused one under a home folder kept the venv of the same version);
  # without --python the venv is kept: an upgrade whose python3 is another one of the same
  # version (pyenv's first on PATH) rebuilt the venv a rerun with --python had mended (a review)
  made_by=$(readlink -f "$VENV/bin/python" 2>/dev/null || true)
  asked=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  if [ -n "$have" ] && [ "$have" != "$want" ]; then
    say "rebuilding $VENV (Python $have -> $want)"
    rm -rf "$VENV"
    have=""
  elif [ -n "$have" ] && ((PYTHON_GIVEN)) && [ -L "$VENV/bin/python" ] &&
    [ "$made_by" != "$asked" ]; then
    say "rebuilding $VENV (made by $made_by, now $asked)"
    rm -rf "$VENV"
    have=""
  elif [ -n "$have" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    # an install or rebuild cut short (a power cut while venv or rm ran): never repaired else
    say "rebuilding $VENV (it has no working pip: an earlier install did not finish)"
    rm -rf "$VENV"
    have=""
  fi
  if [ -n "$have" ] && ((!FRESH)); then  # until the kept configs load with the new code
    cp -a "$VENV" "$VENV.prev"
  fi
  if [ -z "$have" ]; then
    say "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
  fi
  say "installing ${SOURCE}[$extras] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --upgrade \
    "${SOURCE}[$extras]"
  if [[ "$SOURCE" == *.whl ]]; then
    # pip skips a wheel whose version is installed already: an upgrade would keep the old code.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      --force-reinstall --no-deps "$SOURCE"
  fi
  say "installed $("$VENV/bin/soundsentry" --version)"
  # On PATH, so that the README's `soundsentry ...` works on the Pi.
  install -d -m 0755 "$ROOT/usr/local/bin"
  ln -sfn /opt/soundsentry/venv/bin/soundsentry "$ROOT/usr/local/bin/soundsentry"
}

install_config() {
  local conf="$CONF_DIR/config.toml"
  install_as root "$SERVICE_USER" -d -m 0750 "$CONF_DIR"
  install_as "$SERVICE_USER" "$SERVICE_USER" -d -m 0750 "$STATE_DIR" "$STATE_DIR/models"
  if [ -z "$ROOT" ]; then
    # After --uninstall and a reinstall the user may have another UID and GID: what it kept
    # (state, spool, clips, learned models: 0600) must be its own again, and the configs and
    # files beside them (web_token, certificates) readable by its group. systemd's
    # StateDirectory= fixes ownership only when the folder itself has the wrong owner, which
    # `install -d` above has just mended. Password files stay root's.
    find "$STATE_DIR" \( ! -user "$SERVICE_USER" -o ! -group "$SERVICE_USER" \) \
      -exec chown -h "$SERVICE_USER:$SERVICE_USER" {} +
    find "$CONF_DIR" -mindepth 1 -maxdepth 1 ! -name '*mqtt_password*' ! -group "$SERVICE_USER" \
      -exec chgrp -h "$SERVICE_USER" {} +
  fi
  if [ -e "$conf" ]; then
    say "keeping $conf"
  else
    install_as root "$SERVICE_USER" -m 0640 "$DEPLOY_DIR/config.example.toml" "$conf"
    say "wrote $conf (from config.example.toml): edit it before starting"
  fi
  if [ -n "$ROOT" ]; then
    say "would run: chown root:$SERVICE_USER $CONF_DIR $conf"
  fi
}

# Enabled on the first install only: an upgrade leaves enabled what the admin enabled (for
# example only soundsentry@NAME instances).
install_units() {
  local unit
  [ ! -e "$UNIT_DIR/soundsentry.service" ] || FRESH=0
  install -d -m 0755 "$UNIT_DIR"
  for unit in "${UNITS[@]}"; do  # written aside, then renamed: a power cut leaves the old unit
    if [ "$(readlink "$UNIT_DIR/$unit" 2>/dev/null)" = /dev/null ]; then  # masked: it stays so
      say "$unit is masked: left masked, not updated (sudo systemctl unmask $unit, then run this again)"
      continue
    fi
    install -m 0644 "$DEPLOY_DIR/$unit" "$UNIT_DIR/.$unit.new"
    sync "$UNIT_DIR/.$unit.new"  # an empty unit file would read as masked after a power cut
    mv -f "$UNIT_DIR/.$unit.new" "$UNIT_DIR/$unit"
  done
  live_systemctl daemon-reload
  if ((FRESH)); then
    if [ -f "$CONF_DIR/$ENABLED_FILE" ]; then  # a reinstall: what was enabled before
      mapfile -t ENABLE < "$CONF_DIR/$ENABLED_FILE"
      say "enabled again what was enabled before --uninstall: ${ENABLE[*]:-nothing}"
      rm -f "$CONF_DIR/$ENABLED_FILE"
    fi
    if ((${#ENABLE[@]})); then
      systemctl_root enable "${ENABLE[@]}"
    fi
  fi
}

# The service user's home, its `~` (the one create_user gives it, unless the user existed
# before with another; under --root the host's users are not the tree's).
service_home() {
  local home=""
  [ -n "$ROOT" ] || home=$(getent passwd "$SERVICE_USER" | cut -d: -f6)
  echo "${home:-/var/lib/soundsentry}"
}

# The model path the config names, as the service reads it (a relative one from its working
# folder, /var/lib/soundsentry, not from where the installer runs); empty when it names none.
configured_model() {
  # utf-8-sig, as the daemon reads it: a config saved by Notepad starts with a byte-order mark.
  # A config that is not valid TOML (kept from an earlier install) is one line, not a traceback.
  # A leading ~ is the service user's home, as the daemon reads it (root's, in a review).
  HOME=$(service_home) "$VENV/bin/python" -I -c '
import os, sys, tomllib
try:
    model = tomllib.loads(open(sys.argv[1], encoding="utf-8-sig").read()).get("model", "")
except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
    sys.exit(f"{sys.argv[1]}: not valid TOML ({exc})")
model = os.path.expanduser(model) if isinstance(model, str) and model.startswith("~") else model
relative = isinstance(model, str) and model and not os.path.isabs(model)
print(os.path.join(sys.argv[2], model) if relative else model)' "$CONF_DIR/config.toml" \
    "$SERVICE_STATE"
}

# Runs a command as the service user on this host (not under --root, where the host's users
# are not the tree's), from /, with no input, stopped after 5 minutes by a timeout of root's
# (one of the service user's own could be stopped by it; the diff review): the checks below read
# the models and models/history.json of its state folder, which it can write, and root must not
# parse what a compromised service account left there (the TFLite parser), nor wait for ever on
# a FIFO it put in a bundle's place (the security review). The Python checks leave the
# terminal's session first (os.setsid): no keystrokes typed into root's shell (TIOCSTI).
as_service() {
  local rc=0
  if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null; then
    local gid
    gid=$(id -g "$SERVICE_USER")
    (cd / && exec timeout -k 10 300 setpriv --reuid="$SERVICE_USER" --regid="$gid" \
      --init-groups -- "$@" </dev/null) || rc=$?
  else
    timeout -k 10 300 "$@" </dev/null || rc=$?
  fi
  if ((rc == 124 || rc == 137)); then  # 137: killed (after the timeout's TERM, or by the OOM killer)
    say "a check of the kept configs and models did not end within 5 minutes or was killed (out of memory?)"
  fi
  return "$rc"
}

# The service runs the venv's python as its own user, which a Python under a home folder
# cannot be reached by (pyenv's under /root, mode 700): the install said "done" and the service
# could never start (a walk-through on a machine whose python3 was pyenv's). Said here, with
# the fix; under --root the tree's user is not the host's, so it is not asked.
check_service_python() {
  [ -z "$ROOT" ] || return 0
  getent passwd "$SERVICE_USER" >/dev/null || return 0
  if ! as_service "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    die "the service's user $SERVICE_USER cannot run $VENV/bin/python (it is $(readlink -f "$VENV/bin/python")): a Python under a home folder, such as pyenv's, is out of its reach; install with a system Python (--python /usr/bin/python3)"
  fi
}

# Every kept config (the single unit's and each instance's) as the new code reads it, and the
# model bundle each one names (with its [detector] settings, as the daemon builds its pipeline),
# and the site version the device runs instead of it (a commissioning period, calibrate,
# mark_normal: models/history.json in the unit's state folder): a key a release renamed or
# dropped, or a bundle it no longer reads, is one line per file here, not a service that cannot
# start, or one that quietly fell back to the factory model and forgot the site's. A model that
# is not there yet is left to the service. -I: the code of the venv, never a checkout the
# installer is run from.
configs_load() {
  local conf state failed=0
  for conf in "$CONF_DIR"/*.toml; do
    [ -e "$conf" ] || continue
    state=$SERVICE_STATE  # the units' StateDirectory=soundsentry(/%i)
    [ "$(basename "$conf")" = config.toml ] || state="$state/$(basename "$conf" .toml)"
    STATE_DIRECTORY="$state" HOME=$(service_home) as_service "$VENV/bin/python" -I -c '
import grp, os, pwd, sys
try:
    os.setsid()  # no controlling terminal: nothing typed into root'"'"'s shell (TIOCSTI)
except OSError:
    pass
from pathlib import Path
from edge.errors import SoundSentryError
from edge.settings import load_settings
conf, root, state = sys.argv[1], sys.argv[2], sys.argv[3]
for name in [n for n in os.environ if n.startswith("SOUNDSENTRY_")]:
    del os.environ[name]  # the installer'"'"'s own: the service does not have them
who = pwd.getpwuid(os.getuid()).pw_name
if not os.access(conf, os.R_OK):  # root'"'"'s alone (0600): a unit of it would fail to start
    group = grp.getgrgid(os.getgid()).gr_name
    sys.exit(f"{conf}: not readable by {who}, so no unit can use it: chgrp {group} and chmod "
             "0640 it, or move it out of this folder")
try:
    s = load_settings(conf)
except SoundSentryError as exc:
    said = str(exc)
    sys.exit(said if conf in said else f"{conf}: {said}")
# a relative path as the service reads it: from its working folder (its state folder)
model = s.model and Path(root + str(Path(state) / s.model))
try:
    there = model is not None and Path(model).exists()
except PermissionError:  # a folder the service cannot enter (a home folder of 0700)
    sys.exit(f"{conf}: model {s.model}: {who} cannot reach it (a folder it may not enter); "
             "copy the bundle under /var/lib/soundsentry/models")
if there:
    from edge.bundle import load_bundle
    from edge.pipeline import Pipeline
    try:
        configured = load_bundle(model)
        Pipeline(configured, s.detector)
    except (SoundSentryError, OSError) as exc:
        said = str(exc).replace(str(model), str(s.model))  # the path as the config names it
        sys.exit(f"{conf}: " + (said if str(s.model) in said else f"model {s.model}: {said}"))
    from edge.history import active_entry, written_over
    here = lambda p: Path(root + str(p)) if root and Path(p).is_absolute() else Path(p)
    entry = active_entry(here(s.data_dir) / "models", configured.model_id)
    # a version whose folder was written over since is not run: the configured model is
    if entry is not None:  # its path is under root already: moved under the folder read
        at = Path(entry["path"])
        where = str(at).removeprefix(root) if root and at.is_relative_to(root) else str(at)
        at = here(where)
    if entry is not None and written_over(entry, at) is None:
        active = entry["version"]
        try:
            Pipeline(load_bundle(at), s.detector)
        except (SoundSentryError, OSError) as exc:
            said = str(exc).replace(str(at), where)
            sys.exit(f"{conf}: the site version in use, {active} ({where}), does not load "
                     f"with this version: {said}")
' "$conf" "$ROOT" "$state" || failed=1
  done
  return "$failed"
}

start_service() {
  local model
  if ((!START)); then
    if ((FRESH)); then
      say "not starting (--no-start): sudo systemctl start soundsentry"
    else  # the old daemon still runs the code it loaded: the new one runs after a restart
      say "not restarting (--no-start): the new code runs after: sudo systemctl restart soundsentry"
    fi
    return
  fi
  if ((!FRESH)); then  # an upgrade: whatever runs (the single unit, instances) runs the new code
    live_systemctl try-restart soundsentry.service 'soundsentry@*.service'
    return
  fi
  if ((!${#ENABLE[@]})); then
    return
  fi
  if [[ " ${ENABLE[*]} " == *" soundsentry.service "* ]]; then  # its config's model
    if ! model=$(configured_model); then
      say "not starting: fix the config above, then: sudo systemctl start soundsentry"
      return
    fi
    if [ -n "$model" ] && [ ! -e "$ROOT$model" ]; then
      say "not starting: model $model not found. Copy your bundle there (or name it as model in ${CONF_DIR#"$ROOT"}/config.toml), then: sudo systemctl start soundsentry"
      return
    fi
  fi
  # a config kept from an uninstall (a key this version renamed) or its model: named here, not
  # a start that waits its minute and fails with systemd's "Job failed"
  if ! configs_load; then
    say "not starting: fix the config above, then: sudo systemctl start soundsentry"
    return
  fi
  live_systemctl start "${ENABLE[@]}"
}

do_install() {
  check_platform
  if command -v "$PYTHON" >/dev/null; then check_python; fi
  [ -e "$SOURCE/pyproject.toml" ] || [[ "$SOURCE" == *.whl && -f "$SOURCE" ]] ||
    die "--source $SOURCE is neither a source tree (pyproject.toml) nor a wheel"
  install_apt_packages
  check_python
  create_user
  [ ! -e "$UNIT_DIR/soundsentry.service" ] || FRESH=0
  install_venv
  check_service_python
  install_config
  check_upgrade
  install_units
  start_service
  say "done"
}

# An upgrade whose new code refuses a kept config or the model it names would leave a service
# that fails at its next start (a reboot, a watchdog kill, a power cut), and it said "done":
# the venv of the version installed before is put back instead, and the install fails.
check_upgrade() {
  if ((FRESH)); then
    return
  fi
  if configs_load; then
    rm -rf "$VENV.prev"
    return
  fi
  if [ -d "$VENV.prev" ]; then
    rm -rf "$VENV"
    mv "$VENV.prev" "$VENV"
    say "put back the version installed before: $("$VENV/bin/soundsentry" --version 2>&1 || true)"
  fi
  die "a kept config or its model above does not load with this version; nothing was restarted. Mend it (or train the model again), then run this installer again"
}

# Instances of soundsentry@.service enabled by the admin (soundsentry@pump-3.service, ...).
enabled_instances() {
  find "$UNIT_DIR" -path '*.wants/soundsentry@*.service' -printf '%f\n' 2>/dev/null | sort -u
}

# What was enabled when --uninstall ran, kept with the config: a reinstall enables it again
# (it enabled the single unit, and not the instances an admin ran instead; in a review).
ENABLED_FILE=.enabled-before-uninstall

do_uninstall() {
  local units unit
  mapfile -t units < <(enabled_instances)
  # (not by a second --uninstall, which would record nothing over the first's record)
  if [ "$ACTION" != purge ] && [ -d "$CONF_DIR" ] && [ -e "$UNIT_DIR/soundsentry.service" ]; then
    {
      find "$UNIT_DIR" -path '*.wants/soundsentry.service' -printf '%f\n' 2>/dev/null | sort -u
      printf '%s\n' "${units[@]}"
    } | grep . >"$CONF_DIR/$ENABLED_FILE" || true  # empty: nothing was enabled
  fi
  units+=(soundsentry.service)
  live_systemctl stop soundsentry.service 'soundsentry@*.service' || true
  for unit in "${units[@]}"; do
    # Without its unit file (a second --uninstall) disable fails: drop the links directly.
    systemctl_root disable "$unit" 2>/dev/null || rm -f "$UNIT_DIR"/*.wants/"$unit"
  done
  for unit in "${UNITS[@]}"; do
    rm -f "$UNIT_DIR/$unit"
  done
  live_systemctl daemon-reload
  live_systemctl reset-failed 'soundsentry*' 2>/dev/null || true  # no failed units left listed
  rm -rf "$ROOT/opt/soundsentry"
  if [ "$(readlink "$ROOT/usr/local/bin/soundsentry" 2>/dev/null)" = \
    /opt/soundsentry/venv/bin/soundsentry ]; then
    rm -f "$ROOT/usr/local/bin/soundsentry"
  fi
  if [ "$ACTION" = purge ]; then
    rm -rf "$CONF_DIR" "$STATE_DIR" "$LOGS_DIR"
    # drop-ins (`systemctl edit`) may hold overrides such as an MQTT password
    rm -rf "$UNIT_DIR/soundsentry.service.d" "$UNIT_DIR"/soundsentry@*.service.d
    say "removed $CONF_DIR, $STATE_DIR, $LOGS_DIR and the units' drop-ins"
    # the user goes last, with its files: a kept file of a removed user's UID would belong to
    # the next system account given that UID
    if [ -n "$ROOT" ] || getent passwd "$SERVICE_USER" >/dev/null; then
      host userdel "$SERVICE_USER"
    fi
  else
    local dropins=("$UNIT_DIR"/soundsentry.service.d "$UNIT_DIR"/soundsentry@*.service.d)
    local kept="$CONF_DIR, $STATE_DIR, $LOGS_DIR"
    for unit in "${dropins[@]}"; do
      [ -d "$unit" ] && kept+=", $unit (systemctl edit's drop-ins)"
    done
    say "kept $kept and the user $SERVICE_USER who owns them (--purge removes them)"
  fi
  say "done"
}

main() {
  parse_args "$@"
  if [ "$ACTION" = install ]; then
    do_install
  else
    do_uninstall
  fi
}

main "$@"
