"""LoRA: delta W = scale * B A, A (r, in) Kaiming-uniform, B (out, r) zero; scale = alpha / r (rsLoRA: alpha / sqrt r).

Defaults are the authors' causal-LM recipe (microsoft/LoRA, GPT-2 on E2E): W_q and W_v only, dropout 0.1 on the
adapter input, AdamW lr 2e-4, weight decay 0.01, linear decay after a 500-step warm-up (taken as its share of
that run, 2%), no gradient clipping. alpha defaults to r (scale 1: "we set alpha to the first r we try").

Served as LowRank(A, B, scale) per target module, exactly the trained factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, TrainingDefaults, kaiming_uniform_


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, the adapter term in fp32."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        dev = base.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(rank, base.in_features, device=dev)))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))  # (out, r)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x.float()), self.lora_A)  # (..., r)
        return self.base(x) + (self.scale * F.linear(h, self.lora_B)).to(x.dtype)  # (..., out)


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA. alpha defaults to the rank (scale 1); targets q_proj, v_proj (the authors')."""

    targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "target projections (the authors': q_proj,v_proj)"}
    )
    rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling alpha / sqrt(r)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter input (training only)"})


class LoRA(Method):
    name = "lora"
    Config = LoRAConfig
    defaults = TrainingDefaults(
        lr=2e-4, schedule="linear", warmup_ratio=0.02, weight_decay=0.01, max_grad_norm=0.0,
        source="microsoft/LoRA examples/NLG/README.md (GPT-2 M, E2E: 500 warm-up steps of 26,290)",
    )

    @property
    def scale(self) -> float:
        alpha = self.cfg.alpha if self.cfg.alpha is not None else float(self.cfg.rank)
        return lora_scale(alpha, self.cfg.rank, self.cfg.rslora)

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return LoRALinear(linear, self.cfg.rank, self.scale, self.cfg.dropout)

    def export(self) -> AdapterDeltas:
        lowrank = {
            name: LowRank(A=_cpu32(m.lora_A), B=_cpu32(m.lora_B), scale=m.scale) for name, m in self.modules.items()
        }
        return AdapterDeltas(lowrank=lowrank)
