"""`soundsentry demo`: the bundled fan model hears a bundled clip (normal, then a real fault)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from edge.bundle import load_bundle
from edge.daemon import Detector
from edge.errors import SoundSentryError
from edge.messages import EventMessage
from edge.pipeline import Step
from edge.settings import Settings
from edge.sink import Sink
from edge.sources import FileSource

DEMO_MODEL = "fan-demo.bundle"
DEMO_CLIP = "demo-fan-normal-then-fault.flac"
METER_WIDTH = 30
METER_FULL_SCALE = 2.0
"""The meter spans 0 .. 2x the threshold."""


def bundled_dir() -> Path:
    """The folder holding the bundled model and clip (in the wheel, or the source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_bundled_models", here.parent / "models"):
        if (candidate / DEMO_MODEL).is_dir():
            return candidate
    raise SoundSentryError("the bundled demo model is missing from this installation")


class ConsoleSink(Sink):
    """Human-readable events for the terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def event(self, message: EventMessage) -> None:
        """Print an event as a banner and its JSON payload."""
        banner = {"start": ">>> ANOMALY START", "update": "... ANOMALY UPDATE"}.get(
            message.type, "<<< ANOMALY END"
        )
        self.stream.write(f"{banner}  {json.dumps(message.to_dict())}\n")
        self.stream.flush()


def meter_line(step: Step, threshold: float) -> str:
    """One line per window: time, score and a bar with the threshold marked."""
    filled = min(METER_WIDTH, int(step.window.score / (threshold * METER_FULL_SCALE) * METER_WIDTH))
    mark = METER_WIDTH // int(METER_FULL_SCALE)
    bar = "".join("|" if i == mark else ("#" if i < filled else " ") for i in range(METER_WIDTH))
    flag = "ABOVE" if step.window.score > threshold else ""
    return f"  {step.end_s:6.1f} s  score {step.window.score:7.4f}  [{bar}]  {flag}"


def run_demo(realtime: bool = True, stream: TextIO | None = None) -> Detector:
    """Stream the bundled clip through the bundled model, showing every window and event."""
    out = stream or sys.stdout
    folder = bundled_dir()
    bundle = load_bundle(folder / DEMO_MODEL)
    source = FileSource([folder / DEMO_CLIP], bundle.features.samplerate, realtime=realtime)
    settings = Settings(device_id="demo", model=folder / DEMO_MODEL, clips={"enabled": False})
    out.write(
        f"SoundSentry demo: model {bundle.model_id}, {source.seconds:.0f} s of a MIMII fan "
        f"(normal, then a real fault, then normal).\n"
        f"One line per {bundle.features.window_seconds:g}-s window every "
        f"{bundle.features.hop_seconds:g} s; '|' marks the threshold "
        f"{bundle.threshold:.4g}.\n"
    )
    detector = Detector(
        settings,
        bundle,
        [ConsoleSink(out)],
        on_step=lambda step: out.write(meter_line(step, detector.threshold) + "\n"),
        live=False,  # a recording, not a device: no "calibrate it" advice on a first run
    )
    detector.run(source)
    out.write(f"done: {detector.windows} windows scored.\n")
    out.flush()
    return detector
