"""SpecAdapt, ported from its authors' code: zhangkunzk/SpecAdapt_pytorch, `code/torchstocks/optim/peft/svda.py`
(`SAdamW` with its `WrapperNd`, the version with both of the paper's parts: shared core and singular-guided decay;
helpers in `peft/common.py`), run by `code/run.py` / `code/script/run_x.sh` through `torchstocks/common/trainer.py`.

Per target weight W (out, in), decomposed once when wrapped and then frozen (fp32):

    U, s, V = svd_lowrank(W, q=d),  d = min(out, in, max_rank)     U (out, d), s (d,), V (in, d); max_rank 1024
    a  (d, r)   zeros                                           trainable, this weight's own
    b  (r, d)   truncated normal, std sqrt(1/d), cut at +-2 std  trainable, this weight's own
    sh (r, r)   identity                                        trainable, ONE tensor shared by every wrapped weight
    delta W = scale * U a sh b V^T   (out, in), rank <= r, zero at init; scale 1 (alpha / r when alpha is given)

In training, dropout (0.1) is applied to the entries of delta W (`F.dropout`: one mask per forward, kept entries
scaled by 1 / 0.9), so the training forward materialises delta W; in eval the forward is low rank.

Each optimizer step, in `before_optimizer_step` (the order of `SAdamW.step` / `WrapperNd.pre_step`):
  1. gradient normalisation per rank component: `grad_norm="rms"`: g_a[:, j] /= sqrt(mean_i g_a[i, j]^2 + 1e-8)
     (a over dim 0), g_b[j, :] likewise (b over dim 1); "layer": subtract the mean, divide by std + 1e-8; "none".
     sh's gradient (summed over every weight that shares it) is left alone;
  2. singular-guided decay (directions weak in W decay more, the top one not at all), with the scheduled lr and
     the optimizer group's weight decay wd:
         a[i, :] *= 1 - lr * wd * extra_decay * (1 - s_i / s_1),     b[:, i] *= the same;
  3. then the AdamW step itself, whose decoupled weight decay wd applies to a, b AND sh (sh is a parameter of
     the same group in the authors' code, so it decays toward zero too).

The authors' recipe (`defaults`): wd 0.3, extra_decay 1.3, lr 3e-3 (their run.py and run_x.sh; SAdamW's own
default lr is 1e-3), a linear warm-up over 5% of the steps then cosine-squared decay to 0 (the trainer's
`LinearWarmupCosineDecay`, pow_annealing 2), betas (0.9, 0.999), no gradient clipping (the trainer's clipping,
if asked for, runs before step 1); targets all of a block's linear layers (here: all seven projections).

Where this port departs from the vision code, and why:
- Layout. `WrapperNd` first reshapes every weight to a near-square matrix (`FlatLikeSquare`: even a 2-D
  (768, 3072) weight becomes (1536, 1536)) and decomposes that. Here every weight keeps its (out, in) layout, so
  delta W is an exact rank-r product in the layer's own coordinates and is served as a LowRank of rank r
  (B = U a, A = sh b V^T, computed in fp64 at export), the kind every method shares; the reshaped version would
  be a full-rank dense delta in (out, in). For square weights (Llama's attention at hidden size) nothing changes.
- 1-D parameters. `SAdamW` also wraps every 1-D parameter of its target groups (biases, norm weights) as an
  additive delta with dropout and the plain (not singular) decay. None is trained here: Llama's projections have
  no bias, and the delta vocabulary has no bias or norm kind, so such a delta could not be served.
- The adapter is a module around the frozen Linear rather than an optimizer that rewrites the weight in place
  after each step; the forward, the gradients and the update are the same. The authors' AdamW also skips a step
  whose gradients hold inf/nan; this trainer does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, StepContext, TrainingDefaults, param_group_of

GRAD_NORMS = ("rms", "layer", "none")
NORM_EPS = 1e-8  # the authors' `rms_grad_norm_` / `layer_grad_norm_` eps


class SpecAdaptLinear(nn.Module):
    """y = base(x) + scale * x (U a sh b V^T)^T; dropout on the delta's entries in training."""

    def __init__(self, base: nn.Linear, rank: int, max_rank: int, scale: float, dropout: float, shared: nn.Parameter):
        super().__init__()
        w = base.weight.detach().float()  # (out, in)
        d = min(*w.shape, max_rank)
        u, s, v = torch.svd_lowrank(w, q=d)  # (out, d), (d,), (in, d); niter 2, as the authors
        self.base = base
        self.scale = scale
        self.dropout = dropout
        self.register_buffer("U", u.contiguous())  # (out, d)
        self.register_buffer("Vh", v.T.contiguous())  # (d, in)
        self.register_buffer("sigma", s.contiguous())  # (d,) singular values of the pretrained W, descending
        std = math.sqrt(1.0 / d)
        b = nn.init.trunc_normal_(torch.empty(rank, d, device=w.device), 0.0, std, -2 * std, 2 * std)
        self.spec_a = nn.Parameter(torch.zeros(d, rank, device=w.device))  # (d, r)
        self.spec_b = nn.Parameter(b)  # (r, d)
        self.spec_sh = shared  # (r, r), the same Parameter in every module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """delta W = scale * B A with B = U a (out, r), A = sh b V^T (r, in), fp32, differentiable."""
        return self.U @ self.spec_a, self.spec_sh @ self.spec_b @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        if self.training and self.dropout > 0:
            delta = F.dropout(b @ a, self.dropout)  # (out, in): dropout acts on the weight delta's entries
            h = F.linear(x.float(), delta)  # (..., out)
        else:
            h = F.linear(F.linear(x.float(), a), b)  # (..., out)
        return self.base(x) + (self.scale * h).to(x.dtype)


