"""The import map, checked: no cycles among the project's modules, and imports flow one way
(api -> registry -> engine -> model -> kernels; server -> adapters; adapters and kernels import neither each other
nor server; clients import nothing of the others); HTTP (FastAPI, Starlette) stays in server.api and the
composition root; the top level of server/ only assembles the process. Every import counts, also those inside
functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "kernels", "adapters", "clients", "benchmarks")

# module prefix -> prefixes it must never import
FORBIDDEN = {
    "kernels": ("server", "adapters", "clients", "benchmarks"),
    "adapters": ("server", "kernels", "clients", "benchmarks"),
    "clients": ("server", "kernels", "adapters", "benchmarks"),
    "server.model": ("server.engine", "server.api", "server.registry"),
    "server.registry": ("server.api", "server.service", "server.cli"),
    # the engine and the model know nothing of HTTP, Redis or how the process is assembled
    "server.engine": ("server.api", "server.registry", "server.service", "server.cli"),
    "server": ("benchmarks",),
}
# module prefix -> third-party packages it must never import
HTTP_PACKAGES = ("fastapi", "starlette", "uvicorn")
FORBIDDEN_EXTERNAL = {"server.registry": HTTP_PACKAGES, "server.engine": HTTP_PACKAGES, "server.model": HTTP_PACKAGES}
# server/ itself: settings, the composition root, the CLI; every concern lives in a sub-package
SERVER_TOP_LEVEL = {"__init__", "__main__", "config", "service", "cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (a `from pkg import x` counts as pkg.x when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # 'server.api.errors.ApiError' -> 'server.api.errors'
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _external_imports(path: Path) -> set[str]:
    """The top-level names of what `path` imports absolutely (`from redis.asyncio import Redis` -> redis)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_flow_one_way():
    bad = []
    for module, targets in _graph().items():
        for prefix, forbidden in FORBIDDEN.items():
            if _within(module, prefix):
                bad += [f"{module} -> {t}" for t in targets for f in forbidden if _within(t, f)]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(set(bad)))


# The serving path runs no trainer code (the meaning of every delta, PARA's vectors included, is adapters.delta's),
# and nothing in the adapters library depends on the research scripts.
SERVING = ("server.api", "server.registry", "server.engine", "server.model")
TRAINER = ("adapters.methods", "adapters.train", "adapters.research", "adapters.evaluate", "adapters.data")


def test_serving_runs_no_trainer_code():
    bad = [f"{m} -> {t}" for m, targets in _graph().items() if any(_within(m, p) for p in SERVING)
           for t in targets if any(_within(t, p) for p in TRAINER)]
    assert not bad, "the serving path imports trainer code:\n" + "\n".join(sorted(bad))


def test_research_scripts_stand_apart():
    bad = [f"{m} -> {t}" for m, targets in _graph().items()
           if _within(m, "adapters") and not _within(m, "adapters.research")
           for t in targets if _within(t, "adapters.research")]
    assert not bad, "the adapters library imports a research script:\n" + "\n".join(sorted(bad))


def test_http_stays_in_the_api():
    bad = []
    for module, path in _modules().items():
        for prefix, forbidden in FORBIDDEN_EXTERNAL.items():
            if _within(module, prefix):
                bad += [f"{module} -> {p}" for p in sorted(_external_imports(path) & set(forbidden))]
    assert not bad, "third-party imports against the layering:\n" + "\n".join(sorted(set(bad)))


def test_server_top_level_only_assembles():
    loose = {p.stem for p in (ROOT / "server").glob("*.py")} - SERVER_TOP_LEVEL
    assert not loose, f"modules at the top of server/ that belong in a sub-package: {sorted(loose)}"


def test_no_import_cycles():
    # packages' __init__ modules re-export their children; an edge into a parent package is not a cycle by itself
    graph = {m: {t for t in ts if not _within(m, t)} for m, ts in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_test_modules_do_not_import_each_other():
    """Shared test code lives in tests/helpers.py, tests/archives.py, tests/admin_server.py, tests/live_server.py
    and tests/e2e/serving.py, never in a test module another one imports."""
    bad = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith("test_"):
                bad.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["kernels.lowrank", "adapters.artifact", "server.engine.engine"])
def test_the_walker_sees_imports(module):
    """The checks above are only as good as the walker: it must see these modules' known imports."""
    graph = _graph()
    assert graph[module], f"{module}: no project imports found"


def test_the_walker_sees_third_party_imports():
    assert {"fastapi", "starlette", "redis"} <= _external_imports(ROOT / "server" / "api" / "auth.py")
    assert "redis" in _external_imports(ROOT / "server" / "registry" / "api_keys.py")
