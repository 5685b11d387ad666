"""fp32 projections on an x86-64 CPU: y = x @ W^T (+ bias) (+ residual) by our own kernel (kernels/cpu_matmul.c),
with AVX2 or AVX-512, and the padded LoRA grid of many adapters in one step (`lowrank_grid`, for
kernels/lowrank_padded.py).

Semantics (the reference is `reference`, F.linear):
    matmul(x, pack(W), bias, residual) == F.linear(x, W, bias) + residual
    x: (T, d_in) fp32, rows of unit stride   W: (d_out, d_in)   bias: (d_out,) or None   residual: (T, d_out) or None

Why: a CPU decode step multiplies a few rows (one per running request) by every weight of the model, read from
memory each step. On a 2-core AVX2 EPYC (no AVX-512), oneDNN's prepacked matmul (kernels/linear.py) reached 44
GFLOP/s and 5.6 GB/s of weights at 16 rows, where the machine reads 18 GB/s; this kernel packs W into panels of 16
columns that each thread streams once and multiplies a block of rows at a time in registers. 32 smollm2-shaped
weights (113 MB), both threads, 2026-12-02 14:57 UTC: 1 row 10.7 -> 6.5 ms, 16 rows 22.4 -> 15.7 ms, 64 rows 57.9 ->
39.7 ms, 512 rows 274 -> 250 ms, 2048 rows on par (oneDNN -> this; `python -m benchmarks.cpu_matmul`). The source has
two forms of its row blocks, chosen at build time: AVX2 (6 rows against a panel held in two registers) and AVX-512
(up to 16 rows against a one-register panel; 8 rows against three panels from 24 rows up), built where PyTorch finds
AVX-512 (`VARIANT`). On a 2-core AVX-512 Xeon (2026-12-02 19:55 UTC): 1.2x oneDNN at 1 and 16 rows, 1.0-1.2x at
32-64, 0.94x at 512. `enabled()` decides (`MULTIPLEX_CPU_MATMUL=auto|ours|onednn`, read once at import: `auto` is
ours wherever the kernel builds, else oneDNN; `avx2`, its earlier name, means `ours`).

`lowrank_grid` computes what kernels/lowrank_padded.py's gather-bmm does (its reference) without gathering x or the
factors: each slot's rows of A are dotted with its tokens (read once; a slot of 16 tokens or more, a prefill: its rows
packed into panels for the blocks), then its Bt panels are multiplied in place and added into y's rows. It serves
every slot of a step's LoRA deltas, decodes and prefills, in one call; `matmul_lowrank` runs a projection and its
grid in one call (server/model/adapter_step.py `AdapterStep.linear`). The factors may be fp32 or bf16 (the
server's `--lora-dtype bfloat16`): bf16 values are widened to fp32 exactly as they are loaded and the sums stay fp32,
so the result is the fp32 grid's on the rounded factors; half the bytes to stream made the grid 1.4x-1.7x faster
(`python -m benchmarks.cpu_matmul --grid --tokens 16`, Xeon, 2026-12-03 17:40-19:00 UTC, four runs, 120 ops).

The C source is compiled on first use with the system's C compiler (`cc -O3 -mavx2 -mfma [-mavx512f] -fopenmp`, about
2 s; kernels/cpu_build.py) into a cache directory, named by the source's and flags' hash; without a compiler (or on another architecture) `available()` is
False and kernels/linear.py keeps oneDNN. The call releases the GIL and runs on the calling thread's OpenMP team
(PyTorch's libgomp, shared by soname) with `torch.get_num_threads()` threads. Results differ from F.linear's only in
the order of the fp32 sums (each output is one in-order FMA chain over k; bias and residual added after).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import cpu_build

CHOICE = cpu_build.choice("MULTIPLEX_CPU_MATMUL", "onednn", earlier={"avx2": "ours"})
_enabled: bool | None = None  # decided at the first call: it may compile the kernel

PANEL = 16  # output columns per packed panel (two AVX2 registers); kernels/cpu_blocks.h's PANEL
MAX_SLICES = 4  # most output slices lowrank_grid takes (q|k|v: 3); kernels/cpu_matmul.c's MAX_SLICES
SOURCE = Path(__file__).with_suffix(".c")
VARIANT = cpu_build.NATIVE  # the source's row blocks: in AVX2 or (on an AVX-512 CPU) AVX-512 registers


@dataclass(frozen=True)
class PackedWeight:
    """W (d_out, d_in) as panels (ceil(d_out / 16), d_in, 16): panels[p, k, j] = W[16 p + j, k], zero past d_out."""

    panels: torch.Tensor
    out_features: int

    @property
    def in_features(self) -> int:
        return self.panels.shape[1]


def pack(weight: torch.Tensor) -> PackedWeight:
    """W (d_out, d_in) fp32 -> its panels."""
    d_out, d_in = weight.shape
    num_panels = -(-d_out // PANEL)
    padded = weight.new_zeros(num_panels * PANEL, d_in)
    padded[:d_out] = weight
    return PackedWeight(padded.view(num_panels, PANEL, d_in).transpose(1, 2).contiguous(), d_out)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """What matmul computes, in plain PyTorch (W unpacked)."""
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def matmul(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ residual) -> (T, d_out), a new contiguous fp32 tensor. Needs available()."""
    out, args, keep = _matmul_args(x, weight, bias, residual)
    if out.shape[0]:
        _library().multiplex_cpu_matmul(*args)
    del keep  # the contiguous copies the call read
    return out


