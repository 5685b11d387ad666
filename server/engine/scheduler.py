"""Continuous batching: every step mixes decode tokens of running requests with prefill chunks of new ones.

Plain Python over `Request`s; never sees a tensor. Policy, in order:
1. Running requests first (oldest first): a decode token each, or their next prefill chunk. A request that
   cannot get a KV block preempts the youngest running request (blocks freed, adapter unpinned, recomputed
   later from its prompt and the tokens it already produced); if it is itself the youngest, it waits.
2. Then waiting requests, while there are sequence slots, token budget and KV blocks: FIFO within a tenant,
   tenants in turn (`_admission_order`: a tenant with fewer requests running goes first, so that one tenant's
   backlog never holds back another's). A request whose adapter is not on the device yet is skipped this step (its
   load is under way), not blocking others.
   A request whose adapter has a PARA generator is prefilled whole, never in chunks: its vectors are pooled
   from the entire prompt inside one forward (it may exceed the token budget when it is alone in the step);
   it also takes a row of the PARA vector buffer (para_rows.py), held until it finishes or is preempted.
   A request whose adapter fails to load (the load raises, as opposed to waiting for room) leaves the queue in
   `load_failures`: the engine quarantines that adapter version and fails its requests.

Lookahead (the engine's, while a step's forward runs): `predict_decode_step` makes the next step as `schedule()`
will make it if every request of this step goes on decoding (no arrival admitted, nobody preempted); its KV blocks
are taken at once. `confirm` tells, before the next step, whether that is still what `schedule()` would make:
then the engine runs the prediction (whose inputs it built during the forward) instead of scheduling anew.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_manager import BlockManager
from server.engine.metrics import EngineMetrics
from server.engine.para_rows import ParaRows
from server.engine.request import AdapterRef, Request, Status


class AdapterSlots(Protocol):
    def acquire(self, ref: AdapterRef) -> int | None: ...  # slot when resident (pinned), None while it cannot fit
    def release(self, ref: AdapterRef) -> None: ...
    def has_para(self, ref: AdapterRef) -> bool: ...  # PARA: a vector row, and the whole prompt in one step
    def discard(self, ref: AdapterRef) -> None: ...  # free an unpinned adapter's slot now (a quarantined one)


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    start: int  # first token position computed this step (= request.num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step
    needs_logits: bool  # True when this step reaches the end of the known tokens: a new token is sampled


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    load_failures: list[tuple[Request, Exception]] = field(default_factory=list)  # adapter load raised

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, adapters: AdapterSlots, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_chunk: int, sliding_window: int = 0, metrics: EngineMetrics | None = None,
                 para_rows: int | None = None) -> None:
        """sliding_window > 0: every layer attends to the last `sliding_window` positions only, so a running
        request's blocks before its window are freed as it advances. para_rows: rows of the PARA vector buffer
        (default max_num_seqs: one per running request)."""
        self.blocks, self.adapters = blocks, adapters
        self.para_rows = ParaRows(max_num_seqs if para_rows is None else para_rows)
        self.sliding_window = sliding_window
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.metrics = metrics or EngineMetrics()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i, running, seqs, block_size = 0, self.running, batch.seqs, self.blocks.block_size
        while i < len(running) and budget > 0:
            req = running[i]
            if self.sliding_window:  # this step's first query sees positions >= start - window + 1
                self.blocks.drop_before(req.block_ids, req.num_computed_tokens - self.sliding_window + 1)
            start = req.num_computed_tokens
            if req.num_tokens - start <= 1 and start < len(req.block_ids) * block_size:
                seqs.append(ScheduledSeq(req, start, 1, True))  # a decode token with room in its blocks: most rows
                budget -= 1
                i += 1
                continue
            n = min(self._remaining(req), budget)
            if not self.blocks.can_grow(req.block_ids, req.num_computed_tokens + n):  # rare: preempt to make room
                while not self.blocks.can_grow(req.block_ids, req.num_computed_tokens + n):
                    victim = self.running[-1]
                    if victim is req:
                        break
                    self._preempt(victim)
                    batch.preempted.append(victim)
                if not self.blocks.can_grow(req.block_ids, req.num_computed_tokens + n):
                    self._preempt(req)
                    batch.preempted.append(req)
                    continue  # self.running shrank at i
            self._schedule(batch, req, n)
            budget -= n
            i += 1
        if self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting requests join the running ones, in `_admission_order`, while there are sequence slots, token
        budget and KV blocks; the first that must wait for memory or budget stops the admission (nobody jumps it).
        A request whose adapter is still loading stays in its place; one whose adapter fails to load leaves."""
        left: set[int] = set()  # id() of the requests that leave the queue
        for req in self._admission_order():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if req.adapter is not None:
                try:
                    slot = self.adapters.acquire(req.adapter)
                except Exception as exc:  # noqa: BLE001 - the adapter's fault, not the step's: only it fails
                    batch.load_failures.append((req, exc))
                    left.add(id(req))
                    continue
                if slot is None:
                    req.status = Status.WAITING_ADAPTER
                    continue
                req.slot = slot
                req.whole_prefill = self.adapters.has_para(req.adapter)
            n = self._remaining(req) if req.whole_prefill else min(self._remaining(req), budget)
            too_long = req.whole_prefill and n > budget and batch.seqs
            no_row = req.whole_prefill and self.para_rows.num_free == 0
            if too_long or no_row or not self.blocks.can_grow(req.block_ids, req.num_computed_tokens + n):
                self._unpin(req)
                break
            if req.whole_prefill:
                req.para_row = self.para_rows.take()
            req.status = Status.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                self.metrics.queue_time.observe(req.first_scheduled_time - req.arrival_time)
            self.running.append(req)
            self._schedule(batch, req, n)
            left.add(id(req))
            budget -= n
        if left:
            self.waiting = deque(r for r in self.waiting if id(r) not in left)

    def _admission_order(self) -> list[Request]:
        """The waiting requests in the order they are offered a place: first come, first served within a tenant;
        across tenants, round by round, each round offering one more request of every tenant, a tenant's rounds
        counted from its requests already running (ties: the earlier in the queue). One tenant's backlog therefore
        never holds back another tenant's requests, and a queue of one tenant is served in its own order."""
        if len({r.tenant for r in self.waiting}) <= 1:
            return list(self.waiting)
        held = Counter(r.tenant for r in self.running)
        keyed = []
        for pos, req in enumerate(self.waiting):
            keyed.append((held[req.tenant], pos, req))
            held[req.tenant] += 1
        keyed.sort(key=lambda k: k[:2])
        return [req for _, _, req in keyed]

    def predict_decode_step(self, batch: ScheduledBatch, max_model_len: int) -> ScheduledBatch | None:
        """The step after `batch`, which is running, as schedule() will make it if no request of `batch` ends by
        EOS, a stop string or an abort: one decode token for every running request that `batch` leaves at the end
        of its known tokens, less those its token ends by length. None when schedule() could make anything else
        (a request not in `batch`, a prefill still going on, an arrival it could admit, a sliding window, not
        enough KV blocks). Takes the predicted steps' KV blocks (a request's own, whatever happens next)."""
        if self.sliding_window or not self._is_running(batch):
            return None
        if not all(s.needs_logits for s in batch.seqs):
            return None
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        seqs = []
        for s in batch.seqs:
            req = s.request
            start = s.start + s.num_tokens  # its token at `start` is the one `batch` samples
            if len(req.output_ids) + 1 >= req.params.max_tokens or start + 1 >= max_model_len:
                continue  # that token ends it (length): schedule() will not see it
            seqs.append(ScheduledSeq(req, start, 1, needs_logits=True))
        if not seqs or len(seqs) > self.max_num_batched_tokens:
            return None
        for q in seqs:
            if not self.blocks.can_grow(q.request.block_ids, q.start + 1):
                return None  # schedule() would preempt someone
            self.blocks.grow(q.request.block_ids, q.start + 1)
        return ScheduledBatch(seqs)

    def confirm(self, predicted: ScheduledBatch) -> bool:
        """Whether schedule() would now make exactly `predicted` (see predict_decode_step)."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return False
        if not self._is_running(predicted):
            return False
        return all(s.request.num_computed_tokens == s.start and s.request.num_tokens == s.start + 1
                   and s.request.status is Status.RUNNING for s in predicted.seqs)

    def _is_running(self, batch: ScheduledBatch) -> bool:
        """Whether `batch` has one seq for every running request, in the running order (by identity)."""
        return len(batch.seqs) == len(self.running) and all(s.request is r for s, r in zip(batch.seqs, self.running))

    def _remaining(self, req: Request) -> int:
        """Tokens not yet in the cache: the rest of the prompt (and of earlier outputs after a preemption), or 1."""
        remaining = max(req.num_tokens - req.num_computed_tokens, 1)
        return remaining if req.whole_prefill else min(remaining, self.max_prefill_chunk)

    def _schedule(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        self.blocks.grow(req.block_ids, start + n)
        batch.seqs.append(ScheduledSeq(req, start, n, needs_logits=start + n >= req.num_tokens))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.blocks.release(req.block_ids)
        self._unpin(req)
        if req.para_row >= 0:
            self.para_rows.give_back(req.para_row)
            req.para_row = -1

    def _unpin(self, req: Request) -> None:
        if req.adapter is not None and req.slot >= 0:
            self.adapters.release(req.adapter)
        req.slot = -1

    def finish(self, req: Request, reason: str) -> None:
        """Remove a finished or aborted request wherever it is and free what it holds."""
        if req in self.running:
            self.running.remove(req)
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            self.blocks.release(req.block_ids)
        req.status = Status.FINISHED
        req.finish_reason = reason
