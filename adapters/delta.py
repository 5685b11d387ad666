"""The delta vocabulary: what the server applies per token, whatever method trained the adapter.

Module names are `layers.{i}.{q,k,v,o,gate,up,down}_proj`; weights are `[out, in]` (`y = x W^T`).

| delta    | effect on `y = W x`                    | methods                                   |
| LowRank  | y += scale * B (A x)                   | LoRA, ALoRA, SpecAdapt, SORSA/PiSSA (2r)  |
| Sparse   | y[rows] += values * x[cols]            | SIFT                                      |
| Scale    | activation *= vector (k, v, ffn)       | IA3                                       |
| ParaLayer| per-request vectors from the prompt    | PARA                                      |
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Activations a Scale may multiply: outputs of q/k/v/up projections, and "ffn" = the FFN intermediate
# act(gate) * up, i.e. the input of down_proj (PEFT IA3's feed-forward target).
SCALE_TARGETS = ("q", "k", "v", "up", "ffn")


# The projection whose activation each Scale target multiplies (ffn: the input of down_proj).
SCALE_PROJECTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "up": "up_proj", "ffn": "down_proj"}


def module_name(layer: int, proj: str) -> str:
    return f"layers.{layer}.{proj}"


def parse_module_name(name: str) -> tuple[int, str]:
    """'layers.3.q_proj' -> (3, 'q_proj'); ValueError for anything else."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in PROJECTIONS:
        raise ValueError(f"unknown target module {name!r} (expected layers.<i>.<{'|'.join(PROJECTIONS)}>)")
    return int(parts[1]), parts[2]


def scale_name(layer: int, target: str) -> str:
    """Key of a Scale vector in AdapterDeltas.scale: 'layers.{i}.{target}', target in SCALE_TARGETS."""
    return f"layers.{layer}.{target}"


def parse_scale_name(name: str) -> tuple[int, str]:
    """'layers.3.k' -> (3, 'k'); ValueError for anything else."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in SCALE_TARGETS:
        raise ValueError(f"unknown scale target {name!r} (expected layers.<i>.<{'|'.join(SCALE_TARGETS)}>)")
    return int(parts[1]), parts[2]


@dataclass
class LowRank:
    """delta W = scale * B @ A.   A: (r, d_in)   B: (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta_weight(self) -> torch.Tensor:  # (d_out, d_in), fp32
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class Sparse:
    """delta W[rows[j], cols[j]] += values[j]; entries sorted by (row, col), unique. int32 indices."""

    rows: torch.Tensor  # (nnz,) int32
    cols: torch.Tensor  # (nnz,) int32
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]  # (d_out, d_in)

    def delta_weight(self) -> torch.Tensor:  # (d_out, d_in), fp32
        w = torch.zeros(self.shape, dtype=torch.float32)
        w[self.rows.long(), self.cols.long()] = self.values.float()
        return w


@dataclass
class ParaLayer:
    """PARA generator for one layer: p = Pool(H_prompt); z = act(W_down p); [l_q; l_v; l_u] = 1 + W_up z."""

    pool: str  # "attention" | "mean" | "last"
    w_down: torch.Tensor  # (r, d_model)
    w_up: torch.Tensor  # (d_q + d_kv + d_ff, r)
    pool_query: torch.Tensor | None = None  # (d_model,) for attention pooling
    act: str = "silu"


PARA_POOLS = ("attention", "mean", "last")
PARA_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


def para_pool(h: torch.Tensor, prompt_mask: torch.Tensor, pool: str, pool_query: torch.Tensor | None) -> torch.Tensor:
    """Pool the prompt tokens' hidden states: h (B, T, d) fp32, prompt_mask (B, T) bool -> (B, d). Every row needs a
    prompt token (the caller's guarantee: nothing here reads a tensor back to the host).
    "attention": softmax_t(H_t . q_pool / sqrt(d)) weights; "mean"; "last": the last prompt token."""
    mask = prompt_mask.to(torch.bool)
    if pool == "mean":
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1)
    if pool == "last":
        pos = torch.arange(h.shape[1], device=h.device).expand_as(mask)  # (B, T)
        last = torch.where(mask, pos, -1).max(dim=1).values  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if pool == "attention":
        if pool_query is None:
            raise ValueError("attention pooling needs a pool_query")
        scores = (h @ pool_query.to(h.dtype)) / math.sqrt(h.shape[-1])  # (B, T)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, T)
        return (weights.unsqueeze(-1) * h).sum(1)  # (B, d)
    raise ValueError(f"unknown PARA pool {pool!r}; choose from {PARA_POOLS}")


def para_vectors(layer: ParaLayer, h: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """[l_q; l_v; l_u] for one layer, the meaning of a ParaLayer (the trainer and the server both compute it here):
    h (B, T, d) normed layer input, prompt_mask (B, T) -> (B, d_q + d_kv + d_ff), fp32."""
    h = h.float()
    p = para_pool(h, prompt_mask, layer.pool, None if layer.pool_query is None else layer.pool_query.float())
    z = PARA_ACTIVATIONS[layer.act](p @ layer.w_down.float().T)  # (B, r)
    return 1.0 + z @ layer.w_up.float().T  # (B, n_out)


@dataclass
class AdapterDeltas:
    """One adapter, compiled: any mix of kinds, module by module."""

    lowrank: dict[str, LowRank] = field(default_factory=dict)  # module name -> LowRank
    sparse: dict[str, Sparse] = field(default_factory=dict)  # module name -> Sparse
    scale: dict[str, torch.Tensor] = field(default_factory=dict)  # "layers.{i}.{target}" -> (d,) vector
    para: dict[int, ParaLayer] = field(default_factory=dict)  # layer -> generator

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """Dense fp32 delta per module from the LowRank and Sparse kinds (the merge-into-weights reference)."""
        out: dict[str, torch.Tensor] = {}
        for name, d in list(self.lowrank.items()) + list(self.sparse.items()):
            w = d.delta_weight()
            out[name] = out[name] + w if name in out else w
        return out

    def nbytes(self) -> int:
        tensors = [t for lr in self.lowrank.values() for t in (lr.A, lr.B)]
        tensors += [t for sp in self.sparse.values() for t in (sp.rows, sp.cols, sp.values)]
        tensors += list(self.scale.values())
        tensors += [t for p in self.para.values() for t in (p.w_down, p.w_up, p.pool_query) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