def _matmul_args(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, residual: torch.Tensor | None):
    """-> (out, multiplex_cpu_matmul's arguments, the tensors they point into): x, residual and bias checked, made
    unit-stride where they are not."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    num_tokens, d_out = x.shape[0], weight.out_features
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} features, the weight {weight.in_features}")
    out = torch.empty(num_tokens, d_out, dtype=torch.float32)
    args = (num_tokens, d_out, weight.in_features, x.data_ptr(), x.stride(0), weight.panels.data_ptr(),
            out.data_ptr(), d_out, None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0),
            torch.get_num_threads())
    return out, args, (x, bias, residual)


def enabled() -> bool:
    """Whether fp32 CPU work goes to these kernels (MULTIPLEX_CPU_MATMUL and this CPU; see the module docstring)."""
    global _enabled
    if _enabled is None:
        _enabled = cpu_build.decide("MULTIPLEX_CPU_MATMUL", CHOICE, "onednn", available)
    return _enabled


class GridFactorsStruct(ctypes.Structure):
    """kernels/cpu_matmul.c's grid_factors: where a (layer, group)'s factor stacks lie and their shapes."""

    _fields_ = [("d_in", ctypes.c_int64), ("a", ctypes.c_void_p), ("slot_stride_a", ctypes.c_int64),
                ("rank", ctypes.c_int64), ("num_slices", ctypes.c_int64), ("bt", ctypes.c_int64 * MAX_SLICES),
                ("slot_stride_bt", ctypes.c_int64 * MAX_SLICES), ("widths", ctypes.c_int64 * MAX_SLICES),
                ("out_start", ctypes.c_int64 * MAX_SLICES), ("bf16", ctypes.c_int64)]


class GridFactors(NamedTuple):
    """A (layer, group)'s padded factor stacks as the grid kernel takes them (grid_factors: checked once)."""

    a: torch.Tensor
    bt: tuple[torch.Tensor, ...]
    struct: GridFactorsStruct  # what the kernel reads: pointers into a and bt, their strides and shapes
    width: int  # h's columns: num_slices * R

    @property
    def d_in(self) -> int:
        return self.a.shape[2]


def grid_factors(a: torch.Tensor, bt: tuple[torch.Tensor, ...], out_start: tuple[int, ...]) -> GridFactors:
    """a: (num_slots, num_slices R, d_in), bt[i]: (num_slots, R, w_i), contiguous, all fp32 or all bf16 (widened as
    read, summed in fp32), checked; ValueError if the kernel cannot take them. Valid while the stacks live."""
    num_slices, rank = len(bt), bt[0].shape[1]
    if num_slices > MAX_SLICES:
        raise ValueError(f"lowrank_grid takes at most {MAX_SLICES} slices, got {num_slices}")
    if not (a.is_contiguous() and all(b.is_contiguous() for b in bt)) or a.shape[1] != num_slices * rank:
        raise ValueError("lowrank_grid needs contiguous factors, a with num_slices * R rows")
    if a.dtype not in (torch.float32, torch.bfloat16) or any(b.dtype != a.dtype for b in bt):
        raise ValueError(f"lowrank_grid needs factors all fp32 or all bf16, got {a.dtype} and "
                         f"{[b.dtype for b in bt]}")

    def int64s(values):
        return (ctypes.c_int64 * MAX_SLICES)(*values)

    struct = GridFactorsStruct(a.shape[2], a.data_ptr(), a.stride(0), rank, num_slices,
                               int64s([b.data_ptr() for b in bt]), int64s([b.stride(0) for b in bt]),
                               int64s([b.shape[2] for b in bt]), int64s(list(out_start)),
                               int(a.dtype == torch.bfloat16))
    return GridFactors(a, tuple(bt), struct, num_slices * rank)


