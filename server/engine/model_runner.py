"""ScheduledBatch (CPU, no tensors) -> ForwardBatch (device tensors) -> logits. Owns the KV cache and the CUDA
graphs of decode steps (cuda_graphs.py); the PARA vector rows of running requests are the scheduler's.

Padding (graph steps only): a decode step of B requests runs as a step of the next captured batch size; each
padding row is one base-model token at position 0 of a scratch KV block that no request owns, so it reads and
writes nothing of anybody else, and its logits are dropped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from kernels.attention import AttentionMeta
from kernels.segments import Segments, make_segments
from server.engine.block_manager import FREED
from server.engine.block_tables import BlockTables
from server.engine.cuda_graphs import DecodeGraphs, GraphKey
from server.engine.request import Request
from server.engine.scheduler import ScheduledBatch
from server.model.adapter_pool import AdapterPool
from server.model.forward_batch import AdapterKinds, ForwardBatch, KVCache, ParaPrefill
from server.model.llama import LlamaModel


log = logging.getLogger(__name__)


@dataclass
class PreparedStep:
    """A step's inputs, built before its forward (by the engine's lookahead while the previous forward ran)."""

    batch: ScheduledBatch
    inputs: ForwardBatch  # host tensors when `graph` (a graph replay copies them in), else on the device
    graph: bool
    pending: list[tuple[int, Request, int]]  # (token row, request, position) of input ids not known yet

    def fill(self) -> None:
        """Write the pending rows' input ids, now known (their requests' tokens at those positions)."""
        if not self.pending:
            return
        rows = torch.tensor([row for row, _, _ in self.pending], dtype=torch.int64)
        tokens = [req.token_ids(pos, pos + 1)[0] for _, req, pos in self.pending]
        ids = self.inputs.input_ids
        ids.index_copy_(0, rows.to(ids.device), torch.tensor(tokens, dtype=torch.int64).to(ids.device))
        self.pending = []


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, adapter_pool: AdapterPool | None, *,
                 max_model_len: int | None = None, graphs: DecodeGraphs | None = None) -> None:
        """`graphs`: replay pure decode steps from CUDA graphs (None: every step eager)."""
        cfg = model.cfg
        self.model, self.block_size, self.adapter_pool = model, block_size, adapter_pool
        self.device = model.device
        # One block more than the scheduler hands out: the scratch block of padding rows.
        self.kv = KVCache.allocate(cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                                   model.device, model.dtype)
        self.scratch_block = num_blocks
        max_len = min(max_model_len or num_blocks * block_size, num_blocks * block_size)
        self.max_blocks_per_seq = -(-max_len // block_size)
        self.graphs = graphs
        # Seconds spent in the model's forward (graph replays included), for the engine's step times. On a GPU
        # it counts until the launches return, not until the device finishes.
        self.forward_seconds = 0.0
        self._last_segments: tuple[tuple, Segments] | None = None  # (layout, its Segments): see _segments
        self._last_decode: tuple[tuple, dict] | None = None  # (slots' layout, what depends on it): see _build_decode
        # decode steps' block tables from rows kept across steps; not where a sliding window frees blocks in place
        self._block_tables = None if cfg.sliding_window else BlockTables(self.max_blocks_per_seq)

    def build(self, batch: ScheduledBatch, *, pad_to: int | None = None, device=None,
              pending: list[tuple[int, Request, int]] | None = None) -> ForwardBatch:
        """The step's ForwardBatch on `device` (default: the model's). `pad_to`: a graph step, padded with
        padding rows to that many requests, its shapes fixed by the batch size alone (block tables as wide as the
        longest context, attention sized for it). `pending`: a step built before its last tokens are known (the
        engine's lookahead): their input ids are 0, and (token row, request, position) of each is appended to
        `pending`."""
        if pad_to is None and pending is None and self._block_tables is not None \
                and all(s.num_tokens == 1 for s in batch.seqs):
            return self._build_decode(batch, self.device if device is None else device)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        q_start, seq_lens, logits_indices = [0], [], []
        num_seqs = pad_to or len(batch.seqs)
        max_blocks = self.max_blocks_per_seq if pad_to else max(len(s.request.block_ids) for s in batch.seqs)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)  # filled row by row, one tensor per step
        for b, s in enumerate(batch.seqs):
            req, start, n = s.request, s.start, s.num_tokens
            end = start + n
            ids = req.token_ids(start, end)
            if len(ids) < n:
                if pending is None:
                    raise ValueError(f"request {req.request_id}: tokens {start}..{end} are not known yet")
                pending += [(len(input_ids) + i, req, start + i) for i in range(len(ids), n)]
                ids = ids + [0] * (n - len(ids))
            input_ids += ids
            blocks = req.block_ids
            if n == 1:  # a decode token: most rows of most steps
                positions.append(start)
                slot_mapping.append(blocks[start // bs] * bs + start % bs)
            else:
                positions += range(start, end)
                slot_mapping += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            q_start.append(q_start[-1] + n)
            seq_lens.append(end)
            if FREED in blocks:  # blocks freed by a sliding window are never read: point them at the scratch block
                blocks = [i if i != FREED else self.scratch_block for i in blocks]
            tables[b, : len(blocks)] = blocks
            if s.needs_logits:
                logits_indices.append(q_start[-1] - 1)
        num_pad = num_seqs - len(batch.seqs)
        for b in range(len(batch.seqs), num_seqs):  # padding rows (graph steps)
            input_ids.append(0)
            positions.append(0)
            slot_mapping.append(self.scratch_block * bs)
            q_start.append(q_start[-1] + 1)
            seq_lens.append(1)
            tables[b, 0] = self.scratch_block
            logits_indices.append(q_start[-1] - 1)
        dev = self.device if device is None else device

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        attn = AttentionMeta(
            q_start=t(q_start, torch.int32), seq_lens=t(seq_lens, torch.int32),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            max_q_len=max((s.num_tokens for s in batch.seqs), default=1),
            max_seq_len=self.max_blocks_per_seq * bs if pad_to else max(seq_lens),
        )
        segments = self._segments([s.num_tokens for s in batch.seqs] + [1] * num_pad,
                                  [s.request.slot for s in batch.seqs] + [-1] * num_pad, dev)
        return ForwardBatch(
            input_ids=t(input_ids, torch.int64), positions=t(positions, torch.int64),
            slot_mapping=t(slot_mapping, torch.int64), attn=attn, segments=segments,
            logits_indices=t(logits_indices, torch.int64), **self._adapter_fields(batch, q_start, num_pad, dev),
        )

    def _build_decode(self, batch: ScheduledBatch, dev) -> ForwardBatch:
        """build() of a step of one token a request (most steps): the same inputs, from a few list comprehensions
        and NumPy calls over the whole batch and the block table's rows kept across steps, instead of a loop of list
        and array work per request; what depends only on the requests' adapter slots (segments, adapter rows) is the
        previous decode step's while those and the pool's slots are unchanged. Not with a sliding window (no kept
        rows there: the general loop builds it)."""
        seqs, bs, n = batch.seqs, self.block_size, len(batch.seqs)
        reqs = [s.request for s in seqs]
        starts = np.fromiter([s.start for s in seqs], dtype=np.int64, count=n)
        rows = self._block_tables.rows(reqs)  # first: it may grow the table
        tables = self._block_tables.table[rows, : max([len(r.block_ids) for r in reqs])]
        slot_mapping = tables[np.arange(n), starts // bs].astype(np.int64) * bs + starts % bs
        seq_lens = (starts + 1).astype(np.int32)
        input_ids = np.fromiter([r.token_at(st) for r, st in zip(reqs, starts.tolist())], dtype=np.int64, count=n)
        needs = [s.needs_logits for s in seqs]
        slots = [r.slot for r in reqs]
        # a prompt's first token (a PARA prefill) or a prompt's chunk (no logits): built afresh, not kept
        layout = None if not (all(needs) and starts.all()) else (
            tuple(slots), tuple([r.para_row for r in reqs]), self._pool_changes(), str(dev))
        last = self._last_decode
        if layout is None or last is None or last[0] != layout:
            logits_indices = np.flatnonzero(np.fromiter(needs, dtype=bool, count=n))
            fixed = dict(q_start=torch.arange(n + 1, dtype=torch.int32).to(dev),
                         logits_indices=torch.from_numpy(logits_indices.astype(np.int64)).to(dev),
                         segments=self._segments([1] * n, slots, dev),
                         fields=self._adapter_fields(batch, list(range(n + 1)), 0, dev))
            self._last_decode = last = (layout, fixed)
        fixed = last[1]

        def t(array):  # torch.from_numpy: torch.tensor of a list of 64 ints takes ~20 us
            return torch.from_numpy(array).to(dev, non_blocking=True)

        attn = AttentionMeta(q_start=fixed["q_start"], seq_lens=t(seq_lens), block_tables=t(tables), max_q_len=1,
                             max_seq_len=int(seq_lens.max()))
        return ForwardBatch(input_ids=t(input_ids), positions=t(starts), slot_mapping=t(slot_mapping), attn=attn,
                            segments=fixed["segments"], logits_indices=fixed["logits_indices"], **fixed["fields"])

    def _pool_changes(self) -> int:
        """How many times the adapter pool's slots changed (0 without a pool)."""
        return 0 if self.adapter_pool is None else self.adapter_pool.changes

    def _segments(self, seg_lens: list[int], seg_slots: list[int], dev) -> Segments:
        """make_segments(seg_lens, seg_slots, dev), or the previous step's Segments when the layout is the same
        (every decode step of an unchanged batch): what the forward derives from them once per step
        (Segments.slot_plan, its padded grid) is then derived no more. Segments are never written (a graph replay copies them into its own), so sharing one is safe."""
        key = (tuple(seg_lens), tuple(seg_slots), str(dev))
        last = self._last_segments
        if last is not None and last[0] == key:
            return last[1]
        segments = make_segments(seg_lens, seg_slots, dev)
        self._last_segments = (key, segments)
        return segments

    def _adapter_fields(self, batch: ScheduledBatch, q_start: list[int], num_pad: int, dev) -> dict:
        """Per-token rows for Scale deltas and the PARA prefills of this step (empty when no adapter is used)."""
        pool = self.adapter_pool
        infos = [pool.slots.get(s.request.slot) if pool and s.request.slot >= 0 else None for s in batch.seqs]
        if not any(infos):
            return {}
        targets = sorted({t for info in infos if info for t in info.scale_targets})
        kinds = AdapterKinds(lowrank=any(i and i.has_lowrank for i in infos),
                             sparse=any(i and i.has_sparse for i in infos),
                             scale=bool(targets) or any(i and i.has_para for i in infos))
        if not kinds.scale:  # no per-token rows to make (LoRA-like adapters only)
            return dict(adapter_kinds=kinds)
        scale_rows = {t: [] for t in targets}
        para_rows: list[int] = []
        prefills = []
        for s, info, start in zip(batch.seqs, infos, q_start):
            for t in targets:
                scale_rows[t] += [s.request.slot if info and t in info.scale_targets else -1] * s.num_tokens
            row = s.request.para_row if info and info.has_para else -1
            if row >= 0 and s.start == 0:  # the scheduler never splits a PARA prompt: all of it is in this step
                prefills.append(ParaPrefill(start, min(len(s.request.prompt_ids), s.num_tokens), row, s.request.slot))
            para_rows += [row] * s.num_tokens
        for t in targets:
            scale_rows[t] += [-1] * num_pad
        para_rows += [-1] * num_pad
        has_para = any(r >= 0 for r in para_rows)
        return dict(
            adapter_kinds=replace(kinds, scale=bool(targets) or has_para),
            scale_rows={t: torch.tensor(rows, dtype=torch.int32).to(dev) for t, rows in scale_rows.items()},
            para_rows=torch.tensor(para_rows, dtype=torch.int32).to(dev) if has_para else None,
            para_prefills=tuple(prefills),
        )

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """-> (num seqs needing logits, V) fp32, in batch order."""
        return self.run(self.prepare(batch))

    def prepare(self, batch: ScheduledBatch, *, lookahead: bool = False) -> PreparedStep | None:
        """The step's inputs: host tensors for a CUDA graph's replay, else the ForwardBatch on the device.
        `lookahead`: built (on the engine thread) while another step's forward runs, before the tokens of its
        decode rows are known (PreparedStep.fill gives them); None when that is not safe: with CUDA graphs on, a
        step that is no graph step would be built with device copies while the running forward may be capturing
        a graph, which no other thread's CUDA work may disturb."""
        pending: list[tuple[int, Request, int]] | None = [] if lookahead else None
        size = self.graphs.batch_size_for(batch) if self.graphs is not None and not self._injects_faults else None
        if lookahead and size is None and self.graphs is not None and self.graphs.enabled:
            return None
        if size is not None:
            fb = self.build(batch, pad_to=size, device="cpu", pending=pending)  # copied into the graph's inputs
            return PreparedStep(batch, fb, graph=True, pending=pending or [])
        return PreparedStep(batch, self.build(batch, pending=pending), graph=False, pending=pending or [])

    @torch.inference_mode()
    def run(self, step: PreparedStep) -> torch.Tensor:
        """The forward of a prepared step (filled, when it was built ahead) -> (seqs needing logits, V) fp32."""
        if step.pending:
            raise ValueError("the step's lookahead tokens were not filled in")
        fb = step.inputs
        if step.graph:
            if not fb.para_prefills:  # a PARA prompt of one token is a prefill: its vectors are computed eagerly
                t0 = time.perf_counter()
                logits = self.graphs.run(self.graph_key(fb), fb, self.forward)
                self.forward_seconds += time.perf_counter() - t0
                if logits is not None:
                    return logits[: len(step.batch.seqs)]
            return self._timed_forward(fb.to(self.device))
        return self._timed_forward(fb)

    def _timed_forward(self, fb: ForwardBatch) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = self.forward(fb)
        self.forward_seconds += time.perf_counter() - t0
        return logits

    @property
    def _injects_faults(self) -> bool:
        """A test's fault hook is set on the pool: steps run eagerly, so that it sees every step (a graph replay
        runs no Python)."""
        return self.adapter_pool is not None and self.adapter_pool.fault_hook is not None

    def capture_decode_graphs(self) -> None:
        """Capture, for every batch size, the decode step with no adapter and the one with LowRank adapters (the
        common cases) now, at start-up, rather than during the first such steps. The steps captured are all
        padding rows, on the scratch KV block; the LowRank ones name slot 0 (whatever it holds, only the padding
        rows' activations are touched), until a real step's inputs are copied in."""
        if self.graphs is None:
            return
        t0 = time.perf_counter()
        for size in reversed(self.graphs.sizes):  # largest first: smaller graphs reuse its pool memory
            fb = self.build(ScheduledBatch([]), pad_to=size, device="cpu")
            variants = [fb]
            if self.adapter_pool is not None:
                variants.append(replace(fb, segments=make_segments([1] * size, [0] * size, "cpu"),
                                        adapter_kinds=AdapterKinds(lowrank=True)))
            for v in variants:
                if self.graphs.run(self.graph_key(v), v, self.forward) is None:
                    return  # capture failed: graphs are off, the engine runs eagerly
        log.info("captured %d decode-step graphs in %.1f s", len(self.graphs.graphs), time.perf_counter() - t0)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        return self.model.forward(fb, self.kv, self.adapter_pool)

    def graph_key(self, fb: ForwardBatch) -> GraphKey:
        """Everything a captured step depends on beyond its input tensors' values."""
        return GraphKey(batch_size=fb.segments.num_tokens, kinds=fb.adapter_kinds,
                        scale_targets=tuple(sorted(fb.scale_rows)), para=fb.para_rows is not None,
                        max_rank=self.adapter_pool.max_rank if self.adapter_pool else 0)
