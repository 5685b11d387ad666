"""Decode steps replayed from CUDA graphs: one launch of a recorded step instead of ~15 kernel launches per layer.

A pure decode step (every request adds one token and needs its logits) of B requests is padded to the next
captured batch size (`batch_sizes`: 1, 2, 4, 8, then multiples of 8) by ModelRunner.build(pad_to=...), whose
shapes then depend on that size alone: block tables as wide as the longest context, attention split for it,
row tiles bounded by `kernels.segments.max_tiles`. What else a step's kernels depend on besides the values in
its input tensors is its `GraphKey`: the delta kinds the step uses (a base-only step launches no adapter kernel),
the Scale targets present, whether PARA vectors apply, and the device pool's rank class (a power of two >= 16
bounding every resident rank; it sizes the low-rank intermediate and grid). The engine captures the base and
LowRank steps of every batch size at start-up (ModelRunner.capture_decode_graphs); any other key is captured once,
on first use. Then each step is a replay:

    fresh host ForwardBatch --PackedInputs.load (one copy)--> the graph's static inputs --replay--> logits[:B]

Everything the kernels read through pointers (weights, KV cache, the adapter pool's arena and tables, IA3 and
PARA vector buffers) is allocated once and updated in place, so a replay sees adapters loaded after the capture.
A capture that fails (an op that is not capturable, out of memory) turns graphs off for the process with one
warning; the step, and every later one, runs eagerly. A step that fails in the capture's eager warm-up (a faulty
adapter) is no capture failure: its error goes to the engine (server/engine/isolation.py), graphs stay on.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from server.engine.scheduler import ScheduledBatch
from server.model.forward_batch import AdapterKinds, ForwardBatch, PackedInputs

log = logging.getLogger(__name__)

Forward = Callable[[ForwardBatch], torch.Tensor]
# capture(fn) -> (replay, output): records fn; `output` holds fn's result for the inputs at capture time, and
# each replay() refills it for the inputs' current values. Its first call of fn runs the step eagerly (a warm-up).
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


@dataclass(frozen=True)
class GraphKey:
    batch_size: int  # padded
    kinds: AdapterKinds
    scale_targets: tuple[str, ...]
    para: bool
    max_rank: int


@dataclass
class _Graph:
    static: PackedInputs  # the captured step's inputs
    replay: Callable[[], None]
    logits: torch.Tensor  # its output, refilled by each replay


def batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))[1:]
    return tuple(sorted(set(sizes + [max_num_seqs])))


def cuda_capture(pool) -> Capture:
    """Capture on the current CUDA device, every graph in one memory pool (they never run at once)."""

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):  # warm-up: compiles the Triton kernels, sets up cuBLAS, off the graph
                fn()
        finally:  # also when it raised: what it launched is done before anything else runs
            torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: fetch threads may pin host memory meanwhile (cudaHostAlloc), which a global capture forbids
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        graph.replay()  # capturing only records: this runs the step
        return graph.replay, out

    return capture


class _StepError(Exception):
    """The step raised in its eager warm-up run, before any capture: its own error (the exception's cause)."""


def _tag_warm_up_errors(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn, whose first call (the capture's eager warm-up) raises _StepError from whatever the step raised, so
    that a faulty step is told apart from a failed capture, which turns graphs off."""
    calls = 0

    def run() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            return fn()
        try:
            return fn()
        except Exception as exc:
            raise _StepError() from exc

    return run


def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Static-buffer replay without a graph: the step re-runs on the captured inputs and refills the captured
    output. Runs anywhere; tests use it on a CPU to check padding, keys and static inputs."""
    out = fn()
    return (lambda: out.copy_(fn())), out


class DecodeGraphs:
    def __init__(self, max_num_seqs: int, device: torch.device, capture: Capture, *, max_graphs: int = 128) -> None:
        self.sizes, self.device = batch_sizes(max_num_seqs), torch.device(device)
        self.capture, self.max_graphs = capture, max_graphs
        self.graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self.enabled = True
        self.num_captures = self.num_replays = 0

    @classmethod
    def for_device(cls, device: torch.device, max_num_seqs: int) -> "DecodeGraphs":
        return cls(max_num_seqs, device, cuda_capture(torch.cuda.graph_pool_handle()))

    def batch_size_for(self, batch: ScheduledBatch) -> int | None:
        """The captured size this step runs as, or None when it is no pure decode step (or graphs are off)."""
        if not self.enabled or not all(s.num_tokens == 1 and s.needs_logits for s in batch.seqs):
            return None
        n = len(batch.seqs)
        return next((s for s in self.sizes if s >= n), None)

    def run(self, key: GraphKey, fb: ForwardBatch, forward: Forward) -> torch.Tensor | None:
        """Replay (capturing first if new) the step for `fb` (host tensors) -> static logits (batch_size, V),
        or None when capture failed and the caller must run the step eagerly."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            graph = self.graphs.get(key)
            if graph is None:
                graph = self._capture(key, fb, forward)
                if graph is None:
                    return None
            else:
                self.graphs.move_to_end(key)
                graph.static.load(fb)
                graph.replay()
        self.num_replays += 1
        return graph.logits

    def _capture(self, key: GraphKey, fb: ForwardBatch, forward: Forward) -> _Graph | None:
        # A larger rank class makes every graph of a smaller one stale (the pool's rank class never shrinks).
        for old in [k for k in self.graphs if k.max_rank != key.max_rank]:
            del self.graphs[old]
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        try:
            static = PackedInputs(fb, self.device)
            replay, logits = self.capture(_tag_warm_up_errors(lambda: forward(static.batch)))
        except _StepError as exc:  # the step itself fails (a faulty adapter?): the engine's business, not ours
            raise exc.__cause__ from None
        except Exception as exc:  # noqa: BLE001 - any failure: serve eagerly rather than not at all
            self.enabled = False
            self.graphs.clear()
            log.warning("CUDA graph capture failed (%s: %s); decode steps run without graphs from now on",
                        type(exc).__name__, exc)
            return None
        graph = self.graphs[key] = _Graph(static, replay, logits)
        self.num_captures += 1
        log.debug("captured decode step %s (%d graphs)", key, len(self.graphs))
        return graph

    def stats(self) -> dict:
        return {"enabled": self.enabled, "graphs": len(self.graphs), "captures": self.num_captures,
                "replays": self.num_replays}
