"""The deployment files: compose validates, the Dockerfiles follow the rules, and every environment variable that
compose, the Dockerfiles and .env.example name is one the server reads (and .env.example names all of them).

No Docker engine runs here: `docker compose config` runs only when the docker client and its compose plugin are
installed; the rest reads the files.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SERVER_ENV = re.compile(r"\b(MULTIPLEX_[A-Z0-9_]*[A-Z0-9]|REDIS_URL)\b")
ENV_ASSIGNMENT = re.compile(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
CUDA_TORCH_IMAGE = re.compile(r"^pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)$")


def _alias_names(call: ast.expr) -> set[str] | None:
    """The environment names a `Field(...)` call declares with validation_alias/alias (a string or AliasChoices)."""
    if not isinstance(call, ast.Call):
        return None
    for kw in call.keywords:
        if kw.arg in ("validation_alias", "alias"):
            values = kw.value.args if isinstance(kw.value, ast.Call) else [kw.value]
            return {v.value.upper() for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return None


def settings_env_groups(config_py: Path) -> list[set[str]]:
    """One set of accepted environment names per field of a pydantic-settings class with an env_prefix:
    `<prefix><FIELD>`, or the field's aliases (names are case-insensitive, so upper-cased)."""
    tree = ast.parse(config_py.read_text())
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    groups: list[set[str]] = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        prefix = None
        for node in cls.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "model_config" for t in node.targets):
                for kw in getattr(node.value, "keywords", []):
                    if kw.arg == "env_prefix":
                        prefix = kw.value.value if isinstance(kw.value, ast.Constant) else constants.get(kw.value.id)
        if prefix is None:
            continue
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                aliases = _alias_names(node.value) if node.value is not None else None
                groups.append(aliases or {f"{prefix}{node.target.id}".upper()})
    return groups


def server_env_groups() -> list[set[str]]:
    """What the server reads, one set of accepted names per setting: its Settings fields, plus every name written
    out in its source (os.environ reads in the registry, auth and admin modules, and their documentation)."""
    groups = settings_env_groups(REPO / "server" / "config.py")
    known = set().union(*groups)
    for path in sorted((REPO / "server").rglob("*.py")):
        for name in sorted(set(SERVER_ENV.findall(path.read_text())) - known):
            groups.append({name})
            known.add(name)
    return groups


def env_example_names() -> set[str]:
    return {n for n in ENV_ASSIGNMENT.findall((REPO / ".env.example").read_text()) if SERVER_ENV.fullmatch(n)}


def load_compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose_env_names(compose: dict) -> set[str]:
    """Server variables compose names: its services' environment keys and the ${VAR} it interpolates."""
    names = {n for n in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (DOCKER / "compose.yaml").read_text())}
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        names |= set(environment) if isinstance(environment, dict) else {e.split("=")[0] for e in environment}
    return {n for n in names if SERVER_ENV.fullmatch(n)}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def resolved_from(instructions: list[tuple[str, str]]) -> str:
    args = dict(re.match(r"(\w+)=?(\S*)", a).groups() for i, a in instructions if i == "ARG")
    image = next(a for i, a in instructions if i == "FROM").split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


# --- environment variables ------------------------------------------------------------------------------------------

def test_env_example_names_exactly_what_the_server_reads() -> None:
    groups, example = server_env_groups(), env_example_names()
    assert groups, "found no MULTIPLEX_* variable in the server's source"
    missing = sorted(" or ".join(sorted(g)) for g in groups if not g & example)
    extra = sorted(example - set().union(*groups))
    assert not missing and not extra, (f"only in .env.example: {extra}; "
                                       f"read by the server but missing from .env.example: {missing}")


def test_compose_and_dockerfiles_name_only_variables_the_server_reads() -> None:
    server = set().union(*server_env_groups())
    unknown = compose_env_names(load_compose()) - server
    assert not unknown, f"compose sets variables the server does not read: {sorted(unknown)}"
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        env = " ".join(a for i, a in dockerfile_instructions(DOCKER / dockerfile) if i == "ENV")
        unknown = set(SERVER_ENV.findall(env)) - server
        assert not unknown, f"{dockerfile} sets variables the server does not read: {sorted(unknown)}"


def test_settings_parser_sees_the_config_fields() -> None:
    """The AST reading of server/config.py agrees with the settings class itself."""
    from server.config import ENV_PREFIX, Settings

    expected = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        choices = getattr(alias, "choices", [alias] if alias else [])
        expected.append({c.upper() for c in choices if isinstance(c, str)} or {f"{ENV_PREFIX}{name}".upper()})
    assert settings_env_groups(REPO / "server" / "config.py") == expected


# --- Dockerfiles ----------------------------------------------------------------------------------------------------

