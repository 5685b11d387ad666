"""SORSA: singular-value adaptation with an orthonormal regularizer (after `Gunale0926/SORSA`).

Init: U, S, Vh = svd(W) in fp32; trainable B = U_r (out, r), S = S_r (r,), A = Vh_r (r, in), all fp32; the
initial B0, S0, A0 are kept as buffers. s = 1, or alpha / r when alpha is given.

Trainer form (METHODS.md's recommended one): y = x W^T + s ((x A^T * S) B^T - (x A0^T * S0) B0^T) with the frozen
ORIGINAL W. It has the gradients of the authors' residual form W_r + s B diag(S) A, equals the base model exactly
at init, and the served adapter is exactly the trained one.

Orthonormal regularizer over the M adapted modules (Frobenius norms, NOT squared):
    L_orth = 1/(2M) * sum_m ( ||A_m A_m^T - I||_F + ||B_m^T B_m - I||_F )
Update (`update="authors"`, their trainer.py): the task gradient is clipped (the loop's max_grad_norm, 1.0 by
default), then the gradient of (gamma / lr_peak) * L_orth is added, then the AdamW step. `update="decoupled"`:
AdamW on the task gradient, then W <- W - gamma * grad L_orth (the orthonormal gradient taken before the step).

Served delta: s (B' diag(S') A' - B0 diag(S0) A0), the rank-2r product B A with B = [B' diag(S') | -B0 diag(S0)],
A = [A'; A0], built in fp64 and by default (`refactor`) re-factored there (`refactor_lowrank`: QR of both factors,
SVD of the 2r x 2r core, directions zero to fp64 rounding dropped) into a LowRank of rank <= 2r. The two halves
are each the size of W's principal part and cancel to a far smaller delta, below their own bf16 rounding: only the
re-factored pair, whose entries have the delta's size, survives bf16 serving (tests/adapters/test_fidelity.py).
`refactor=False` exports the raw concatenation (fp32-exact); `refactor_energy` also truncates by energy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, StepContext, TrainingDefaults, refactor_lowrank, top_svd


class SORSALinear(nn.Module):
    """y = base(x) + s ((x A^T * S) B^T - (x A0^T * S0) B0^T), adapter term in fp32."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, niter: int | None):
        super().__init__()
        u, s_vals, vh = top_svd(base.weight, rank, niter)  # (out, r), (r,), (r, in)
        self.base = base
        self.scale = scale
        self.sorsa_A = nn.Parameter(vh.clone())  # (r, in)
        self.sorsa_S = nn.Parameter(s_vals.clone())  # (r,)
        self.sorsa_B = nn.Parameter(u.clone())  # (out, r)
        self.register_buffer("A0", vh)
        self.register_buffer("S0", s_vals)
        self.register_buffer("B0", u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        h = F.linear(F.linear(xf, self.sorsa_A) * self.sorsa_S, self.sorsa_B)  # (..., out)
        h0 = F.linear(F.linear(xf, self.A0) * self.S0, self.B0)  # (..., out)
        return self.base(x) + (self.scale * (h - h0)).to(x.dtype)


def orthonormal_regularizer(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """1/(2M) sum (||A A^T - I||_F + ||B^T B - I||_F) over M (A (r, in), B (out, r)) pairs."""
    total = torch.zeros((), device=pairs[0][0].device)
    for a, b in pairs:
        r = a.shape[0]
        eye = torch.eye(r, device=a.device, dtype=a.dtype)
        total = total + torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)
    return total / (2 * len(pairs))


@dataclass
class SORSAConfig(MethodConfig):
    """SORSA. The authors' defaults at 7B: all seven targets, lr 3e-5, gamma 4e-4, rank 128, wd 0, cosine, 3% warm-up."""

    gamma: float = field(default=4e-4, metadata={"help": "orthonormal regularizer strength"})
    update: str = field(
        default="authors",
        metadata={"help": "authors: add (gamma/lr_peak) grad L_orth before AdamW; decoupled: W -= gamma grad L_orth"},
    )
    niter: int | None = field(default=None, metadata={"help": "svd_lowrank iterations (unset: exact SVD)", "type": int})
    refactor: bool = field(
        default=True,
        metadata={"help": "re-factor the rank-2r export in fp64 (QR + SVD): exact when served in bf16; "
                          "off: the raw concatenation, which bf16 serving loses"},
    )
    refactor_energy: float | None = field(
        default=None,
        metadata={"help": "with refactor: keep only this fraction of the delta's energy", "type": float},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update not in ("authors", "decoupled"):
            raise ValueError(f"sorsa update must be 'authors' or 'decoupled', got {self.update!r}")
        if self.refactor_energy is not None and not self.refactor:
            raise ValueError("sorsa refactor_energy needs refactor")


class SORSA(Method):
    name = "sorsa"
    Config = SORSAConfig
    defaults = TrainingDefaults(
        lr=3e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
        source="Gunale0926/SORSA scripts/train_sorsa.sh + run.py (cosine, 3% warm-up), trainer.py (clip 1.0)",
    )

    def __init__(self, model: nn.Module, cfg: SORSAConfig):
        super().__init__(model, cfg)
        self._pending_orth: list[torch.Tensor] | None = None  # decoupled: grad L_orth taken before the step

    @property
    def scale(self) -> float:
        return 1.0 if self.cfg.alpha is None else self.cfg.alpha / self.cfg.rank

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return SORSALinear(linear, self.cfg.rank, self.scale, self.cfg.niter)

    def orth_loss(self) -> torch.Tensor:
        return orthonormal_regularizer([(m.sorsa_A, m.sorsa_B) for m in self.modules.values()])

    def _orth_params(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in (m.sorsa_A, m.sorsa_B)]

    def _orth_grads(self) -> list[torch.Tensor]:
        params = self._orth_params()
        with torch.enable_grad():
            return list(torch.autograd.grad(self.orth_loss(), params))

    def before_optimizer_step(self, ctx: StepContext) -> None:
        if self.cfg.gamma == 0:
            return
        grads = self._orth_grads()
        if self.cfg.update == "decoupled":
            self._pending_orth = grads
            return
        coeff = self.cfg.gamma / ctx.peak_lr
        for p, g in zip(self._orth_params(), grads):
            if p.grad is None:
                p.grad = coeff * g
            else:
                p.grad.add_(g, alpha=coeff)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self._pending_orth is None:
            return
        for p, g in zip(self._orth_params(), self._pending_orth):
            p.add_(g, alpha=-self.cfg.gamma)
        self._pending_orth = None

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            b_new = m.sorsa_B.detach().double() * m.sorsa_S.detach().double()  # (out, r)
            b_old = m.B0.double() * m.S0.double()  # (out, r)
            a = torch.cat([m.sorsa_A.detach().double(), m.A0.double()], 0)  # (2r, in)
            b = torch.cat([b_new, -b_old], 1)  # (out, 2r)
            if self.cfg.refactor:
                a, b = refactor_lowrank(a, b, self.cfg.refactor_energy)  # (k, in), (out, k), k <= 2r
            lowrank[name] = LowRank(A=a.float().cpu().contiguous(), B=b.float().cpu().contiguous(), scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)
