"""A decoder layer of a CPU step in one call of our C kernels (kernels/cpu_layer.c): RMSNorm, the q|k|v projection,
RoPE, the KV cache writes, decode attention, o, RMSNorm, gate|up, SiLU x up and down, each projection with its LoRA
grid deltas, in one OpenMP region (`decode_layer`, a step whose every row is a decode); or in two calls around the
prefill rows' attention, which the caller runs in PyTorch on the step's buffers (`layer_front`, then `layer_back`).

Semantics: those ops one by one as server/model/llama.py runs them with our kernels (kernels/cpu_matmul.py,
cpu_attention.py, cpu_elementwise.py); the C file includes their sources, so the sums are the same, in the same order.
The reference here is `layer_ref` (PyTorch). Why: a smollm2 decode step ran ~300 Python ops between its kernels, each
~10 us on caches the projection before it had just evicted; here a layer is one call, its buffers made once a step.

What it takes (the caller checks: server/model/fused_layers.py): fp32 on a CPU that runs our kernels, the packed
weights of kernels/cpu_matmul.py, at most MAX_WINDOWS attention windows, GQA groups of at most
cpu_attention.MAX_REP, and adapters of LowRank kind only, in one rank class (the grid).

Where it runs: `enabled()`, `MULTIPLEX_CPU_LAYER=auto|ours|ops` read once at import (`auto`: ours wherever the
kernel builds, kernels/cpu_build.py; `ops`: the ops one by one). A call releases the GIL and runs on the calling
thread's OpenMP team with the step's `threads`.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import cpu_build, cpu_matmul
from kernels.attention import AttentionMeta, paged_attention_ref, write_kv_ref
from kernels.cpu_elementwise import rope_ref_, silu_mul_ref
from kernels.cpu_matmul import GridFactorsStruct, GridGroups, PackedWeight

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
    """A step's rows and buffers (layer_step): see the C struct for each field."""

    _fields_ = [("num_rows", _i64), ("x", _ptr), ("cos", _ptr), ("sin_signed", _ptr), ("num_writes", _i64),
                ("write_slots", _ptr), ("write_rows", _ptr), ("num_decodes", _i64), ("decode_rows", _ptr),
                ("keys", _ptr * MAX_WINDOWS),
                ("visible", _ptr * MAX_WINDOWS), ("span", _i64 * MAX_WINDOWS), ("num_groups", _i64),
                ("slots", _ptr), ("offsets", _ptr), ("rows", _ptr), ("h", _ptr), ("qkv", _ptr), ("attn", _ptr),
                ("gu", _ptr), ("act", _ptr), ("grid_h", _ptr), ("scores", _ptr), ("threads", _i64)]


def layer_ref(x: torch.Tensor, weights: dict[str, torch.Tensor | None], k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, meta: AttentionMeta, cos: torch.Tensor,
                     sin_signed: torch.Tensor, eps: float, sm_scale: float, window: int, delta=None) -> torch.Tensor:
    """What decode_layer computes, in PyTorch: x (T, H) -> the layer's output (a new tensor); the caches written in
    place. weights: input_norm, qkv, qkv_bias (or None), o, post_norm, gate_up, down, unpacked; delta(group, inp) ->
    the adapters' (T, width) delta of a group, or None for none."""
    def project(group: str, inp: torch.Tensor, bias=None) -> torch.Tensor:
        out = F.linear(inp, weights[group], bias)
        return out if delta is None else out + delta(group, inp)

    num_rows, hidden = x.shape
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kv_size = num_kv_heads * head_dim
    q_size = weights["qkv"].shape[0] - 2 * kv_size
    qkv = project("qkv", F.rms_norm(x, (hidden,), weights["input_norm"], eps), weights["qkv_bias"])
    rope_ref_(qkv[:, : q_size + kv_size].view(num_rows, -1, head_dim), cos, sin_signed)
    q = qkv[:, :q_size].view(num_rows, -1, head_dim)
    k, v = (qkv[:, q_size + i * kv_size : q_size + (i + 1) * kv_size].view(num_rows, num_kv_heads, head_dim)
            for i in (0, 1))
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    attn = paged_attention_ref(q, k_cache, v_cache, meta, sm_scale, window).reshape(num_rows, q_size)
    x = x + project("o", attn)
    act = silu_mul_ref(project("gate_up", F.rms_norm(x, (hidden,), weights["post_norm"], eps)))
    return x + project("down", act)


