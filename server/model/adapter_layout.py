"""Where each projection and each Scale target sits in the backbone's fused activations.

The backbone fuses q|k|v and gate|up (server/model/llama.py); adapter kernels address columns of those fused
outputs. One table, derived from the config, shared by the device pool and the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.delta import PROJECTIONS
from server.model.config import ModelConfig

GROUPS = {"qkv": (0, 3), "o": (3, 4), "gate_up": (4, 6), "down": (6, 7)}  # group -> projection index range
# Scale target -> (activation group it multiplies, which projection's columns); "ffn" is the down_proj input.
SCALE_SITES = {"q": ("qkv", "q_proj"), "k": ("qkv", "k_proj"), "v": ("qkv", "v_proj"), "up": ("gate_up", "up_proj"),
               "ffn": ("ffn", None)}


@dataclass(frozen=True)
class Layout:
    dims: dict[str, tuple[int, int]]  # projection -> (d_out, d_in)
    col: dict[str, tuple[str, int, int]]  # projection -> (group, first column in the group's output, width)
    group_width: dict[str, int]
    scale_site: dict[str, tuple[str, int, int]]  # scale target -> (activation, first column, width)

    @classmethod
    def of(cls, c: ModelConfig) -> "Layout":
        dims = {
            "q_proj": (c.q_size, c.hidden_size), "k_proj": (c.kv_size, c.hidden_size), "v_proj": (c.kv_size, c.hidden_size),
            "o_proj": (c.hidden_size, c.q_size), "gate_proj": (c.intermediate_size, c.hidden_size),
            "up_proj": (c.intermediate_size, c.hidden_size), "down_proj": (c.hidden_size, c.intermediate_size),
        }
        col, width = {}, {}
        for group, (lo, hi) in GROUPS.items():
            start = 0
            for p in PROJECTIONS[lo:hi]:
                col[p] = (group, start, dims[p][0])
                start += dims[p][0]
            width[group] = start
        sites = {t: (g, col[p][1], col[p][2]) if p else ("ffn", 0, c.intermediate_size) for t, (g, p) in SCALE_SITES.items()}
        return cls(dims, col, width, sites)
