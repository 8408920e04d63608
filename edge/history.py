"""Bundle versions the device made or switched to, and why: `{data_dir}/models/history.json`.

Each entry is one model the daemon used, with the reason (learning, mark_normal, calibrate,
reload), the version it replaced (`from_version`, None = the configured model), the bundle
it was refitted from (`base`) and its manifest's checksum (a rollback or restart refuses a
folder that holds another bundle since). Versions the device wrote itself live beside the file as
`<base>-v<N>.bundle`; only the newest `keep` entries are kept, and the folders of dropped
versions the device made are deleted (never a bundle it did not write). `rollback` returns to
the version the active one replaced. Which configured models have finished a commissioning
period is kept apart from the entries (`learned`), so pruning old versions never makes a model
learn again. Every write is atomic: a bundle is written into a hidden
folder and renamed into place, the JSON is replaced with os.replace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Bundle, Manifest, load_bundle, write_bundle
from edge.errors import BundleError, SoundSentryError
from edge.private import atomic_write, private_dir, read_regular

log = logging.getLogger(__name__)

HISTORY = "history.json"
VERSION = re.compile(r"^[^.].*-v(\d+)\.bundle$")
"""A version folder's name (`write_version`); hidden ones are writes under way."""
REASONS = ("learning", "mark_normal", "calibrate", "reload")


SITE_VERSION = re.compile(r"-site-v\d+(?:-cal-[0-9a-f]{8})*$")
"""The ending of a version made on site (calibrated since, or not): new ones are named anew."""
_DERIVED = re.compile(r"(?:-site-v\d+|-cal-[0-9a-f]{8})+$")


