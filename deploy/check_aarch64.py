#!/usr/bin/env python3
"""Prove that the bare edge install resolves to binary wheels on a 64-bit Raspberry Pi.

Runs `pip download --only-binary=:all:` for linux aarch64 (every manylinux tag a Pi takes) and
CPython 3.11 (Bookworm) and 3.13 (Trixie), with the dependencies read from pyproject.toml's
[project].dependencies, so nothing here can drift from what `pip install .` asks for. A
package without an aarch64 wheel for one of those Pythons would have to be compiled on the
Pi (or fail to install there): that is what this catches.

Exit status: 0 all resolve; 1 something does not; 2 PyPI cannot be reached.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare system Python: pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PYTHON_VERSIONS = ("3.11", "3.13")
GLIBC_MINOR = {"3.11": 36, "3.13": 41}
"""glibc 2.x of the Raspberry Pi OS that ships each Python (Bookworm 2.36, Trixie 2.41): pip on
the Pi takes any manylinux wheel up to it, and pip download matches --platform tags exactly, so
every tag from manylinux 2.17 up is listed (with 2.27 alone it resolved older sdist-free wheels
than a Pi installs: soundfile's py2.py3 wheel, an older soxr)."""
PROBE_URL = "https://pypi.org/simple/pip/"
PROBE_TIMEOUT_S = 10
PIP_TIMEOUT_S = 600
EXIT_UNRESOLVED = 1
EXIT_OFFLINE = 2


def edge_requirements(pyproject: Path, python_version: str) -> list[str]:
    """[project].dependencies whose markers hold on linux aarch64, without the markers."""
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    env = {
        "platform_machine": "aarch64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }
    out = []
    for dep in deps:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def platforms(python_version: str) -> list[str]:
    """The manylinux tags a Pi with this Python installs, newest first."""
    newest = GLIBC_MINOR[python_version]
    tags = [f"manylinux_2_{minor}_aarch64" for minor in range(newest, 16, -1)]
    return [*tags, "manylinux2014_aarch64"]


def pypi_reachable() -> bool:
    """Whether the package index answers (through any configured proxy)."""
    try:
        with urllib.request.urlopen(PROBE_URL, timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def download(requirements: list[str], python_version: str, dest: Path) -> tuple[bool, str]:
    """pip download the wheels for aarch64 and one Python version; (ok, pip's last words)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for platform in platforms(python_version):
        cmd += ["--platform", platform]
    cmd += ["-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return proc.returncode == 0, (errors[0] if errors else proc.stderr.strip()[-300:])


def check(python_version: str, pyproject: Path, dest: Path) -> bool:
    """Resolve one Python version and print one line about it."""
    reqs = edge_requirements(pyproject, python_version)
    started = time.monotonic()
    ok, why = download(reqs, python_version, dest)
    took = time.monotonic() - started
    if not ok:
        print(f"cp{python_version} aarch64: does NOT resolve ({took:.0f} s): {why}")
        return False
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    print(f"cp{python_version} aarch64: {len(wheels)} wheels ({took:.0f} s): {' '.join(wheels)}")
    return True


def main(argv: list[str] | None = None) -> int:
    """Check every Python version; the exit status says how it went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--python-version", action="append", dest="versions")
    args = parser.parse_args(argv)
    if not pypi_reachable():
        print(f"PyPI is not reachable ({PROBE_URL}): cannot check", file=sys.stderr)
        return EXIT_OFFLINE
    results = []
    for version in args.versions or PYTHON_VERSIONS:
        with tempfile.TemporaryDirectory(prefix=f"aarch64-cp{version}-") as tmp:
            results.append(check(version, args.pyproject, Path(tmp)))
    return 0 if all(results) else EXIT_UNRESOLVED


if __name__ == "__main__":
    sys.exit(main())
