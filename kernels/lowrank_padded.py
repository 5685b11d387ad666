"""Batched low-rank deltas on a CPU: each slot's factors zero-padded to one rank R in per-slot stacks
(`PaddedFactors`, Punica's padded gather-bmm layout), applied to a step's tokens by the plan of kernels/segments.py:
where our C kernel runs (kernels/cpu_matmul.py `lowrank_grid`), every slot in one call of it; elsewhere solo slots
(a prefill) by their own matmuls and the others by one padded grid, torch's gather-bmm. Same semantics as
kernels/lowrank.py's `lowrank_delta` (its reference), the scale folded into B^T.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels import cpu_matmul
from kernels.segments import Segments, SlotBatch, SlotPlan


@dataclass(frozen=True)
class PaddedFactors:
    """The CPU layout: each slot's factors zero-padded to one rank R (Punica's padded gather-bmm). On a CPU every
    torch call costs microseconds of dispatch, so one batched matmul per op beats a loop over adapters."""

    # Both fp32, or both bf16 (`--lora-dtype bfloat16`: half the bytes a step streams; widened to fp32 where used).
    a: torch.Tensor  # (num_slots, num_slices * R, d_in); slice i in rows [i*R, (i+1)*R), zero past its rank
    bt: tuple[torch.Tensor, ...]  # per slice (num_slots, R, w_i), scale folded in, zero past the rank
    out_start: tuple[int, ...]
    out_width: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.bt[0].shape[1]

    @functools.cached_property
    def grid(self) -> cpu_matmul.GridFactors:
        """The stacks as our grid kernel takes them, checked and built once (loads write into them in place)."""
        return cpu_matmul.grid_factors(self.a, self.bt, self.out_start)


def lowrank_delta_padded(y: torch.Tensor, x: torch.Tensor, seg: Segments, factors: PaddedFactors) -> None:
    """Same semantics as lowrank_delta, from PaddedFactors: y[t, cols_i] += (x[t] @ A_s^T) @ (scale B_s)^T.
    Moves S * R * (d_in + sum w) factor values for the S distinct slots of the step, in few ops whatever S: one
    gather of x, one bmm for the shrink, one per slice for the expand, one scatter-add of the slices into y.
    Solo slots (Segments.slot_plan: a prefill's many tokens, or the step's only adapter) get their own matmuls, but
    where our grid kernel runs, which takes them all in one call."""
    lowrank_delta_planned(y, x, seg.slot_plan, factors)


def lowrank_delta_planned(y: torch.Tensor, x: torch.Tensor, plan: SlotPlan | None, factors: PaddedFactors) -> None:
    """lowrank_delta_padded over an explicit plan, whose slots index the factors' stacks: stacks that hold some
    slots only, in rows of their own, take a plan with those rows (kernels.segments.plan_for_groups)."""
    if plan is None:
        return
    call = kernel_call(x, plan, factors) if y.dtype == torch.float32 and y.stride(-1) == 1 else None
    if call is not None:
        # every slot in one call of our kernel, a prefill's too (its own matmuls took 2x longer: smollm2, a
        # 1024-token prefill over 8 adapters), with no gathers, padded products or scatters
        cpu_matmul.lowrank_grid_prepared(y, x, *call)
        return
    for (slot, rows), runs in zip(plan.solo, plan.solo_runs, strict=True):
        _lowrank_solo(y, x, factors, slot, rows, runs)
    if plan.padded is not None:
        _lowrank_grid_torch(y, x, factors, plan.padded)


def kernel_call(x: torch.Tensor, plan: SlotPlan | None, factors: PaddedFactors
                ) -> tuple[cpu_matmul.GridFactors, cpu_matmul.GridGroups] | None:
    """What lowrank_delta_planned(y, x, plan, factors) gives our grid kernel, for an fp32 y of x's rows with rows of
    unit stride (cpu_matmul.matmul's output): (factors, groups), which it runs, or a caller runs after its own
    product in one call (cpu_matmul.matmul_lowrank); None when the kernel would not serve."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(-1) == 1 and grid_takes(plan, factors)):
        return None
    return factors.grid, plan.kernel_groups


def grid_takes(plan: SlotPlan | None, factors: PaddedFactors) -> bool:
    """Whether our grid kernel takes this plan's slots over these stacks (of an fp32 x: kernel_call's own check):
    where it is enabled, for at most cpu_matmul.MAX_SLICES slices, with the plan's groups at hand. The one place that
    decides it, for kernel_call and for kernels/cpu_layer.c's layers (server/model/padded_lowrank.py layer_grids)."""
    return (plan is not None and plan.kernel_groups is not None and len(factors.bt) <= cpu_matmul.MAX_SLICES
            and cpu_matmul.enabled())


def _lowrank_grid_torch(y: torch.Tensor, x: torch.Tensor, factors: PaddedFactors, sb: SlotBatch) -> None:
    # index_select rather than advanced indexing: the same gathers at a fraction of the dispatch cost
    num_slots, n = sb.gather.shape

    def per_slot(stack: torch.Tensor) -> torch.Tensor:  # (max_slots, ...) -> (S, ...) fp32: a view when it can be
        return _fp32(stack[sb.slot_range[0] : sb.slot_range[1]] if sb.slot_range else stack.index_select(0, sb.slots))

    xs = x.index_select(0, sb.gather.view(-1)).view(num_slots, n, -1).float()  # (S, n, d_in)
    # A on the left: MKL streams the factors faster as (num_slices * R, d_in) @ (d_in, n) than transposed (~30%)
    h = torch.bmm(per_slot(factors.a), xs.transpose(1, 2)).transpose(1, 2)  # (S, n, num_slices * R), a view
    r = factors.rank
    outs = [torch.bmm(h[:, :, i * r : (i + 1) * r], per_slot(bt)) for i, bt in enumerate(factors.bt)]  # (S, n, w_i)
    col0, width = factors.out_start[0], sum(factors.out_width)
    if all(c == col0 + sum(factors.out_width[:i]) for i, c in enumerate(factors.out_start)):  # adjacent slices
        _add_rows(y[:, col0 : col0 + width], outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1), sb)
    else:
        for col, w, o in zip(factors.out_start, factors.out_width, outs):
            _add_rows(y[:, col : col + w], o, sb)