def layer_refs(input_norm: torch.Tensor, qkv: PackedWeight, qkv_bias: torch.Tensor | None, o: PackedWeight,
               post_norm: torch.Tensor, gate_up: PackedWeight, down: PackedWeight, k_cache: torch.Tensor,
               v_cache: torch.Tensor, window: int) -> LayerRefs:
    """A layer's refs: fp32 contiguous tensors, the caches (blocks, block_size, Hkv, D); window: the index of its
    attention window among the step's (step_refs' keys). The tensors must outlive the refs."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("layer_refs needs contiguous caches")
    return LayerRefs(input_norm.data_ptr(), qkv.panels.data_ptr(), None if qkv_bias is None else qkv_bias.data_ptr(),
                     o.panels.data_ptr(), post_norm.data_ptr(), gate_up.panels.data_ptr(), down.panels.data_ptr(),
                     k_cache.data_ptr(), v_cache.data_ptr(), window)


class StepBuffers(NamedTuple):
    """What step_refs made: the refs, the step's q|k|v and attention buffers (a caller with prefill rows runs their
    attention between layer_front and layer_back on them), and every tensor the refs point into."""

    refs: StepRefs
    qkv: torch.Tensor  # (T, q + 2 kv)
    attn: torch.Tensor  # (T, q)
    keep: list


def step_refs(shapes: Shapes, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, write_slots: torch.Tensor,
              write_rows: torch.Tensor | None, decode_rows: torch.Tensor | None, keys: list[torch.Tensor],
              visible: list[torch.Tensor], groups: GridGroups | None, grid_width: int) -> StepBuffers:
    """A step's refs: x (T, hidden) fp32 contiguous, updated in place by every layer; cos, sin_signed (T, D);
    write_slots (W,) the cache row of each written row's key and value, write_rows their rows (None: rows 0..W-1);
    decode_rows the decode sequences' rows (None: rows 0..Bd-1, Bd = len(visible[0])); keys[i], visible[i]: the
    step's attention plan of window i (kernels/attention_plan.py); groups: the LoRA grid's (or None); grid_width: the
    widest J of the grids the layers take. Fresh buffers; hold the result until the layers ran."""
    num_rows, rep = x.shape[0], shapes.num_heads // shapes.num_kv_heads
    if not (x.is_contiguous() and x.dtype == torch.float32) or not 0 < len(keys) <= MAX_WINDOWS:
        raise ValueError("step_refs needs a contiguous fp32 x and 1 to MAX_WINDOWS windows")
    tables = [t.contiguous() for t in (cos, sin_signed)]
    rows = [None if t is None else t.to(torch.int64).contiguous() for t in (write_slots, write_rows, decode_rows)]
    keys = [k.to(torch.int64).contiguous() for k in keys]
    visible = [v.to(torch.int64).contiguous() for v in visible]
    num_decodes = visible[0].shape[0]
    buffers = [torch.empty(num_rows, n) for n in (shapes.hidden, shapes.q_size + 2 * shapes.kv_size, shapes.q_size,
                                                  2 * shapes.intermediate, shapes.intermediate, max(grid_width, 1))]
    scores = torch.empty(max(1, max(k.numel() for k in keys) * rep))
    refs = StepRefs(num_rows=num_rows, x=x.data_ptr(), cos=tables[0].data_ptr(), sin_signed=tables[1].data_ptr(),
                    num_writes=rows[0].shape[0], num_decodes=num_decodes,
                    num_groups=0 if groups is None else groups[0].shape[0], threads=torch.get_num_threads())
    refs.write_slots, refs.write_rows, refs.decode_rows = (None if t is None else t.data_ptr() for t in rows)
    for i, (k, v) in enumerate(zip(keys, visible, strict=True)):
        refs.keys[i], refs.visible[i] = k.data_ptr(), v.data_ptr()
        refs.span[i] = k.numel() // max(1, num_decodes * shapes.num_kv_heads)
    if groups is not None:
        refs.slots, refs.offsets, refs.rows = (t.data_ptr() for t in groups)
    refs.h, refs.qkv, refs.attn, refs.gu, refs.act, refs.grid_h = (b.data_ptr() for b in buffers)
    refs.scores = scores.data_ptr()
    return StepBuffers(refs, buffers[1], buffers[2], [x, *tables, rows, keys, visible, groups, *buffers, scores])


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
    """One layer over a step whose every row is a decode (the C file's semantics); grids: the LoRA grid's factors of
    q|k|v, o, gate|up and down, None where the step's adapters have no delta. The refs must be valid for the call."""
    _library().multiplex_decode_layer(ctypes.byref(shapes), ctypes.byref(layer), ctypes.byref(step), *grids)


def layer_front(shapes: Shapes, layer: LayerRefs, step: StepRefs, qkv_grid: GridFactorsStruct | None) -> None:
    """A layer up to attention, the decode rows' attention included (into the step's attn buffer); the caller then
    runs the other rows' attention on the step's buffers (q rotated, keys and values in the cache), then layer_back."""
    _library().multiplex_layer_front(ctypes.byref(shapes), ctypes.byref(layer), ctypes.byref(step), qkv_grid)


def layer_back(shapes: Shapes, layer: LayerRefs, step: StepRefs, grids: tuple[GridFactorsStruct | None, ...]) -> None:
    """A layer from attention's output on (o, RMSNorm, gate|up, SiLU x up, down); grids: of o, gate|up and down."""
    _library().multiplex_layer_back(ctypes.byref(shapes), ctypes.byref(layer), ctypes.byref(step), *grids)


def _declare(lib: ctypes.CDLL) -> None:
    grid = ctypes.POINTER(GridFactorsStruct)
    refs = [ctypes.POINTER(Shapes), ctypes.POINTER(LayerRefs), ctypes.POINTER(StepRefs)]
    for fn, grids in ((lib.multiplex_decode_layer, 4), (lib.multiplex_layer_front, 1), (lib.multiplex_layer_back, 3)):
        fn.argtypes = refs + [grid] * grids
        fn.restype = None


def _library() -> ctypes.CDLL:
    """The compiled kernel in kernels/cpu_matmul.py's form (its VARIANT: the same register blocks as the op-by-op
    path's projections), built on first use; OSError if it cannot be."""
    return cpu_build.load(SOURCE, cpu_matmul.VARIANT, _declare)
