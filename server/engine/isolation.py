"""A step whose forward raises: find the adapter versions that cause it and finish the step for everyone else.

Why the step can simply run again: a failed forward has moved no request's state. Requests advance
(num_computed_tokens, output ids, sampler generators, hence penalties) only in the engine's postprocessing, after
the forward returned; scheduling (KV blocks, adapter pins, preemptions) happened before it and stands. What the
forward writes is the same whenever it runs with the same ScheduledSeqs: K/V at the step's positions in each
request's own blocks, and the PARA vectors of requests whose prompt is in the step (recomputed from the prompt).
A CUDA graph capture whose eager warm-up raises stores no graph and leaves graphs on (cuda_graphs.py).

How: the step's requests are cut into parts, one per adapter version (id@version; the base model is one more
part). The parts are bisected, each half run as a sub-batch, down to single parts that still fail alone:

    step [base, x@1, y@2, z@1] fails -> [base, x@1] runs -> [y@2, z@1] fails -> [y@2] runs -> [z@1] fails alone

Each request of the parts that ran is computed exactly once, so its logits are those it would have had. A part
that fails alone is the adapter's fault only if the same requests succeed as the base model (a probe: same tokens
and blocks, no adapter; what it writes belongs to requests that are failed either way); otherwise the engine itself
fails (a bug, out of memory), as it does when the base model's part fails alone: then every request of the step
fails, as before this module existed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from server.engine.request import AdapterRef
from server.engine.scheduler import ScheduledBatch, ScheduledSeq

log = logging.getLogger(__name__)

Execute = Callable[[ScheduledBatch], torch.Tensor]  # ModelRunner.execute: -> (seqs needing logits, V)


@dataclass
class StepRun:
    """What a step's forward gave: the seqs that ran, their logits, and who made the step fail."""

    batch: ScheduledBatch  # the seqs that ran, in the step's order
    logits: torch.Tensor | None  # (seqs of `batch` needing logits, V); None when none needs them
    faulty: list[tuple[AdapterRef, Exception]] = field(default_factory=list)  # versions that fail alone, and why
    engine_error: Exception | None = None  # the step fails without adapters: nothing ran, every request fails


def execute_isolating(execute: Execute, batch: ScheduledBatch) -> StepRun:
    """Run the step; if it raises, run it again split by adapter version (see the module docstring)."""
    try:
        return StepRun(batch, execute(batch))
    except Exception as exc:  # noqa: BLE001 - whatever the step raised, find out whose it is
        error = exc
    parts = _parts_by_adapter(batch.seqs)
    if list(parts) == [None]:
        return StepRun(ScheduledBatch(), None, engine_error=error)
    log.warning("a step of %d requests and %d adapter versions failed (%s: %s); running it again split by adapter",
                len(batch.seqs), len(parts) - (None in parts), type(error).__name__, error)
    bisection = _Bisection(execute, batch.seqs)
    bisection.split(list(parts.values()), error)
    faulty = []
    for key, (part, part_error) in bisection.failed.items():
        if key is None or not _runs_without_adapter(execute, [batch.seqs[i] for i in part]):
            return StepRun(ScheduledBatch(), None, engine_error=part_error)
        faulty.append((batch.seqs[part[0]].request.adapter, part_error))
    ran = sorted(bisection.rows_by_seq)
    rows = [bisection.rows_by_seq[i] for i in ran if batch.seqs[i].needs_logits]
    return StepRun(ScheduledBatch([batch.seqs[i] for i in ran]), torch.stack(rows) if rows else None, faulty)


def _parts_by_adapter(seqs: list[ScheduledSeq]) -> dict[str | None, list[int]]:
    """Adapter key (None: base model) -> indices of its seqs in the step, in order of first appearance."""
    parts: dict[str | None, list[int]] = {}
    for i, s in enumerate(seqs):
        parts.setdefault(s.request.adapter.key if s.request.adapter else None, []).append(i)
    return parts


class _Bisection:
    def __init__(self, execute: Execute, seqs: list[ScheduledSeq]) -> None:
        self.execute, self.seqs = execute, seqs
        self.rows_by_seq: dict[int, torch.Tensor | None] = {}  # seq index -> its logits row (None: not sampled)
        self.failed: dict[str | None, tuple[list[int], Exception]] = {}  # key -> (its seq indices, its error)

    def split(self, parts: list[list[int]], error: Exception) -> None:
        """`parts` (seq indices, one list per adapter version) failed together with `error`: run each half,
        recurse into those that fail, down to single parts."""
        if len(parts) == 1:
            s = self.seqs[parts[0][0]]
            self.failed[s.request.adapter.key if s.request.adapter else None] = (parts[0], error)
            return
        mid = len(parts) // 2
        for half in (parts[:mid], parts[mid:]):
            half_error = self._run(half)
            if half_error is not None:
                self.split(half, half_error)

    def _run(self, parts: list[list[int]]) -> Exception | None:
        indices = sorted(i for part in parts for i in part)  # the step's order: its logits rows follow it
        try:
            logits = self.execute(ScheduledBatch([self.seqs[i] for i in indices]))
        except Exception as exc:  # noqa: BLE001
            return exc
        rows = iter(logits)
        self.rows_by_seq.update((i, next(rows) if self.seqs[i].needs_logits else None) for i in indices)
        return None


def _runs_without_adapter(execute: Execute, seqs: list[ScheduledSeq]) -> bool:
    """Whether these seqs' step succeeds as the base model (slot -1 on copies of their requests)."""
    try:
        execute(ScheduledBatch([replace(s, request=replace(s.request, slot=-1)) for s in seqs]))
    except Exception:  # noqa: BLE001
        return False
    return True
