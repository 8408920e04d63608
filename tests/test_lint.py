"""The code passes ruff (lint and format), as STYLE.md asks."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ruff_check_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