@dataclass
class SpecAdaptConfig(MethodConfig):
    """SpecAdapt (the authors' SAdamW). The decay strength wd is the optimizer's weight decay (default 0.3)."""

    max_rank: int = field(default=1024, metadata={"help": "d = min(out, in, max_rank) singular directions kept frozen"})
    extra_decay: float = field(default=1.3, metadata={"help": "singular-guided decay = lr * wd * this * (1 - s_i/s_1)"})
    grad_norm: str = field(default="rms", metadata={"help": f"gradient normalisation per rank component: {GRAD_NORMS}"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the entries of delta W (training only)"})
    shared_core: bool = field(default=True, metadata={"help": "the r x r core sh shared by every weight (else none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_norm not in GRAD_NORMS:
            raise ValueError(f"specadapt grad_norm must be one of {GRAD_NORMS}, got {self.grad_norm!r}")
        if self.max_rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("specadapt max_rank must be >= 1 and dropout in [0, 1)")


class SpecAdapt(Method):
    name = "specadapt"
    Config = SpecAdaptConfig
    defaults = TrainingDefaults(
        lr=3e-3, schedule="cosine_squared", warmup_ratio=0.05, weight_decay=0.3, max_grad_norm=0.0,
        source="zhangkunzk/SpecAdapt_pytorch code/run.py, script/run_x.sh, torchstocks/common/trainer.py, "
               "optim/scheduler.py, optim/peft/svda.py",
    )

    def __init__(self, model: nn.Module, cfg: SpecAdaptConfig):
        super().__init__(model, cfg)
        self.shared: nn.Parameter | None = None  # sh, created with the first module

    @property
    def scale(self) -> float:
        return 1.0 if self.cfg.alpha is None else self.cfg.alpha / self.cfg.rank

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        if self.shared is None:
            eye = torch.eye(self.cfg.rank, device=linear.weight.device)
            self.shared = nn.Parameter(eye, requires_grad=self.cfg.shared_core)  # frozen identity: no core
        return SpecAdaptLinear(linear, self.cfg.rank, self.cfg.max_rank, self.scale, self.cfg.dropout, self.shared)

    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        for m in self.modules.values():
            group = param_group_of(ctx.optimizer, m.spec_a)
            for p, dim in ((m.spec_a, 0), (m.spec_b, 1)):
                if p.grad is not None:
                    normalise_grad_(p.grad, dim, self.cfg.grad_norm)
            decay = group["lr"] * group["weight_decay"] * self.cfg.extra_decay * (1 - m.sigma / m.sigma.max())  # (d,)
            m.spec_a.mul_(1 - decay[:, None])
            m.spec_b.mul_(1 - decay[None, :])

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            with torch.no_grad():
                b = m.U.double() @ m.spec_a.double()  # (out, r)
                a = m.spec_sh.double() @ m.spec_b.double() @ m.Vh.double()  # (r, in)
            lowrank[name] = LowRank(A=a.float().cpu().contiguous(), B=b.float().cpu().contiguous(), scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)


def normalise_grad_(g: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """The authors' `rms_grad_norm_` / `layer_grad_norm_`, in place, statistics over `dim`."""
    if kind == "rms":
        return g.mul_(g.square().mean(dim, keepdim=True).add_(NORM_EPS).rsqrt_())
    if kind == "layer":
        mu = g.mean(dim, keepdim=True)
        sigma = (g - mu).square_().mean(dim, keepdim=True).sqrt_().add_(NORM_EPS)
        return g.sub_(mu).div_(sigma)
    return g
