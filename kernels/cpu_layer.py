"""A decoder layer of a CPU decode step in one call of our C kernels (kernels/cpu_layer.c): RMSNorm, the q|k|v
projection, RoPE, the KV cache writes, decode attention, o, RMSNorm, gate|up, SiLU x up and down, each projection
with its LoRA grid deltas, in one OpenMP region.

Semantics: those ops one by one as server/model/llama.py runs them with our kernels (kernels/cpu_matmul.py,
cpu_attention.py, cpu_elementwise.py), which are the references; the C file includes their sources, so the sums are
the same, in the same order. Why: a smollm2 decode step ran ~300 Python ops between its kernels, each ~10 us on caches
the projection before it had just evicted; here a layer is one call.

What it takes (the caller checks: server/model/fused_decode.py): fp32 on a CPU that runs our kernels, the packed
weights of kernels/cpu_matmul.py, a step whose every row is a decode in sequence order, at most MAX_WINDOWS attention
windows, GQA groups of at most cpu_attention.MAX_REP, and adapters of LowRank kind only, in one rank class (the grid).

Where it runs: `enabled()`, `MULTIPLEX_CPU_LAYER=auto|ours|ops` read once at import (`auto`: ours wherever the
kernel builds, kernels/cpu_build.py; `ops`: the ops one by one). The call releases the GIL and runs on the calling
thread's OpenMP team with the step's `threads`.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from kernels import cpu_build
from kernels.cpu_matmul import GridFactorsStruct

SOURCE = Path(__file__).with_suffix(".c")
MAX_WINDOWS = 4  # kernels/cpu_layer.c's MAX_WINDOWS
CHOICE = cpu_build.choice("MULTIPLEX_CPU_LAYER", "ops")
_enabled: bool | None = None  # decided at the first call: it may compile the kernel

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class Shapes(ctypes.Structure):
    """The model's shapes (kernels/cpu_layer.c's layer_shapes)."""

    _fields_ = [(n, _i64) for n in ("hidden", "q_size", "kv_size", "intermediate", "num_heads", "num_kv_heads",
                                    "head_dim")] + [("eps", ctypes.c_float), ("sm_scale", ctypes.c_float)]


class LayerRefs(ctypes.Structure):
    """One layer's weights (packed panels), its KV cache (rows of kv_size) and which window it attends over
    (layer_weights)."""

    _fields_ = [(n, _ptr) for n in ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down", "k_cache",
                                    "v_cache")] + [("window", _i64)]


class StepRefs(ctypes.Structure):
    """A decode step's rows and buffers (layer_step): see the C struct for each field."""

    _fields_ = [("num_rows", _i64), ("x", _ptr), ("cos", _ptr), ("sin_signed", _ptr), ("num_writes", _i64),
                ("write_slots", _ptr), ("write_rows", _ptr), ("keys", _ptr * MAX_WINDOWS),
                ("visible", _ptr * MAX_WINDOWS), ("span", _i64 * MAX_WINDOWS), ("num_groups", _i64),
                ("slots", _ptr), ("offsets", _ptr), ("rows", _ptr), ("h", _ptr), ("qkv", _ptr), ("attn", _ptr),
                ("gu", _ptr), ("act", _ptr), ("grid_h", _ptr), ("scores", _ptr), ("threads", _i64)]


def enabled() -> bool:
    """Whether a decode step's layers may run as one call each (MULTIPLEX_CPU_LAYER and this machine)."""
    global _enabled
    if _enabled is None:
        _enabled = cpu_build.decide("MULTIPLEX_CPU_LAYER", CHOICE, "ops", available)
    return _enabled


def available() -> bool:
    """Whether this machine runs the kernel: an x86-64 CPU with AVX2 and FMA, and the source compiles (once)."""
    return cpu_build.loads(_library, "our CPU decoder-layer kernel")


def decode_layer(shapes: Shapes, layer: LayerRefs, step: StepRefs,
                 grids: tuple[GridFactorsStruct | None, ...]) -> None:
    """One layer over the step (the C file's semantics); grids: the LoRA grid's factors of q|k|v, o, gate|up and down,
    None where the step's adapters have no delta. The structures' pointers must be valid for the call."""
    _library().multiplex_decode_layer(ctypes.byref(shapes), ctypes.byref(layer), ctypes.byref(step), *grids)


def _declare(lib: ctypes.CDLL) -> None:
    grid = ctypes.POINTER(GridFactorsStruct)
    fn = lib.multiplex_decode_layer
    fn.argtypes = [ctypes.POINTER(Shapes), ctypes.POINTER(LayerRefs), ctypes.POINTER(StepRefs)] + [grid] * 4
    fn.restype = None


def _library() -> ctypes.CDLL:
    """The compiled kernel in kernels/cpu_matmul.py's variant, built on first use; OSError if it cannot be."""
    return cpu_build.load(SOURCE, cpu_build.NATIVE, _declare)
