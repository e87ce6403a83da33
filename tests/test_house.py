"""The house's walls (docs/ARCHITECTURE.md), beyond what ``lint-imports`` checks: no circle between modules
at module level, no late import without its reason beside it, and each idea spelled in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "store", "worker", "service", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """Our modules an import statement loads (the longest known prefix of each name)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            package = module.split(".") if is_package else module.split(".")[: -node.level]
            base = ".".join([*package, *([base] if base else [])])
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        if parts and ".".join(parts) != module:
            out.add(".".join(parts))
    return out


def test_no_circle_between_modules_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(node, module)
        graph[module] = edges
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            # A package importing its own submodules (re-exports in __init__) is not a circle.
            if node.startswith(target + ".") or target.startswith(node + "."):
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert circles == []


def test_every_late_import_says_why() -> None:
    """An import inside a function is allowed only with its reason on the same line or the line above
    (``# imports Keras: only after the environment is set``, ``# optional dependency``, ...)."""
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    line = lines[inner.lineno - 1]
                    above = lines[inner.lineno - 2].strip() if inner.lineno > 1 else ""
                    if "#" not in line and not above.startswith("#"):
                        silent.append(f"{module}:{inner.lineno}: {line.strip()}")
    assert silent == []


def _is_schema_history(path: Path) -> bool:
    """Schema revisions (and the pre-Alembic steps) are history: frozen, they spell the names of their day."""
    relative = path.relative_to(ROOT).as_posix()
    return relative.startswith("store/alembic/versions/") or relative == "store/legacy.py"


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        (
            "job states",
            r"""["'](queued|running|succeeded|failed|cancelled|interrupted)["']""",
            "core/states.py",
        ),
        ("the task name", r"""["']gpuyard\.train["']""", "worker/queues.py"),
        ("the operation task's name", r"""["']gpuyard\.operate["']""", "worker/queues.py"),
        (
            "artifact names",
            r"""["'](model\.h5|model\.keras|history\.json|diagnostics\.json|summary\.json)["']""",
            "core/names.py",
        ),
        ("export artifact names", r"""["'](model\.onnx|saved_model\.zip)["']""", "core/names.py"),
        ("the trainer log name", r"""["']trainer\.log["']""", "core/names.py"),
    ],
)
def test_each_name_is_spelled_once(what: str, pattern: str, home: str) -> None:
    """Spelled as a string in the module that defines it, and at most one other (the trainer's ``failed``
    event shares a word with the job state)."""
    spelled = sorted(
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if re.search(pattern, path.read_text()) and not _is_schema_history(path)
    )
    assert home in spelled and len(spelled) <= 2, f"{what} spelled as a string in {spelled}"


# ── the second floor (issue 19) ──────────────────────────────────────────────────────────────────────────
# Execution code: what runs a job or a model operation. The API and the client commands start the trainer
# only as a process (core/trainer.py builds its command line) and never import these.
EXECUTION = ("worker.supervisor", "worker.trainer", "worker.operations")
# `gpuyard worker` and `gpuyard up` run the Celery workers (which run jobs); the CLI's root registers them.
RUNS_WORKERS = ("cli.main", "cli.workers", "cli.serve")


def _imports_anywhere(module: str) -> set[str]:
    """Our modules ``module`` imports, at module level or late (inside functions), TYPE_CHECKING included."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _imported(node, module)
    return found


def test_the_api_and_the_client_commands_import_no_execution_code() -> None:
    """The API side calls the worker's store, queue, dispatch planning and submit operation, never the code
    that runs a job (the same wall as the forbidden contract in pyproject.toml, also for late imports)."""
    api_side = [m for m in MODULES if m.split(".")[0] == "service" or (m.startswith("cli.") and m not in RUNS_WORKERS)]
    assert "service.api.operations" in api_side and "service.checks" in api_side
    crossing = sorted(
        f"{module} imports {target}"
        for module in api_side
        for target in _imports_anywhere(module)
        if any(target == e or target.startswith(e + ".") for e in EXECUTION)
    )
    assert crossing == []


def test_the_trainer_command_line_is_built_in_one_module() -> None:
    """``-m worker.trainer`` is spelled in core/trainer.py only: the supervisor, the warm pool, the dry run,
    smoke and demo call its trainer_argv, which a test parses back with the trainer's own parser."""
    pattern = re.compile(r"""["']-m["']\s*,\s*["']worker\.trainer""")
    spelled = sorted(str(path.relative_to(ROOT)) for path in MODULES.values() if pattern.search(path.read_text()))
    assert spelled == ["core/trainer.py"]


def test_heartbeats_are_keyed_in_one_module() -> None:
    spelled = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if "gpuyard:gpu:" in p.read_text())
    assert spelled == ["worker/heartbeat.py"]


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
# Over the limits when this test was written, each with who is splitting it; the list may only shrink.
KNOWN_LONG: dict[str, str] = {}


def _too_long() -> set[str]:
    found: set[str] = set()
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in (".venv", "bench", "examples", "build") or "site-packages" in relative.parts:
            continue
        if relative.parts[:3] == ("store", "alembic", "versions"):
            continue  # schema revisions are frozen history, written once and never edited
        text = path.read_text()
        if relative.parts[0] in PACKAGES and len(text.splitlines()) > MAX_MODULE_LINES:
            found.add(str(relative))
        tree = ast.parse(text)
        for owner in ast.walk(tree):
            for node in ast.iter_child_nodes(owner):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1 if node.end_lineno else 0
                    if lines > MAX_FUNCTION_LINES:
                        prefix = f"{owner.name}." if isinstance(owner, ast.ClassDef) else ""
                        found.add(f"{relative}::{prefix}{node.name}")
    return found


def test_no_module_over_600_lines_and_no_function_over_100() -> None:
    """Product modules stay under 600 lines and functions (tests too) under 100, outside bench/ and examples/."""
    too_long = _too_long()
    assert sorted(too_long - set(KNOWN_LONG)) == [], "split it (one idea per module, one step per function)"
    assert sorted(set(KNOWN_LONG) - too_long) == [], "fixed: take it off KNOWN_LONG"