def test_dockerfile_rules() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    kinds = [i for i, _ in instructions]
    assert CUDA_TORCH_IMAGE.match(resolved_from(instructions)), resolved_from(instructions)
    users = [a.split(":")[0] for i, a in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0"), f"the image must end as a non-root user, got {users}"
    assert "/health" in dict(instructions).get("HEALTHCHECK", ""), "a HEALTHCHECK on /health is required"
    assert "8000" in " ".join(a for i, a in instructions if i == "EXPOSE").split(), "EXPOSE 8000 is required"
    assert dict(instructions)["CMD"].replace(" ", "") == '["multiplex","serve","--host","0.0.0.0"]'
    for instruction, args in instructions:
        for install in re.findall(r"pip3?\s+install\b[^&;|]*", args) if instruction == "RUN" else []:
            requirements = [token.strip("'\"") for token in install.split()[2:]]
            assert not any(re.fullmatch(r"torch([<>=!~\[].*)?", r) for r in requirements), (
                f"the CUDA image must keep its torch; found: {install!r}")
    last_pip = max(k for k, (i, args) in enumerate(instructions) if i == "RUN" and "pip" in args)
    assert kinds.index("USER") > last_pip, "install as root, then switch to the non-root user"


def test_both_images_have_a_c_compiler() -> None:
    """Our CPU kernels (kernels/cpu_*.c, shipped as package data) and Triton's launchers compile at run time."""
    for name in ("Dockerfile", "Dockerfile.cpu"):
        runs = " ".join(a for i, a in dockerfile_instructions(DOCKER / name) if i == "RUN")
        assert re.search(r"apt-get install[^&]*\bgcc\b", runs), f"{name} installs no C compiler"


def test_cpu_dockerfile_rules() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.cpu")
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs, "the CPU image installs torch from the CPU wheel index"
    assert [a for i, a in instructions if i == "USER"][-1] not in ("root", "0")
    assert any(i == "HEALTHCHECK" for i, _ in instructions)
    assert "MULTIPLEX_DEVICE=cpu" in " ".join(a for i, a in instructions if i == "ENV")


# --- compose --------------------------------------------------------------------------------------------------------

def test_compose_structure() -> None:
    compose = load_compose()
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.split(":")[0] in compose["volumes"] for v in redis["volumes"]), "redis data on a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]

    server = services["server"]
    assert "profiles" not in server, "plain `docker compose up` must start the GPU server"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8000") for p in server["ports"])
    assert any(str(e.get("path", e)).endswith(".env") for e in server["env_file"])
    assert server["environment"]["REDIS_URL"].startswith("${REDIS_URL:-redis://redis:6379")

    cpu = services["server-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["MULTIPLEX_DEVICE"] == "cpu" and cpu["build"]["dockerfile"].endswith("Dockerfile.cpu")

    replica, nginx = services["replica"], services["nginx"]
    assert replica["profiles"] == nginx["profiles"] == ["replicas"]
    assert str(replica["deploy"]["replicas"]).startswith("${REPLICAS")
    assert nginx["depends_on"]["replica"]["condition"] == "service_healthy"
    assert any(v.startswith("./nginx.conf:") for v in nginx["volumes"])


def test_nginx_routes_by_adapter_with_consistent_hashing() -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    code = "\n".join(line.split("#")[0] for line in conf.splitlines())
    key = re.search(r"hash\s+\$(\w+)\s+consistent;", code)
    assert key, "the upstream must use consistent hashing"
    assert key.group(1) == "http_x_adapter_id" or re.search(
        rf"map\s+\$http_x_adapter_id\s+\${key.group(1)}\s*{{[^}}]*default\s+\$http_x_adapter_id;", code), \
        "the hash key must be the X-Adapter-Id header"
    assert re.search(r"server\s+replica:8000", code)
    assert re.search(r"proxy_buffering\s+off;", code), "SSE streams must not be buffered"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """`nginx -t` on the config inside a minimal http block (the replicas' name resolves only in compose)."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed")
    site = (DOCKER / "nginx.conf").read_text().replace("server replica:8000", "server 127.0.0.1:8000")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path};\n  proxy_temp_path {tmp_path};\n"
        f"  include {tmp_path}/site.conf;\n}}\n")
    result = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def _docker_compose_available() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if probe.returncode != 0:
        detail = " ".join(probe.stderr.split())[:200]
        return f"the docker compose plugin is not installed (`docker compose version`: {detail})"
    return None


@pytest.mark.parametrize("profiles", [[], ["cpu"], ["replicas"]], ids=["default", "cpu", "replicas"])
def test_compose_config_validates(profiles: list[str], tmp_path: Path) -> None:
    reason = _docker_compose_available()
    if reason:
        pytest.skip(reason)
    env_file = tmp_path / ".env"
    env_file.write_text((REPO / ".env.example").read_text())
    command = ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file)]
    for profile in profiles:
        command += ["--profile", profile]
    result = subprocess.run([*command, "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_compose_file_follows_the_compose_specification_schema() -> None:
    """Without Docker, the next best check: compose.yaml against the Compose Specification's JSON schema
    (tests/clients/data/compose-spec.json, from github.com/compose-spec/compose-spec, Apache-2.0, commit 170098b).
    The same validator must refuse a broken copy, so the check can fail."""
    import copy
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = load_compose()
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = copy.deepcopy(compose)
    broken["services"]["server"]["enviroment"] = {"MULTIPLEX_DEVICE": "cuda"}  # misspelt key
    broken["services"]["server"]["depends_on"]["redis"]["condition"] = "healthy"  # not a condition compose knows
    assert len(list(validator.iter_errors(broken))) >= 2
