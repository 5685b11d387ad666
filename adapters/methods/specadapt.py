"""SpecAdapt — a RECONSTRUCTION from the paper's abstract only (see METHODS.md); every choice below is configurable.

Parameterisation: delta W = scale * B diag(s) A, with A (r, in) = Vh_r and B (out, r) = U_r, the top-r singular
vectors of W (orthonormal, fp32), and s (r,) = 0, so delta W = 0 at init; A, B and s are all trained.
scale = 1, or alpha / r when alpha is given.

Singular-guided weight decay (decoupled, after each optimizer step, on s only):
    s_i <- s_i * (1 - lr * lambda * f(sigma_i)),   f(sigma_i) = sigma_1 / sigma_i by default
where sigma are the top-r singular values of the pretrained W: directions weak in W are regularised more. `f` is
pluggable: a name from `DECAY_FUNCTIONS` or any callable (sigma (r,) -> (r,)). A and B get no weight decay.

Gradient normalisation (before the optimizer step): every adapter tensor's gradient is rescaled to unit RMS
(`grad_norm="rms"`, g / (rms(g) + eps)) or unit l2 norm (`"l2"`), or left alone (`"none"`).

Served as LowRank(A, B diag(s), scale), rank r.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, StepContext, top_svd

DECAY_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "inverse": lambda sigma: sigma[0] / sigma,  # sigma_1 / sigma_i (default)
    "sqrt_inverse": lambda sigma: torch.sqrt(sigma[0] / sigma),
    "uniform": lambda sigma: torch.ones_like(sigma),  # plain decoupled decay on s
}


class SpecAdaptLinear(nn.Module):
    """y = base(x) + scale * ((x A^T) * s) B^T, adapter term in fp32."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        u, sigma, vh = top_svd(base.weight, rank)  # (out, r), (r,), (r, in)
        self.base = base
        self.scale = scale
        self.spec_A = nn.Parameter(vh.clone())  # (r, in)
        self.spec_B = nn.Parameter(u.clone())  # (out, r)
        self.spec_s = nn.Parameter(torch.zeros(rank, device=u.device))  # (r,)
        self.register_buffer("sigma", sigma)  # (r,) singular values of the pretrained W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(x.float(), self.spec_A) * self.spec_s, self.spec_B)  # (..., out)
        return self.base(x) + (self.scale * h).to(x.dtype)


@dataclass
class SpecAdaptConfig(MethodConfig):
    """SpecAdapt (reconstruction)."""

    weight_decay: float = field(default=0.05, metadata={"help": "lambda: base strength of the singular-guided decay on s"})
    decay_fn: Any = field(
        default="inverse", metadata={"help": f"f(sigma): one of {sorted(DECAY_FUNCTIONS)} (or a callable)"}
    )
    grad_norm: str = field(default="rms", metadata={"help": "per-tensor gradient normalisation: rms, l2 or none"})
    eps: float = field(default=1e-8, metadata={"help": "epsilon of the gradient normalisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_norm not in ("rms", "l2", "none"):
            raise ValueError(f"specadapt grad_norm must be rms, l2 or none, got {self.grad_norm!r}")
        if not callable(self.decay_fn) and self.decay_fn not in DECAY_FUNCTIONS:
            raise ValueError(f"specadapt decay_fn must be one of {sorted(DECAY_FUNCTIONS)} or a callable")


class SpecAdapt(Method):
    name = "specadapt"
    Config = SpecAdaptConfig
    default_lr = 1e-3

    @property
    def scale(self) -> float:
        return 1.0 if self.cfg.alpha is None else self.cfg.alpha / self.cfg.rank

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return SpecAdaptLinear(linear, self.cfg.rank, self.scale)

    def decay_strengths(self, module: SpecAdaptLinear) -> torch.Tensor:
        """lambda_i = lambda * f(sigma_i), (r,)."""
        f = self.cfg.decay_fn if callable(self.cfg.decay_fn) else DECAY_FUNCTIONS[self.cfg.decay_fn]
        return self.cfg.weight_decay * f(module.sigma.clamp_min(torch.finfo(module.sigma.dtype).tiny))

    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.cfg.grad_norm == "none":
            return
        for p in self.trainable_parameters():
            if p.grad is None:
                continue
            g = p.grad
            norm = g.pow(2).mean().sqrt() if self.cfg.grad_norm == "rms" else g.norm()
            g.div_(norm + self.cfg.eps)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.cfg.weight_decay == 0:
            return
        for m in self.modules.values():
            factor = (1.0 - ctx.lr * self.decay_strengths(m)).clamp_min(0.0)  # (r,)
            m.spec_s.mul_(factor)

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            b = (m.spec_B.detach() * m.spec_s.detach()).float().cpu().contiguous()  # (out, r)
            lowrank[name] = LowRank(A=m.spec_A.detach().float().cpu().clone(), B=b, scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)

    def config_dict(self) -> dict[str, Any]:
        out = super().config_dict()
        if callable(self.cfg.decay_fn):
            out["decay_fn"] = getattr(self.cfg.decay_fn, "__name__", "callable")
        return out
