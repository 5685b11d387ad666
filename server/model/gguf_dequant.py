"""GGUF tensor bytes -> float32, one vectorised numpy function per ggml type (block layouts of ggml-common.h).

A quantized tensor is a run of fixed-size blocks along each row; a block of `block_size` values takes `type_size`
bytes (gguf.GGML_QUANT_SIZES). Every function here maps a whole tensor's blocks at once, with no Python loop per
block: (num_blocks, type_size) uint8 -> (num_blocks, block_size) float32. The reference for every one is
`gguf.quants.dequantize` (tests/server/test_gguf.py compares them).

A "super-block" type (*_K) holds 256 values as 8 or 16 sub-blocks of 32 or 16, each with its own 4- or 6-bit scale
(and min), themselves scaled by the block's f16 `d` (and `dmin`).
"""
from __future__ import annotations

from math import prod
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256  # values per super-block


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) packed bytes -> (..., 2k): the low nibbles of all k bytes, then the high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(qh: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit j of the little-endian word first."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def deq_f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float32)


def deq_f16(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks)


def deq_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32
    return (np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    """34 bytes: d (f16), q[32] (int8); x = d * q."""
    d, q = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
    return d * q.astype(np.float32)


def deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    """18 bytes: d, qs[16] (32 nibbles); x = d * (q - 8)."""
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - 8  # (n, 32)
    return _f16(blocks[:, :2]) * q.astype(np.float32)


def deq_q4_1(blocks: np.ndarray) -> np.ndarray:
    """20 bytes: d, m, qs[16]; x = d * q + m."""
    q = _nibbles(blocks[:, 4:]).astype(np.float32)  # (n, 32)
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def deq_q5_0(blocks: np.ndarray) -> np.ndarray:
    """22 bytes: d, qh (32 fifth bits), qs[16]; x = d * (q - 16)."""
    q = _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4)  # (n, 32)
    return _f16(blocks[:, :2]) * (q.astype(np.int8) - 16).astype(np.float32)


def deq_q5_1(blocks: np.ndarray) -> np.ndarray:
    """24 bytes: d, m, qh (32 fifth bits), qs[16]; x = d * q + m."""
    q = (_nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4)).astype(np.float32)  # (n, 32)
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def deq_q2_k(blocks: np.ndarray) -> np.ndarray:
    """84 bytes: scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit), d, dmin; 16 sub-blocks of 16.

    Value (h, j, l) of half h, bit pair j, lane l (0..31) is (qs[32h + l] >> 2j) & 3, in sub-block 8h + 2j + l // 16."""
    n = len(blocks)
    sc, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, h, j, l)
    q = q.reshape(n, 16, 16).astype(np.float32)
    scale = (d * (sc & 0x0F).astype(np.float32))[:, :, None]  # (n, 16, 1)
    minimum = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    return (scale * q - minimum).reshape(n, QK_K)


