"""The engine loop beside the async API: a background thread runs `LLMEngine.step()` while the event loop serves
HTTP. The API talks to it only through an inbox (add/abort) and per-request asyncio queues (outputs).

To build one: `server.engine.builder.build_engine(model, adapters_dir, device=..., dtype=..., max_num_seqs=...,
max_model_len=..., num_kv_blocks=..., block_size=..., data_dir=...)` (keyword overrides of `EngineOptions`)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

from server.engine.engine import LLMEngine
from server.engine.errors import EngineOverloadedError, PromptTooLongError, TenantOverloadedError
from server.engine.request import Request, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, model_name: str, adapters, max_queue: int = 1024,
                 max_queue_per_tenant: int | None = None) -> None:
        """`adapters`: an adapter source (server/registry/adapters.py) with async `list(tenant)` and `resolve(id, tenant)`.
        max_queue: requests held at once (running, waiting or resolving their adapter), beyond which a request is
        refused (503); max_queue_per_tenant: the same for each tenant (429; default max_queue), so that one tenant's
        flood cannot take every place (requests without a tenant are not counted per tenant)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.adapters = adapters
        self.max_queue = max_queue
        self.max_queue_per_tenant = max_queue if max_queue_per_tenant is None else max_queue_per_tenant
        self._per_tenant: Counter[str] = Counter()  # requests held per tenant, admitted until their stream ends
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_resolving = 0  # requests admitted whose adapter is still being resolved (maybe fetched)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._tokens_window: list[tuple[float, int]] = []

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="multiplex-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ---- API side ---------------------------------------------------------------------------------------------
    async def list_adapters(self, tenant: str | None = None) -> list[str]:
        return await self.adapters.list(tenant)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None, tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Raises UnknownAdapterError / AdapterQuarantinedError / PromptTooLongError / EngineOverloadedError (its
        subclass TenantOverloadedError at the tenant's limit) before yielding anything."""
        if not prompt_ids:
            raise PromptTooLongError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens")
        # The limit counts requests still resolving their adapter too: their slot is taken before the fetch is
        # awaited and passes to the stream without an await in between, so concurrent cold requests cannot overrun it.
        if len(self._streams) + self._num_resolving >= self.max_queue:
            raise EngineOverloadedError(f"server is at its limit of {self.max_queue} requests; retry later")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        if tenant is not None and self._per_tenant[tenant] >= self.max_queue_per_tenant:
            raise TenantOverloadedError(f"this tenant has {self._per_tenant[tenant]} requests in flight, the most one "
                                        f"tenant may have on this server; retry when some have finished")
        self._hold(tenant, +1)  # given back however the request ends: refused, finished, failed or abandoned
        try:
            self._num_resolving += 1
            try:
                ref = await self.adapters.resolve(adapter_id, tenant) if adapter_id is not None else None  # may fetch
                if ref is not None:
                    self.engine.check_adapter(ref)  # a quarantined version is refused here, not failed in a stream
            finally:
                self._num_resolving -= 1  # on every exit: resolved, refused, failed or cancelled
            stream: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._inbox.put(("add", Request(request_id, list(prompt_ids), params, adapter=ref, tenant=tenant)))
            self._wake.set()
            finished = False
            try:
                while not finished:
                    out: RequestOutput = await stream.get()
                    finished = out.finished
                    yield out
            finally:
                self._streams.pop(request_id, None)
                if not finished:  # the consumer went away (client disconnected): free its blocks and adapter pin
                    self.abort(request_id)
        finally:
            self._hold(tenant, -1)

    def _hold(self, tenant: str | None, delta: int) -> None:
        """Count a request of `tenant` in (+1) or out (-1); requests without a tenant are not counted."""
        if tenant is not None:
            self._per_tenant[tenant] += delta
            if self._per_tenant[tenant] <= 0:
                del self._per_tenant[tenant]

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    @property
    def metrics_registry(self):
        """The engine's Prometheus histograms (server/engine/metrics.py), exported by /metrics."""
        return self.engine.metrics_registry

    def stats(self) -> dict:
        now = time.monotonic()
        recent = [n for t, n in self._tokens_window if now - t < 10]
        stats = {**self.engine.stats(), "num_streams": len(self._streams), "num_resolving": self._num_resolving,
                 "tokens_per_second": sum(recent) / 10.0}
        if hasattr(self.adapters, "stats"):  # the registry's: its record cache
            stats["adapter_source"] = self.adapters.stats()
        return stats

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.engine.run_forwards_here()  # where nothing overlaps the forward, this thread runs it (no hand-off)
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            produced = 0

            def deliver(outs: list[RequestOutput]) -> None:  # as soon as the engine has them: the step may still run
                nonlocal produced
                produced += sum(len(out.token_ids) for out in outs)
                self._deliver(outs)

            try:
                self.engine.step(deliver)
            except Exception:  # a bug outside the forward (the step isolates those): fail all in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                for rid in list(self.engine.requests):
                    if (out := self.engine.fail(rid, "internal error")) is not None:
                        deliver([out])
            if produced:
                self._tokens_window.append((time.monotonic(), produced))
                self._tokens_window = self._tokens_window[-512:]

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(item)
                except Exception as exc:  # validated on the API side already; belt and braces
                    self._deliver([RequestOutput(item.request_id, "", [], None, True, "error", len(item.prompt_ids), 0,
                                                 str(exc))])
            elif kind == "abort":
                out = self.engine.abort(item)
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Each output to its request's stream: one call into each event loop for them all (a call per output
        wakes the loop once per output: 64 wake-ups a step at 64 requests)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
