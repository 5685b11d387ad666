"""How many compiled matmuls oneDNN keeps on a CPU, and so how much memory it holds.

The CPU projections are oneDNN matmuls (kernels/linear.py). PyTorch's oneDNN layer (ideep) and oneDNN itself each
keep an LRU cache of what they built for a call's shapes, 1024 entries each by default (`LRU_CACHE_CAPACITY`,
`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), and an entry holds buffers about the size of its call's output. A serving
engine calls its projections at a new token count whenever a prefill chunk or an arrival changes the step, so the
caches fill with shapes that rarely come back. Measured on the 2-core development CPU (2026-12-02, torch 2.13): one
thread calling a 576->1536 and a 1536->576 projection at each of 600 token counts grew the process by 2.1 GB with
the defaults, 58 MiB with 16 entries each (and ran no slower); a 100 s soak of the tiny model over HTTP grew
890 -> 1589 MiB with the defaults, 893 -> 992 MiB with 128 entries each, and the 1200 s soak of the README rose
by 810 MiB.

Every layer's projection has the same shapes, so a decode step needs about five entries (q|k|v, o, gate|up, down,
the LM head) and every layer after the first finds them; 16 keeps the last few steps' shapes. Without any cache
(capacity 0) every call rebuilds, which halved the tiny model's throughput.

Both variables are read once, at the process's first oneDNN call, which the model load makes (it prepacks the
weights): `bound_onednn_caches` runs before it. A value the user set for either variable is left as it is.
"""
from __future__ import annotations

import os

CAPACITY = 16
VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = CAPACITY) -> dict[str, str]:
    """Set each cache's capacity where the user has not; -> the values in force (once the first oneDNN call reads
    them: a process that already made one keeps what it read then)."""
    return {name: os.environ.setdefault(name, str(capacity)) for name in VARIABLES}