def _q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """(n, 12) packed -> (n, 16) signed 6-bit scales: low nibbles from bytes 0..7 (low then high halves), the top
    two bits of scale s from byte 8 + s % 4 at bit 2 * (s // 4)."""
    n = len(sc)
    low = _nibbles(sc[:, :8])  # (n, 16)
    high = (sc[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3  # (n, 4, 4)
    return (low | (high.reshape(n, 16) << 4)).astype(np.int8) - 32


def deq_q3_k(blocks: np.ndarray) -> np.ndarray:
    """110 bytes: hmask[32], qs[64] (2-bit), scales[12] (6-bit), d; 16 sub-blocks of 16.

    Value (h, j, l) = ((qs[32h + l] >> 2j) & 3) - (0 if bit 4h + j of hmask[l] else 4), sub-block 8h + 2j + l // 16."""
    n = len(blocks)
    hmask, qs, sc, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    low = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, h, j, l)
    high = _bits(hmask).reshape(n, 32, 8).transpose(0, 2, 1)  # (n, 8 = 4h + j, 32 = l)
    q = low.reshape(n, 8, 32).astype(np.int8) - ((1 - high.astype(np.int8)) << 2)
    scale = (d * _q3_k_scales(sc).astype(np.float32))[:, :, None]  # (n, 16, 1)
    return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _k4_scales_mins(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed -> (n, 8) 6-bit scales and (n, 8) 6-bit mins (ggml's get_scale_min_k4)."""
    scales = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=-1)
    return scales, mins


def _k4_apply(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = d * scale[s] * q - dmin * min[s] over 8 sub-blocks of 32; q: (n, 8, 32)."""
    n = len(blocks)
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    scales, mins = _k4_scales_mins(blocks[:, 4:16])
    scale = (d * scales.astype(np.float32))[:, :, None]  # (n, 8, 1)
    minimum = (dmin * mins.astype(np.float32))[:, :, None]
    return (scale * q.astype(np.float32) - minimum).reshape(n, QK_K)


def deq_q4_k(blocks: np.ndarray) -> np.ndarray:
    """144 bytes: d, dmin, scales[12], qs[128]; each 32 bytes of qs hold sub-block 2c (low nibbles), 2c+1 (high)."""
    n = len(blocks)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return _k4_apply(blocks, q)


def deq_q5_k(blocks: np.ndarray) -> np.ndarray:
    """176 bytes: d, dmin, scales[12], qh[32], qs[128]; as Q4_K plus a fifth bit: bit s of qh[l] for sub-block s."""
    n = len(blocks)
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(blocks[:, 16:48]).reshape(n, 32, 8).transpose(0, 2, 1)  # (n, 8 = s, 32 = l)
    return _k4_apply(blocks, low | (high << 4))


def deq_q6_k(blocks: np.ndarray) -> np.ndarray:
    """210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d; 16 sub-blocks of 16.

    In half h, quarter k = 2 * nibble + part holds (ql[64h + 32 part + l] nibble) | ((qh[32h + l] >> 2k) & 3) << 4."""
    n = len(blocks)
    ql, qh = blocks[:, :128].reshape(n, 2, 2, 32), blocks[:, 128:192].reshape(n, 2, 1, 32)  # (n, h, part, l)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # (n, h, k, l)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16).astype(np.float32)
    scale = (_f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (scale * q).reshape(n, QK_K)


# ggml type -> (num_blocks, type_size) uint8 -> (num_blocks, block_size) float32. A new type is one line here.
DEQUANTIZERS: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: deq_f32, Q.F16: deq_f16, Q.BF16: deq_bf16,
    Q.Q8_0: deq_q8_0, Q.Q4_0: deq_q4_0, Q.Q4_1: deq_q4_1, Q.Q5_0: deq_q5_0, Q.Q5_1: deq_q5_1,
    Q.Q2_K: deq_q2_k, Q.Q3_K: deq_q3_k, Q.Q4_K: deq_q4_k, Q.Q5_K: deq_q5_k, Q.Q6_K: deq_q6_k,
}


def type_name(ggml_type: int) -> str:
    try:
        return Q(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One tensor's bytes as stored in the file -> float32 array of `shape` (numpy order: rows first, row last).

    raw: the tensor's data in any shape or dtype (read as bytes); name: for error messages only."""
    fn = DEQUANTIZERS.get(ggml_type)
    if fn is None:
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        raise ValueError(f"tensor {name!r} has type {type_name(ggml_type)}, which multiplex cannot dequantize; "
                         f"supported: {supported}")
    block_size, type_size = GGML_QUANT_SIZES[Q(ggml_type)]
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    numel = prod(shape)
    if shape[-1] % block_size or raw.size != numel // block_size * type_size:
        raise ValueError(f"tensor {name!r}: {raw.size} bytes of {type_name(ggml_type)} do not hold shape {shape}")
    return fn(raw.reshape(-1, type_size)).reshape(shape)
