"""The edge runtime stays light: no TensorFlow, Keras, librosa or sounddevice behind it."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("tensorflow", "keras", "librosa", "numba", "sklearn", "sounddevice", "scipy")
EDGE_MODULES = (
    "edge",
    "edge.cli",
    "edge.daemon",
    "edge.pipeline",
    "edge.service",
    "edge.publish",
    "edge.demo",
    "edge.bundle",
    "edge.features",
    "edge.scoring",
    "edge.settings",
    "edge.sources",
    "edge.capture",
    "train",
    "train.evaluate",
    "train.metrics",
)


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {m.split(".")[0] for m in out}


def test_import_edge_loads_no_heavy_library() -> None:
    assert not loaded_after("import edge") & set(HEAVY)


def test_runtime_modules_and_evaluate_load_no_heavy_library() -> None:
    code = "\n".join(f"import {m}" for m in EDGE_MODULES)
    assert not loaded_after(code) & set(HEAVY)


def test_demo_and_evaluate_run_without_sounddevice() -> None:
    """PortAudio may be absent: block sounddevice and run the demo path."""
    code = (
        "import sys; sys.modules['sounddevice'] = None\n"
        "import io\nfrom edge.demo import run_demo\n"
        "d = run_demo(realtime=False, stream=io.StringIO())\nassert d.windows > 20"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
