"""What `/health` waits for before it answers 200: the model loaded and its engine running, the `--adapters`
directory seeded into the registry, and the registry's Redis answering. Each check is a name -> problem (None when
fine), set by whoever owns the condition; `/health` only reads them, so it never waits on Redis itself.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

REDIS_PROBE_INTERVAL_S = 1.0
REDIS_PROBE_TIMEOUT_S = 2.0


class Readiness:
    def __init__(self, *names: str) -> None:
        self._problems: dict[str, str | None] = {name: "not checked yet" for name in names}

    def set(self, name: str, problem: str | None) -> None:
        """`problem` None marks `name` as ready; a string says what is wrong."""
        self._problems[name] = problem

    def problems(self) -> dict[str, str]:
        return {name: problem for name, problem in self._problems.items() if problem is not None}

    @property
    def is_ready(self) -> bool:
        return not self.problems()


async def probe_redis(ping: Callable[[], Awaitable[bool]], readiness: Readiness) -> None:
    """Ping the registry's Redis every second (a lifespan task); a failure is a problem until a ping succeeds."""
    while True:
        try:
            await asyncio.wait_for(ping(), REDIS_PROBE_TIMEOUT_S)
            problem = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure to answer: connection refused, timeout, loading, ...
            problem = f"redis unreachable: {type(exc).__name__}: {exc}"[:300]
        if problem != readiness.problems().get("redis"):
            (log.warning if problem else log.info)("registry: %s", problem or "redis reachable")
        readiness.set("redis", problem)
        await asyncio.sleep(REDIS_PROBE_INTERVAL_S)
