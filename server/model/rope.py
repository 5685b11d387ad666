"""Rotary position embeddings (the HF "rotate_half" convention), with Llama-3 frequency scaling."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies; `scaling` is HF's rope_scaling (None, "default", "llama3", "linear")."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


class RotaryEmbedding:
    """Precomputed cos/sin tables. A step looks its positions up once (tables()), then every layer rotates its
    queries and keys in place with them (kernels/cpu_elementwise.py's rope_, or its PyTorch reference rope_ref_)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device, dtype) -> None:
        inv_freq = inv_frequencies(head_dim, theta, scaling).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, D)
        self.cos = emb.cos().to(dtype)
        sin = emb.sin().to(dtype)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: the sign moves into the table (exact)
        self.sin_signed = torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], dim=-1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) -> (cos, signed sin), each (T, D) contiguous: one lookup per step, shared by every layer."""
        return self.cos[positions], self.sin_signed[positions]
