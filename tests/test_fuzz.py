"""Fuzzing the two doors anyone can knock on: command payloads and bundle manifests. Whatever
arrives, the outcome is a reply or a one-line refusal, never an exception (seeded, bounded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import AE_BUNDLE, DEMO_BUNDLE
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from edge.bundle import MANIFEST, load_bundle, manifest_checksum
from edge.commands import CommandError, parse_command
from edge.control import Controller
from edge.daemon import Detector
from edge.errors import BundleError
from edge.settings import Settings

EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
NAMES = st.sampled_from(["mute", "unmute", "set_threshold", "reload_model", "status", "x", ""])
COMMANDS = st.fixed_dictionaries(
    {"command": NAMES},
    optional={
        "id": SCALARS,
        "minutes": SCALARS,
        "value": SCALARS,
        "path": st.sampled_from(["/dev/zero", "..", "/", "x.bundle", "a/../../b"]) | SCALARS,
        "extra": JSON,
    },
)


def as_payload(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@seed(20261130)
@EXAMPLES
@given(st.binary(max_size=300) | COMMANDS.map(as_payload) | JSON.map(as_payload))
def test_any_payload_parses_or_is_a_command_error(payload: bytes) -> None:
    try:
        parse_command(payload)
    except CommandError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Controller:
    folder = tmp_path_factory.mktemp("fuzz")
    s = Settings(device_id="fuzz", model=DEMO_BUNDLE, data_dir=folder, clips={"enabled": False})
    return Controller(Detector(s, load_bundle(DEMO_BUNDLE), []))


@seed(20261130)
@EXAMPLES
@given(COMMANDS.map(as_payload) | st.binary(max_size=200))
def test_any_payload_gets_a_reply(controller: Controller, payload: bytes) -> None:
    reply = controller.handle_payload(payload)
    assert reply.command and "\n" not in reply.detail
    controller.detector.unmute()


def mutate(manifest: dict, path: list[str | int], value: object, delete: bool) -> dict:
    """The manifest with one node replaced (or deleted) at a path into it."""
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return manifest


def paths(node: object, prefix: tuple = ()) -> list[list]:
    if isinstance(node, dict):
        out = [list(prefix)] if prefix else []
        for k, v in node.items():
            out += paths(v, (*prefix, k))
        return out
    if isinstance(node, list):
        out = [list(prefix)]
        for i, v in enumerate(node[:3]):
            out += paths(v, (*prefix, i))
        return out
    return [list(prefix)]


@pytest.mark.parametrize("source", [AE_BUNDLE, DEMO_BUNDLE], ids=["autoencoder", "fluctuation"])
def test_any_manifest_loads_or_is_refused_with_one_line(source: Path, tmp_path: Path) -> None:
    base = json.loads((source / MANIFEST).read_text())
    where = paths({k: v for k, v in base.items() if k != "checksum"})

    @seed(20261130)
    @EXAMPLES
    @given(st.sampled_from(where), JSON, st.booleans())
    def check(path: list, value: object, delete: bool) -> None:
        bundle = tmp_path / "b.bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(source, bundle)
        data = mutate(json.loads(json.dumps(base)), path, value, delete)
        data["checksum"] = manifest_checksum(data)  # past the checksum, into validation
        (bundle / MANIFEST).write_text(json.dumps(data, allow_nan=True))
        try:
            load_bundle(bundle)
        except BundleError as exc:
            assert "\n" not in str(exc)

    check()