def grid_groups(slots: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> GridGroups:
    """Group g: slot slots[g], token rows rows[offsets[g] : offsets[g + 1]], as int64 contiguous tensors."""
    return tuple(t.to(torch.int64).contiguous() for t in (slots, offsets, rows))


GridGroups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def lowrank_grid(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: tuple[torch.Tensor, ...],
                 out_start: tuple[int, ...], slots: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> None:
    """y[t, out_start[i] : +w_i] += (x[t] @ a[s, i R : (i + 1) R]^T) @ bt[i][s] for every token row t of slot s, in
    place. Group g: slot slots[g], token rows rows[offsets[g] : offsets[g + 1]]. Factors as grid_factors takes them;
    x, y fp32 with rows of unit stride. Needs available()."""
    lowrank_grid_prepared(y, x, grid_factors(a, bt, out_start), grid_groups(slots, offsets, rows))


def lowrank_grid_prepared(y: torch.Tensor, x: torch.Tensor, factors: GridFactors, groups: GridGroups) -> None:
    """lowrank_grid with its factors and groups prepared once (grid_factors, grid_groups): a step's 4 x num_layers
    calls share its groups, and the stacks serve every step until they are resized; built per call, the arguments
    took ~15 us of each call's ~20 us of overhead."""
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("lowrank_grid needs x and y with rows of unit stride")
    if x.shape[1] != factors.d_in:
        raise ValueError(f"x has {x.shape[1]} features, the factors {factors.d_in}")
    slots, offsets, rows = groups
    h = torch.empty(rows.shape[0], factors.width, dtype=torch.float32)  # the shrink's outputs, group order
    _library().multiplex_lowrank_grid(slots.shape[0], slots.data_ptr(), offsets.data_ptr(), rows.data_ptr(),
                                      x.data_ptr(), x.stride(0), ctypes.byref(factors.struct), y.data_ptr(),
                                      y.stride(0), h.data_ptr(), torch.get_num_threads())


def matmul_lowrank(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, residual: torch.Tensor | None,
                   factors: GridFactors, groups: GridGroups) -> torch.Tensor:
    """matmul(x, weight, bias, residual), then lowrank_grid_prepared(that, x, factors, groups), in one call of the
    library (no Python between the two: in a decode step it would run on caches cold from the weights just
    streamed). The factors' slices must lie within the weight's out_features columns."""
    out, args, keep = _matmul_args(x, weight, bias, residual)
    if x.shape[1] != factors.d_in:
        raise ValueError(f"x has {x.shape[1]} features, the factors {factors.d_in}")
    slots, offsets, rows = groups
    h = torch.empty(rows.shape[0], factors.width, dtype=torch.float32)  # the shrink's outputs, group order
    if out.shape[0]:
        _library().multiplex_matmul_lowrank(*args, slots.shape[0], slots.data_ptr(), offsets.data_ptr(),
                                            rows.data_ptr(), ctypes.byref(factors.struct), h.data_ptr())
    del keep
    return out


def available() -> bool:
    """Whether this machine runs the kernel: an x86-64 CPU with AVX2 and FMA, and the source compiles (once)."""
    return cpu_build.loads(_library, "our CPU matmul kernel")


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.multiplex_cpu_matmul
    fn.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
    fn.restype = None
    grid = lib.multiplex_lowrank_grid
    grid.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.POINTER(GridFactorsStruct),
                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    grid.restype = None
    fused = lib.multiplex_matmul_lowrank
    fused.argtypes = fn.argtypes + ([ctypes.c_int] + [ctypes.c_void_p] * 3
                                    + [ctypes.POINTER(GridFactorsStruct), ctypes.c_void_p])
    fused.restype = None


def _library() -> ctypes.CDLL:
    """The compiled kernel of VARIANT, built into the cache directory on first use; OSError if it cannot be built."""
    return cpu_build.load(SOURCE, VARIANT, _declare)
