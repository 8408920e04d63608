"""Import rules. The layers: `edge` (the runtime on the Pi) imports neither `train` nor
`soundsentry`; `train` may import `edge`; `soundsentry` (the command and its reports) may
import both. No import cycles among their modules. And the edge runtime stays light: no
TensorFlow, Keras, librosa, matplotlib or sounddevice behind it.

The rules are read from the source (the AST of every file, imports inside functions
included), not from what one run happens to import.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from conftest import ROOT

PACKAGES = ("edge", "train", "soundsentry")
# What each package may import of the others (itself always).
ALLOWED = {"edge": set(), "train": {"edge"}, "soundsentry": {"edge", "train"}}

HEAVY = (
    "tensorflow",
    "keras",
    "librosa",
    "numba",
    "sklearn",
    "sounddevice",
    "scipy",
    "matplotlib",
)
LIGHT_MODULES = (
    "edge",
    "edge.daemon",
    "edge.pipeline",
    "edge.service",
    "edge.publish",
    "edge.broker",
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
    "soundsentry",
    "soundsentry.cli",
    "soundsentry.commands.common",
    "soundsentry.commands.training",
    "soundsentry.commands.evaluation",
    "soundsentry.commands.detection",
    "soundsentry.commands.tools",
    "soundsentry.report",
)
COMMANDS = (
    "train",
    "calibrate",
    "evaluate",
    "spectrogram",
    "replay",
    "run",
    "record",
    "doctor",
    "demo",
)


# --- reading imports from the source ---------------------------------------------------------


def module_name(path: Path) -> str:
    """`edge/bundle.py` -> `edge.bundle`; `edge/__init__.py` -> `edge`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the three packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[module_name(path)] = path
    return files


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


class Import(NamedTuple):
    line: int
    module: str
    names: tuple[str, ...] = ()
    type_only: bool = False
    """Under `if TYPE_CHECKING:`: read by type checkers, never run."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_call(node: ast.Call) -> str | None:
    """The literal name in `importlib.import_module("x")`, `import_module("x")`,
    `__import__("x")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value if not arg.value.startswith(".") else None
    return None


def imports_in(
    source: str, importer: str, is_package: bool = False, filename: str = "<source>"
) -> list[Import]:
    """Every import in `source`, the code of module `importer`, in line order.

    Module level, inside functions and classes, under `if`/`try` alike; relative imports
    resolved; `importlib.import_module("x")` and `__import__("x")` with a literal name too.
    """
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, a.name, (), type_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, importer, is_package)
            names = tuple(a.name for a in node.names)
            found.append(Import(node.lineno, target, names, type_only))
        elif isinstance(node, ast.Call) and (target := _import_call(node)):
            found.append(Import(node.lineno, target, (), type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(source, filename=filename), False)
    return sorted(found)


def imports_of(path: Path) -> list[Import]:
    """`imports_in` of a file of the three packages."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", str(path))


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def import_graph() -> dict[str, dict[str, str]]:
    """Module -> {imported module of the three packages: file:line of the first such import}.

    Imports at module level and inside functions both count: a function-level import only
    defers a cycle to the first call. Imports under `if TYPE_CHECKING:` do not: they never
    run (the layer rule still applies to them). `from pkg import name` points at `pkg.name`
    when that is a module, else at `pkg`.
    """
    files = source_files()
    graph: dict[str, dict[str, str]] = {m: {} for m in files}
    for module, path in files.items():
        for line, target, names, type_only in imports_of(path):
            if type_only:
                continue
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            if not candidates:
                # `import a.b.c` where only `a.b` is a module of ours: the deepest that is.
                parts = target.split(".")
                while parts and ".".join(parts) not in files:
                    parts.pop()
                candidates = [".".join(parts)] if parts else []
            for dep in candidates:
                if dep != module:
                    graph[module].setdefault(dep, where(path, line))
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, {})):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# --- the layers ------------------------------------------------------------------------------


def test_the_source_files_are_found() -> None:
    files = source_files()
    for module in ("edge", "edge.bundle", "train.evaluate", "soundsentry.cli"):
        assert module in files, module
    assert "edge.__main__" not in files, "edge is a library: `python -m soundsentry` is the command"
    assert "edge.cli" not in files


def test_the_import_reader_sees_every_kind_of_import() -> None:
    """The reader itself: nested, relative, aliased, type-only and importlib imports."""
    code = (
        "import os\n"
        "def f():\n"
        "    import train.trainer as t\n"
        "    from soundsentry import cli\n"
        "class C:\n"
        "    def g(self):\n"
        "        try:\n"
        "            from .bundle import load_bundle\n"
        "        except ImportError:\n"
        "            importlib.import_module('train.report')\n"
        "        from . import features\n"
        "        return __import__('soundsentry.report')\n"
        "if TYPE_CHECKING:\n"
        "    from edge.settings import Settings\n"
        "else:\n"
        "    import json\n"
    )
    assert imports_in(code, "edge.fake") == [
        Import(1, "os"),
        Import(3, "train.trainer"),
        Import(4, "soundsentry", ("cli",)),
        Import(8, "edge.bundle", ("load_bundle",)),
        Import(10, "train.report"),
        Import(11, "edge", ("features",)),
        Import(12, "soundsentry.report"),
        Import(14, "edge.settings", ("Settings",), type_only=True),
        Import(16, "json"),
    ]
    assert imports_in("from .x import y", "edge", is_package=True) == [Import(1, "edge.x", ("y",))]


def test_each_package_imports_only_the_layers_below_it() -> None:
    """edge imports neither train nor soundsentry (not even inside a function); train never
    imports soundsentry."""
    bad = []
    for module, path in source_files().items():
        own = module.split(".")[0]
        for line, target, *_ in imports_of(path):
            top = target.split(".")[0]
            if top in PACKAGES and top != own and top not in ALLOWED[own]:
                bad.append(f"{where(path, line)}: {own} imports {target}")
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert graph.get("soundsentry.cli"), "the graph should see the CLI's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + "\n".join(
        f"  {a} -> {b}  ({graph[a][b]})" for a, b in itertools.pairwise(cycle)
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "x"}, "b": {}, "c": {"a": "y"}}) is None


# --- light at run time -----------------------------------------------------------------------


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
    code = "\n".join(f"import {m}" for m in LIGHT_MODULES)
    assert not loaded_after(code) & set(HEAVY)


def test_the_demo_runs_without_sounddevice() -> None:
    """PortAudio may be absent: block sounddevice and run the demo path."""
    code = (
        "import sys; sys.modules['sounddevice'] = None\n"
        "import io\nfrom edge.demo import run_demo\n"
        "d = run_demo(realtime=False, stream=io.StringIO())\nassert d.windows > 20"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_python_m_soundsentry_is_the_command() -> None:
    """`python -m soundsentry` parses every command, with the heavy libraries blocked."""
    code = (
        "import sys, contextlib, io\n"
        f"for m in {HEAVY!r}: sys.modules[m] = None\n"
        "from soundsentry.cli import main\n"
        f"for c in {COMMANDS!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([c, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, c\n"
        "    assert 'usage: soundsentry ' + c in out.getvalue(), c\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "-m", "soundsentry", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert all(c in proc.stdout for c in COMMANDS)