# A solo slot whose rows come in at most this many runs (a prefill chunk per request) is computed run by run on
# views of x and y; with more runs (single tokens among other slots' tokens) gathered once and added back by rows
# (add_at_rows: the gathers cost ~100 us for 128 rows of 576, more than the addmms of two runs of 64).
MAX_SOLO_RUNS = 16


def _lowrank_solo(y: torch.Tensor, x: torch.Tensor, factors: PaddedFactors, slot: int, rows: slice | torch.Tensor,
                  runs: tuple[tuple[int, int], ...]) -> None:
    """One slot's tokens on their own: per run of rows one matmul for the shrink and one addmm per slice for the
    expand, in place into y's rows (fp32 products, rounded once when y is not fp32); no gather or scatter. With
    more than MAX_SOLO_RUNS runs: one gather, one shrink, one add_at_rows per slice."""
    a, bts = _fp32(factors.a[slot]), [_fp32(bt[slot]) for bt in factors.bt]
    if len(runs) > MAX_SOLO_RUNS:
        h = x.index_select(0, rows).float() @ a.t()
        for i, (col, w) in enumerate(zip(factors.out_start, factors.out_width)):
            hi = h[:, i * factors.rank : (i + 1) * factors.rank]
            add_at_rows(y[:, col : col + w], rows, hi @ bts[i])
        return
    r = factors.rank
    for start, stop in runs:
        h = x[start:stop].float() @ a.t()  # (n, num_slices * R)
        for i, (col, w) in enumerate(zip(factors.out_start, factors.out_width)):
            ys, hi, bt = y[start:stop, col : col + w], h[:, i * r : (i + 1) * r], bts[i]
            if y.dtype == torch.float32:
                ys.addmm_(hi, bt)
            else:
                ys.copy_((ys.float() + hi @ bt).to(ys.dtype))


def _fp32(factor: torch.Tensor) -> torch.Tensor:
    """A factor as fp32: itself, or its bf16 values widened (exact)."""
    return factor if factor.dtype == torch.float32 else factor.float()


def _add_rows(y: torch.Tensor, o: torch.Tensor, sb) -> None:
    """y[sb.rows] += the real cells of o (S, n, w): each token once."""
    o = o.reshape(-1, o.shape[-1])
    if sb.keep is not None:
        o = o.index_select(0, sb.keep)
    add_at_rows(y, sb.rows, o)


def add_at_rows(y: torch.Tensor, rows: torch.Tensor, o: torch.Tensor) -> None:
    """y[rows] += o for distinct rows, o rounded to y's dtype first (index_add_'s semantics). index_add_ itself on
    a contiguous y; on a column slice of a wider y a gather, an add and a copy back instead: there PyTorch's CPU
    index_add_ is a scalar scatter (64 rows of 576: ~2 ms in fp32, ~0.37 ms in bf16, against ~0.15 ms)."""
    o = o.to(y.dtype)
    if y.is_contiguous() or y.device.type != "cpu":
        y.index_add_(0, rows, o)
    else:
        y.index_copy_(0, rows, y.index_select(0, rows).add_(o))