def lineage(model_id: str) -> str:
    """The trained model a model id descends from: versions made on site are named
    `{id}-site-v{n}` (`ModelHistory.write_version`), calibrated copies `{id}-cal-{hash}`
    (`edge.calibrate`), of each other too. Only those endings: a bundle named `pump-site` by
    its folder is a model of its own, not one of `pump`'s (a diff review)."""
    return _DERIVED.sub("", model_id)[:80]


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_json(path: Path, data: Any) -> None:
    """Replace `path` with JSON atomically (edge.private.atomic_write), mode 0600."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(text))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when it is missing or unreadable (logged). A damaged one
    is set aside; one that cannot be read for now (EACCES, EIO) stays where it is, and
    `unreadable` says so: its owner must not write over it."""
    try:
        data = json.loads(read_regular(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: thousands of `[`
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:  # a link (never followed)
            log.error("%s cannot be read (%s): not used, nor written over, this run", path, exc)
            return None  # is damage, as what does not parse is
        aside = _set_aside(path)
        kept = f" (kept as {aside.name})" if aside else ""
        log.error("%s unreadable, starting afresh%s: %s", path, kept, exc)
        return None
    if isinstance(data, dict):
        return data
    aside = _set_aside(path)
    log.error(
        "%s holds no JSON object, starting afresh%s",
        path,
        f" (kept as {aside.name})" if aside else "",
    )
    return None


def peek_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, read without changing anything (a damaged file is the
    daemon's to set aside); None when there is none."""
    try:
        data = json.loads(read_regular(path))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def unreadable(path: Path, read: object) -> bool:
    """`read_json` gave nothing (`read` None) for a file that is still there: it could not be
    read for now (a damaged one was set aside). Written over, it lost what it held: an
    operator's review found a history.json a permission kept from the daemon replaced by an
    empty one, its site version lost, and 9,000,000 running seconds of state.json become 7."""
    return read is None and os.path.lexists(path)


def _set_aside(path: Path) -> Path | None:
    """Move a damaged file out of the way before the next save replaces it, so what it held
    (the versions made on site, their thresholds) can still be read by hand."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    try:
        path.replace(aside)
    except OSError:
        return None
    return aside


def _rebase(entries: list[dict[str, Any]], folder: Path) -> None:
    """Version folders the device wrote (`write_version`) lie in its models `folder`, wherever
    that is now: history.json names them by the absolute path they had, so a data_dir moved
    found none of its versions, and one copied pruned the original's (an operator's review).
    Every path in a folder the device once wrote versions to names one in `folder` now."""
    wrote = {Path(e["path"]).parent for e in entries if e.get("made")}
    for e in entries:
        for key in ("path", "base"):
            path = Path(e[key])
            if not VERSION.search(path.name) or path.parent == folder:
                continue
            # a `reload` of a version names it too: gone from where it was, here now
            if path.parent in wrote or (not path.exists() and (folder / path.name).is_dir()):
                e[key] = str(folder / path.name)


def _readable(entry: object) -> bool:
    """An entry of history.json this code can use: a version number, its folder, the bundle
    it was refitted from and why."""
    return (
        isinstance(entry, dict)
        and type(entry.get("version")) is int
        and all(isinstance(entry.get(k), str) for k in ("path", "base", "reason"))
    )


def active_entry(folder: Path, configured: str) -> dict[str, Any] | None:
    """The entry of the version the daemon starts with instead of the `configured` model (as
    ModelHistory reads history.json in `folder`), None when it runs the configured one; read
    without writing anything (a damaged file is the daemon's to set aside): `doctor` and the
    installer's upgrade check ask it."""
    data = peek_json(folder / HISTORY)
    if data is None or data.get("configured") not in (None, configured):
        return None
    found = data.get("entries", [])
    entries = [e for e in (found if isinstance(found, list) else [found]) if _readable(e)]
    _rebase(entries, folder)  # as ModelHistory reads them
    active = data.get("active")
    return next((e for e in entries if e["version"] == active), None)


def manifest_in_use(folder: Path, configured: Bundle, runs: Callable[[Bundle], object]) -> Manifest:
    """The manifest of the model a start with `configured` runs: its active site version's (as
    `active_entry` finds it) if it loads (`load_version`) and `runs` under the settings in force
    (raises SoundSentryError when not, as the daemon's check), else the configured bundle's; as
    edge.adapt chooses, without writing anything. `replay` takes its default channel from it: a
    version learnt on channel 4 is a model of channel 4, and one the daemon will not run is not
    the model that listens."""
    entry = active_entry(folder, configured.model_id)
    if entry is None:
        return configured.manifest
    try:
        bundle = load_version(entry)
        runs(bundle)
    except (SoundSentryError, OSError):  # the daemon says why at start and runs the configured
        return configured.manifest
    return bundle.manifest


def load_version(entry: dict[str, Any]) -> Bundle:
    """The bundle of a history entry. BundleError when its folder holds another bundle now
    (its checksum differs from the one recorded): a bundle loaded by reload_model is kept
    where it was, and `calibrate` writing the same --out again replaced it, so returning to
    the version would run another model while the history said it ran that one. Entries
    from before checksums were recorded load what is there."""
    path = Path(entry["path"])
    now = written_over(entry, path)  # before loading: a bundle this release cannot read
    if now is None:
        bundle = load_bundle(path)
        recorded = entry.get("checksum")  # and what was loaded: written over in between
        if recorded is None or recorded == bundle.manifest.checksum:
            return bundle
        now = bundle.model_id
    raise BundleError(
        f"{entry['path']} now holds {now}, not the {entry.get('model_id')} of version "
        f"{entry['version']} (written over since; reload_model loads it as a new version)"
    )


def written_over(entry: dict[str, Any], path: Path) -> str | None:
    """The model id now at `path` (or "another bundle") when the entry records its bundle's
    checksum and the manifest there holds another: the folder was written over since
    (`calibrate` with the same --out), and the daemon runs the configured model instead
    (edge.adapt). Read as plain JSON, so a bundle this version cannot load still tells; one
    that cannot be read at all is not taken as written over (None)."""
    recorded = entry.get("checksum")
    if recorded is None:  # entries from before checksums were recorded
        return None
    try:
        folder = path if path.is_dir() else path.parent  # a bundle is named by either
        found = json.loads(read_regular(folder / "manifest.json"))
        checksum = found.get("checksum")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(checksum, str) or checksum == recorded:
        return None
    model_id = found.get("model_id")
    return model_id if isinstance(model_id, str) and model_id else "another bundle"


def _listed(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class VersionUnwrittenError(BundleError):
    """A version the disk would not take (full, failing, read-only): not the data's fault."""


class ModelHistory:
    """The versions, the active one, and the configured model they descend from."""

    def __init__(self, folder: Path, keep: int, configured: str) -> None:
        self.folder = folder
        self.keep = keep
        self.path = folder / HISTORY
        read = read_json(self.path)  # a damaged file is set aside (and said) there
        self.unreadable = unreadable(self.path, read)
        """history.json is there but cannot be read: the configured model runs, no period is
        begun (as for a damaged one), and nothing is written over it or deleted this run."""
        # set aside now, or at a start whose save failed since (a full card); not a file
        # that could not be read for now (EIO, EACCES), which stays as it is
        lost = read is None and not os.path.lexists(self.path) and self._damaged_copy_kept()
        orphans = [p.name for p in self._on_disk()] if lost else []
        data = read or {}
        self._read_entries(data)
        self._read_active(data, configured)
        self._read_outcomes(data)
        if self.unreadable:  # what it records is unknown: a period would hold events off
            self.learned.add(configured)
        if orphans:  # a damaged card: a period begun again would hold events off for days
            self._say_damaged(orphans)
        if data.get("configured") not in (None, configured):
            self._say_configured_changed(data)

    def _read_entries(self, data: dict[str, Any]) -> None:
        """The readable version entries of history.json's `data`; the others said and left out."""
        found = data.get("entries", [])
        entries = found if isinstance(found, list) else [found]
        self.entries: list[dict[str, Any]] = [e for e in entries if _readable(e)]
        _rebase(self.entries, self.folder)
        if len(self.entries) < len(entries):
            log.warning("%s: %d version entries unreadable (a hand edit, damage): left out",
                        self.path, len(entries) - len(self.entries))  # fmt: skip

    def _read_active(self, data: dict[str, Any], configured: str) -> None:
        """The active version (one with an entry), and the configured model now and as saved."""
        active = data.get("active")
        self.active: int | None = active if self.entry(active) is not None else None
        self.held: int | None = None
        """The active version set aside for this run (`hold_back`): saved as the active one, so
        a later start whose settings can run it runs it again."""
        self.configured = configured
        recorded = data.get("configured")
        self.was_configured: str | None = recorded if isinstance(recorded, str) else None
        """The configured model the history was last saved with (None: not recorded): the model
        a period saved before periods recorded theirs (`of`) was begun for."""

    def _read_outcomes(self, data: dict[str, Any]) -> None:
        """How the periods ended: the configured models learnt for or failed, the last refit."""
        self.learned: set[str] = {m for m in _listed(data.get("learned")) if isinstance(m, str)}
        """Configured models a commissioning period has ended for: pruning never drops one."""
        self.learned |= {
            str(e["of"]) for e in self.entries if e.get("reason") == "learning" and e.get("of")
        }
        last = data.get("last_refit")
        self.last_refit: dict[str, Any] | None = last if isinstance(last, dict) else None
        """The outcome of the last refit (its error, when it failed): `status` says why after
        a restart too."""
        self.failed: set[str] = {m for m in _listed(data.get("failed")) if isinstance(m, str)}
        """Configured models whose commissioning period ended in a refit that failed, or was
        cancelled: not begun again at every start (a period suppresses events while it runs);
        a `learn` command can."""

    def _say_damaged(self, orphans: list[str]) -> None:
        """A history.json set aside as damaged while versions (`orphans`) were on disk: the
        configured model counts as learnt for, said once (saved so the next start does not)."""
        self.learned.add(self.configured)
        log.error(
            "%s was damaged: the versions made on site (%s) are not used, the configured "
            "model runs, and its commissioning period is not begun again (it would hold "
            "events off); the `reload_model` command with a version's name runs it, "
            "`learn start` begins a period", self.path, ", ".join(orphans),
        )  # fmt: skip
        with contextlib.suppress(OSError):  # so the next start says it no more (if it
            self.save()  # cannot be saved, the copy set aside says it again)

    def _say_configured_changed(self, data: dict[str, Any]) -> None:
        """Another configured model than the one the history was saved with: its versions are
        not used (no active one), said with the events marked normal that are not learnt."""
        configured = self.configured
        # the events marked normal in the old one's version in use: a calibration for a
        # moved microphone dropped them without a word, to be remembered and marked again
        # (a field review)
        marks = _listed((self.entry(self.active) or {}).get("marked"))
        old = str(data.get("configured"))
        again = (  # only a model of the same line takes a mark of the old one's events
            f"mark_normal them again if they were normal running (the newest: "
            f"{', '.join(map(str, marks[-10:]))})"
            if lineage(old) == lineage(configured)
            else "they were another model's: this one raises events of its own to mark"
        )
        log.warning(
            "the configured model is now %s (was %s): the versions made for the old one "
            "stay in the history but are not used%s",
            configured,
            old,
            f"; the {len(marks)} event(s) marked normal in the one in use are not learnt "
            f"by the new model: {again}"
            if marks
            else "",
        )
        self.active = None

    def hold_back(self) -> None:
        """Run the configured model instead of the active version for this run only (the
        settings now cannot run the version); it stays the saved active one."""
        self.held, self.active = self.active, None

    def entry(self, version: int | None) -> dict[str, Any] | None:
        """The entry of `version` (None: the configured model has no entry)."""
        return next((e for e in self.entries if e["version"] == version), None)

    @property
    def current(self) -> dict[str, Any] | None:
        """The entry in use, None for the configured model."""
        return self.entry(self.active)

    def write_version(
        self, base: Bundle, manifest: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> Path:
        """Write a new bundle version under the folder, atomically; return its path."""
        version = self._next()
        stem = SITE_VERSION.sub("", base.model_id)[:80]
        manifest = dict(manifest)
        manifest["model_id"] = f"{stem}-site-v{version}"
        contents = {n: base.file_bytes(n) for n in base.manifest.files if n.endswith(".tflite")}
        final = self.folder / f"{stem}-v{version}.bundle"
        tmp = self.folder / f".{final.name}.tmp-{os.getpid()}"
        try:
            private_dir(self.folder)
            shutil.rmtree(tmp, ignore_errors=True)
            write_bundle(tmp, manifest, contents, arrays)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VersionUnwrittenError(f"could not write {final}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def record(self, bundle: Bundle, reason: str, base: Path, made: bool, **detail: Any) -> int:
        """Add the entry of a model now in use and make it active; returns its version. All or
        nothing: if history.json cannot be written (a full disk) the history is as before, in
        memory and on disk, and the folders of versions it would have pruned are kept."""
        before = ([dict(e) for e in self.entries], self.active, set(self.learned))
        written = VERSION.search(Path(bundle.path).name) if made else None
        version = int(written.group(1)) if written else self._next()  # its folder's number
        if reason == "learning" and detail.get("of"):
            self.learned.add(str(detail["of"]))
        self.entries.append(
            {
                "version": version,
                "model_id": bundle.model_id,
                "path": str(bundle.path),
                # the bundle itself: a path may hold another one later (calibrate --out again)
                "checksum": bundle.manifest.checksum,
                "base": str(base),
                "reason": reason,
                "made": made,
                "from_version": self.active,
                "threshold": bundle.threshold,
                "created_at": now_iso(),
                **detail,
            }
        )
        self.active, self.held = version, None
        dropped = self._prune()
        try:
            self.save()
        except OSError:
            self.entries, self.active, self.learned = before
            raise
        self._delete(dropped)
        return version

    def prune(self) -> bool:
        """Keep the newest `keep` entries now (at start: `keep_versions` may have been
        lowered to free the card, and pruning otherwise waits for the next version); True if
        any went. A history that cannot be saved keeps them, said."""
        if len(self.entries) <= self.keep:
            return False
        before = [dict(e) for e in self.entries]
        dropped = self._prune()
        try:
            self.save()
        except OSError as exc:
            self.entries = before
            log.error("history: could not prune to %d versions: %s", self.keep, exc)
            return False
        self._delete(dropped)
        return True

    def _delete(self, dropped: list[dict[str, Any]]) -> None:
        for old in dropped:
            here = os.path.realpath(Path(old["path"]).parent) == os.path.realpath(self.folder)
            if not here:  # never another folder's
                log.info("history: version %d left in %s (not this device's models folder)",
                         old["version"], old["path"])  # fmt: skip
                continue
            shutil.rmtree(old["path"], ignore_errors=True)
            log.info("history: deleted version %d (%s)", old["version"], old.get("model_id"))

    def rollback_target(self) -> int | None:
        """The version the active one replaced (None: the configured model)."""
        current = self.current
        if current is None:
            raise BundleError("no version to roll back: the configured model is in use")
        return current.get("from_version")

    def set_active(self, version: int | None) -> None:
        """Make `version` the one in use (rollback) and save; if it cannot be saved, the
        history is as before."""
        before, self.active = (self.active, self.held), version
        self.held = None
        try:
            self.save()
        except OSError:
            self.active, self.held = before
            raise

    def save(self) -> None:
        """Write history.json atomically (OSError for one that could not be read at the start:
        the versions it records would be lost)."""
        if self.unreadable:
            raise OSError(errno.EACCES, f"{self.path} could not be read at the start")
        private_dir(self.folder)
        write_json(
            self.path,
            {
                "configured": self.configured,
                "active": self.held if self.active is None and self.held else self.active,
                "entries": self.entries,
                "learned": sorted(self.learned),
                "failed": sorted(self.failed),
                "last_refit": self.last_refit,
            },
        )

    def summary(self) -> list[dict[str, Any]]:
        """The entries for `status`, newest first, without paths."""
        keys = ("version", "model_id", "reason", "created_at", "threshold", "from_version")
        return [{k: e.get(k) for k in keys} for e in reversed(self.entries)]

    def _next(self) -> int:
        """The next version number: past the entries' and past the folders on disk (whose
        entries a damaged history.json lost: the next version wrote over the first)."""
        on_disk = (int(m.group(1)) for p in self._on_disk() if (m := VERSION.search(p.name)))
        return max((*(e["version"] for e in self.entries), *on_disk), default=0) + 1

    def _damaged_copy_kept(self) -> bool:
        """Whether a damaged history.json was set aside here (`read_json`)."""
        try:
            return any(self.folder.glob(f"{HISTORY}.damaged-*"))
        except OSError:
            return False

    def _on_disk(self) -> list[Path]:
        """The version folders in the folder (`<stem>-v<N>.bundle`), by name."""
        try:
            return sorted(p for p in self.folder.iterdir() if VERSION.search(p.name) and p.is_dir())
        except OSError:
            return []

    def _prune(self) -> list[dict[str, Any]]:
        """Keep the newest `keep` entries (and the active one); the dropped entries whose
        folders we made, for the caller to delete once the history is saved."""
        dropped = []
        while len(self.entries) > self.keep:
            old = next(e for e in self.entries if e["version"] != self.active)
            self.entries.remove(old)
            # not a folder a kept entry uses (a reload of it), refits from (its base), nor the
            # configured model: a config pinning a site version had it deleted by the next
            # refit, and the daemon could not start again (an operator's review)
            used = {os.path.realpath(e[key]) for e in self.entries for key in ("path", "base")}
            if (
                old.get("made")
                and os.path.realpath(old["path"]) not in used
                and old.get("model_id") != self.configured
            ):
                dropped.append(old)
        for e in self.entries:  # a pruned predecessor: roll back to the configured model
            if e.get("from_version") is not None and self.entry(e["from_version"]) is None:
                e["from_version"] = None
        return dropped
