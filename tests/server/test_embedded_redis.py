"""The embedded Redis's supervision (server/registry/embedded.py): a redis-server killed with SIGKILL is restarted at
the same socket on the same data, with a growing delay while it keeps dying; a deliberate close is not undone; and
when the process that owns it dies, a process sharing it takes over."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from server.registry.embedded import EmbeddedRedis, start_embedded_redis


def _client(embedded: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(embedded.url, socket_timeout=5)


def _pid(embedded: EmbeddedRedis) -> int:
    with _client(embedded) as client:
        return int(client.info("server")["process_id"])


def _wait_answering(embedded: EmbeddedRedis, other_than: int | None = None, timeout_s: float = 15.0) -> int:
    """-> the pid of the redis-server answering at `embedded.url`, once it is not `other_than`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid = _pid(embedded)
            if pid != other_than:
                return pid
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, f"no redis-server answering at {embedded.url} after {timeout_s}s"
        time.sleep(0.05)


def test_killed_redis_is_restarted_with_its_data(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="server.registry.embedded")
    with start_embedded_redis(tmp_path) as embedded:
        embedded.restart_delay_s = 0.1
        with _client(embedded) as client:
            client.set("mpx:kept", "yes")  # acknowledged: in the append-only file before the answer
        first = _pid(embedded)
        os.kill(first, signal.SIGKILL)
        second = _wait_answering(embedded, other_than=first)
        with _client(embedded) as client:
            assert client.get("mpx:kept") == b"yes"
        deadline = time.monotonic() + 10  # the new server answers a moment before its supervisor records it
        while not (embedded.pid == second and any("restarted at" in r.getMessage() for r in caplog.records)):
            assert time.monotonic() < deadline, (embedded.pid, second, [r.getMessage() for r in caplog.records])
            time.sleep(0.02)
        assert embedded.num_restarts == 1
        assert any("exited with code -9; restarting it in 0.1s" in r.getMessage() for r in caplog.records)
    assert not Path(embedded.socket_path).exists()  # closed: stopped, and not restarted


def test_restart_delay_doubles_while_it_keeps_dying(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="server.registry.embedded")
    with start_embedded_redis(tmp_path) as embedded:
        embedded.restart_delay_s = 0.1
        pid = _pid(embedded)
        for _ in range(3):
            os.kill(pid, signal.SIGKILL)
            pid = _wait_answering(embedded, other_than=pid)
    delays = [float(m) for r in caplog.records for m in re.findall(r"restarting it in ([0-9.]+)s", r.getMessage())]
    assert delays == [0.1, 0.2, 0.4]


def test_close_is_not_undone(tmp_path):
    embedded = start_embedded_redis(tmp_path)
    embedded.restart_delay_s = 0.1
    embedded.close()
    time.sleep(0.5)
    assert not Path(embedded.socket_path).exists() and embedded.pid is None
    embedded.close()  # idempotent


def test_a_sharing_process_takes_over_when_the_owner_dies(tmp_path):
    script = (f"import time, redis; from server.registry.embedded import start_embedded_redis\n"
              f"e = start_embedded_redis({str(tmp_path)!r})\n"
              f"redis.Redis.from_url(e.url).set('mpx:probe', 'kept')\n"
              f"print(e.url, flush=True); time.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        url = owner.stdout.readline().strip()
        assert url.startswith("unix://"), url
        with start_embedded_redis(tmp_path) as sharer:
            assert not sharer.is_owner and sharer.url == url
            first = _pid(sharer)
            owner.kill()  # its redis-server goes with it (SIGTERM on its death)
            owner.wait()
            _wait_answering(sharer, other_than=first, timeout_s=30)
            assert sharer.is_owner
            with _client(sharer) as client:
                assert client.get("mpx:probe") == b"kept"
    finally:
        owner.kill()
        owner.wait()
