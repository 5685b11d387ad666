"""A real uvicorn server running only the admin routes over an embedded Redis, for the admin and upload tests."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import redis
from fastapi import FastAPI

from server.api.admin import AdminSettings, admin_router
from server.api.errors import install_error_handlers
from server.api.auth import AdminAuth
from server.registry.store import Registry
from tests.archives import SPEC


@dataclass
class AdminServer:
    url: str
    redis_url: str
    token: str
    client: httpx.Client
    changes: list[tuple[str, str, int]] = field(default_factory=list)

    def upload(self, filename: str, data: bytes, method: str = "POST", path: str = "/admin/adapters",
               **fields: str) -> httpx.Response:
        return self.client.request(method, path, files={"file": (filename, data)}, data=fields)

    def redis_keys(self) -> list[str]:
        return sorted(k.decode() for k in redis.Redis.from_url(self.redis_url).keys("mpx:*"))


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; -> its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-admin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def admin_app(redis_url: str, settings: AdminSettings, on_change=None) -> tuple[FastAPI, AdminAuth]:
    registry = Registry.from_url(redis_url, chunk_bytes=4096)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await registry.close()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    router = admin_router(registry, SPEC, settings, on_change)
    app.include_router(router)
    return app, router.admin_auth
