"""PiSSA: LoRA initialised from the principal singular directions of W.

Init (fp32, exact SVD or `svd_lowrank` with `niter`): A = diag(sqrt(S_r / s)) Vh_r, B = U_r diag(sqrt(S_r / s)),
so that s B A = U_r S_r Vh_r (PEFT's `pissa_init`), s = alpha / r (alpha defaults to r: s = 1). The initial
A0, B0 are kept (buffers). Plain task loss.

Trainer form (default): y = x W^T + s ((x A^T) B^T - (x A0^T) B0^T), W the ORIGINAL frozen weight. It has the same
gradients as PEFT's residual form W_res = W - s B0 A0, equals the base model exactly at init, and makes the
served adapter exactly the trained one. `materialize_residual=True` uses PEFT's form instead (one low-rank
product per forward; the served adapter then differs from the trained one by the rounding of W_res).

Served as a LowRank of rank <= 2r, same scale: the delta s (B A - B0 A0) is the rank-2r product
B' A' with A' = [A; A0], B' = [B, -B0] (PEFT's `path_initial_model_for_weight_conversion`), and by default
(`refactor`) it is re-factored in fp64 (`refactor_lowrank`: QR of both factors, SVD of the 2r x 2r core, directions
zero to fp64 rounding dropped). The re-factoring is what makes the adapter survive bf16 serving: [A; A0] and
[B, -B0] hold two copies of W's principal part that cancel to a delta ~1000x smaller after a typical run, below
their own bf16 rounding, whereas the re-factored pair has entries of the delta's size (tests/adapters/
test_fidelity.py). `refactor=False` exports the raw concatenation (fp32-exact, lost in bf16);
`refactor_energy` also truncates by energy. The SVD is never recomputed at load time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, TrainingDefaults, refactor_lowrank, top_svd


class PiSSALinear(nn.Module):
    """y = base(x) + s ((x A^T) B^T - (x A0^T) B0^T)   (or, materialised: base_res(x) + s (x A^T) B^T)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, niter: int | None, materialize_residual: bool):
        super().__init__()
        u, s_vals, vh = top_svd(base.weight, rank, niter)  # (out, r), (r,), (r, in)
        root = torch.sqrt(s_vals / scale)  # (r,)
        a0 = root[:, None] * vh  # (r, in)
        b0 = u * root[None, :]  # (out, r)
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(a0.clone())
        self.lora_B = nn.Parameter(b0.clone())
        self.register_buffer("A0", a0)
        self.register_buffer("B0", b0)
        self.materialized = materialize_residual
        if materialize_residual:
            w = base.weight
            w_res = (w.detach().float() - scale * (b0 @ a0)).to(w.dtype)  # (out, in)
            self.base = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype
            )
            self.base.weight = nn.Parameter(w_res, requires_grad=False)
            if base.bias is not None:
                self.base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        h = F.linear(F.linear(xf, self.lora_A), self.lora_B)  # (..., out)
        if not self.materialized:
            h = h - F.linear(F.linear(xf, self.A0), self.B0)
        return self.base(x) + (self.scale * h).to(x.dtype)


@dataclass
class PiSSAConfig(MethodConfig):
    """PiSSA. alpha defaults to the rank (scale 1)."""

    niter: int | None = field(default=None, metadata={"help": "svd_lowrank iterations (unset: exact SVD)", "type": int})
    materialize_residual: bool = field(
        default=False, metadata={"help": "train on W_res = W - s B0 A0 (PEFT form) instead of W + s(BA - B0A0)"}
    )
    refactor: bool = field(
        default=True,
        metadata={"help": "re-factor the rank-2r export in fp64 (QR + SVD): exact when served in bf16; "
                          "off: the raw [A; A0], [B, -B0] concatenation, which bf16 serving loses"},
    )
    refactor_energy: float | None = field(
        default=None,
        metadata={"help": "with refactor: keep only this fraction of the delta's energy", "type": float},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refactor_energy is not None and not self.refactor:
            raise ValueError("pissa refactor_energy needs refactor")


class PiSSA(Method):
    name = "pissa"
    Config = PiSSAConfig
    defaults = TrainingDefaults(
        lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
        source="GraphPKU/PiSSA scripts/metamath_llama2_7b/run_pissa.sh (HF Trainer; clipping: its default 1.0)",
    )

    @property
    def scale(self) -> float:
        alpha = self.cfg.alpha if self.cfg.alpha is not None else float(self.cfg.rank)
        return alpha / self.cfg.rank

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return PiSSALinear(linear, self.cfg.rank, self.scale, self.cfg.niter, self.cfg.materialize_residual)

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            a = torch.cat([m.lora_A.detach(), m.A0], 0).float().cpu()  # (2r, in)
            b = torch.cat([m.lora_B.detach(), -m.B0], 1).float().cpu()  # (out, 2r)
            if self.cfg.refactor:
                a, b = refactor_lowrank(a, b, self.cfg.refactor_energy)  # (k, in), (out, k), k <= 2r
            lowrank[name] = LowRank(A=a.contiguous(), B=b.contiguous(), scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)
