"""What every training method shares: finding the target projections, the hook points of the training loop, export.

A method is wrapped around a transformers Llama-family causal LM (Llama, Mistral, Qwen2: the projections live at
`model.model.layers[i].self_attn.{q,k,v,o}_proj` and `model.model.layers[i].mlp.{gate,up,down}_proj`). Wrapping
freezes every backbone parameter and replaces each target `nn.Linear` by a module that computes the frozen base
projection plus the method's own term; the backbone weights themselves are never changed, so `export()` can always
express the adapter relative to the ORIGINAL weights (the delta vocabulary of `adapters/delta.py`).

Each method also states the training recipe its authors use (`TrainingDefaults`: learning rate, schedule, warm-up,
weight decay, gradient clipping, with the source); the trainer takes it for every option left unset
(docs/method_defaults.md is the table).

The training loop (`adapters/train.py::fit`) calls, per optimizer step:

    prepare(loss_fn, batches)            once, before the optimizer exists (SIFT picks its indices here)
    loss = task loss (+ regularizer())   forward with **forward_kwargs(batch) (PARA passes the prompt mask)
    loss.backward(); clip_grad_norm_(trainable, max_grad_norm)
    before_optimizer_step(ctx)           SORSA adds its orthonormal gradient, SpecAdapt normalises gradients and
                                         applies its singular-guided decay
    optimizer.step()
    after_optimizer_step(ctx)            decoupled updates (SORSA decoupled)
    after_step(ctx)                      ALoRA's pruning / reallocation rounds

Adapter parameters are kept in fp32 and the adapter term is computed in fp32 whatever the backbone dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from adapters.delta import PROJECTIONS, AdapterDeltas, module_name

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class MethodConfig:
    """Fields shared by every method. A method's own fields (a subclass) become `--{method}-{field}` CLI flags."""

    rank: int = field(default=8, metadata={"help": "adapter rank r (per target module)"})
    alpha: float | None = field(
        default=None, metadata={"help": "scaling numerator: scale = alpha / r (method default when unset)", "type": float}
    )
    targets: tuple[str, ...] = field(default=PROJECTIONS, metadata={"help": "target projections, e.g. q_proj,v_proj"})

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"unknown target projection(s) {unknown}; choose from {list(PROJECTIONS)}")
        if not self.targets:
            raise ValueError("targets must not be empty")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


SCHEDULES = ("cosine", "cosine_squared", "linear", "constant")


@dataclass(frozen=True)
class TrainingDefaults:
    """A method's own training recipe (its authors'), used by the trainer for every option the caller leaves unset.

    schedule: after a linear warm-up over `warmup_ratio` of the steps, "cosine" / "linear" decay to 0, "constant",
    or "cosine_squared" (cosine decay squared, SpecAdapt's `LinearWarmupCosineDecay`). max_grad_norm 0: no clipping.
    """

    lr: float
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    source: str = ""  # where the numbers come from (docs/method_defaults.md has the full table)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class StepContext:
    """What the training loop tells a method's hooks. `step` counts finished optimizer steps (1-based in after_*)."""

    step: int
    lr: float  # current learning rate (after the schedule)
    peak_lr: float  # the configured learning rate
    max_steps: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    # One fixed batch of TRAINING data for decisions made during training (ALoRA's importance scores; never the
    # held-out split, which is what the reported eval loss is measured on), and its CE as the model is now, no grad
    score_batch: dict[str, torch.Tensor] | None = None
    score_loss: Callable[[], float] | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (`model.model.layers`) or of its bare backbone (`model.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layers at .model.layers (Llama-family models only)")
    return layers


def projection_parent(layer: nn.Module, proj: str) -> nn.Module:
    """The submodule holding `proj` in one decoder layer: self_attn for q/k/v/o, mlp for gate/up/down."""
    return layer.self_attn if proj in ATTENTION_PROJECTIONS else layer.mlp


def param_group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any]:
    """The optimizer's param group holding `p`."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise ValueError("parameter not in the optimizer")


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (and PEFT LoRA A's) init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), rows of `t` are [., fan_in]."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def top_svd(weight: torch.Tensor, rank: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a weight in fp32: U (out, r), S (r,), Vh (r, in). `niter`: randomized `svd_lowrank`."""
    w = weight.detach().float()
    if rank > min(w.shape):
        raise ValueError(f"rank {rank} exceeds min(weight shape) {min(w.shape)}")
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()
    u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
    return u.contiguous(), s.contiguous(), v.T.contiguous()


def refactor_lowrank(
    A: torch.Tensor, B: torch.Tensor, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor `B @ A` (B (out, R), A (R, in)) in fp64: QR of both factors, SVD of the R x R core.

        B A = (Qb Rb)(Qa Ra)^T = Qb (U S Vh) Qa^T  ->  B' = Qb U sqrt(S) (out, k),  A' = sqrt(S) Vh Qa^T (k, in)

    Both new factors are orthonormal columns / rows times sqrt(S), so their entries have the size of the product
    itself, not of the terms that cancel in it (SORSA's and PiSSA's rank-2r exports, [B, -B0] [A; A0]): a bf16
    copy of them keeps the product to bf16 relative precision. Returns (A', B') in fp32 with B' A' == B A to fp64
    rounding before the cast. k = R less the directions that are zero to fp64 rounding (s_i <= R eps64 ||B|| ||A||,
    at least one kept); with `energy` in (0, 1], further truncated to the fewest directions holding that fraction
    of the squared Frobenius norm.
    """
    a, b = A.double(), B.double()
    qa, ra = torch.linalg.qr(a.T)  # (in, R), (R, R)
    qb, rb = torch.linalg.qr(b)  # (out, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (R, R)
    scale = float(torch.linalg.matrix_norm(a, 2) * torch.linalg.matrix_norm(b, 2))  # bounds ||B A||
    tol = s.numel() * torch.finfo(torch.float64).eps * scale
    keep = max(1, int((s > tol).sum()))
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        cum = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-300)
        by_energy = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1
        keep = max(1, min(keep, by_energy))
    root = s[:keep].sqrt()  # (k,)
    b_new = (qb @ u[:, :keep]) * root  # (out, k)
    a_new = root[:, None] * (vh[:keep] @ qa.T)  # (k, in)
    return a_new.float().contiguous(), b_new.float().contiguous()


class Method:
    """Base class: wrap a model's target projections, train, export an `AdapterDeltas`.

    Subclasses set `name`, `Config`, `defaults` (their authors' recipe), and implement `make_module` and `export`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    defaults: ClassVar[TrainingDefaults] = TrainingDefaults(lr=2e-4)

    def __init__(self, model: nn.Module, cfg: MethodConfig):
        self.model = model
        self.cfg = cfg
        self.modules: dict[str, nn.Module] = {}  # "layers.{i}.{proj}" -> the module that replaced the Linear

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def wrap(cls, model: nn.Module, targets: Iterable[str] | None = None, cfg: MethodConfig | None = None) -> "Method":
        """Freeze `model`, replace its target projections in place, and return the method object driving them."""
        cfg = cfg if cfg is not None else cls.Config()
        if targets is not None:
            cfg = replace(cfg, targets=tuple(targets))
        for p in model.parameters():
            p.requires_grad_(False)
        method = cls(model, cfg)
        method.install()
        return method

    def install(self) -> None:
        """Replace every target Linear with `make_module(...)`; record it under its module name."""
        for i, layer in enumerate(decoder_layers(self.model)):
            for proj in self.cfg.targets:
                parent = projection_parent(layer, proj)
                linear = getattr(parent, proj)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"layers.{i}.{proj} is {type(linear).__name__}, expected nn.Linear (wrapped twice?)")
                module = self.make_module(i, proj, linear)
                setattr(parent, proj, module)
                self.modules[module_name(i, proj)] = module

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    # -- training-loop hooks ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with decoupled regularisers of their own override this."""
        return [{"params": self.trainable_parameters(), "weight_decay": weight_decay}]

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra keyword arguments for `model(...)` (they reach every decoder layer's forward)."""
        return {}

    def prepare(self, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], batches: list[dict]) -> None:
        """Run before the optimizer is built, with the first `num_prepare_batches()` micro-batches (no update)."""

    def num_prepare_batches(self) -> int:
        return 0

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the task loss before backward (None: nothing)."""
        return None

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """After backward and gradient clipping, before `optimizer.step()`."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Right after `optimizer.step()` (decoupled updates)."""

    def after_step(self, ctx: StepContext) -> None:
        """After the step is complete (schedule, logging); may change the set of trainable ranks."""

    # -- result -------------------------------------------------------------------------------------------------
    def export(self) -> AdapterDeltas:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-friendly, for the artifact's `trainer` record."""
        out = {}
        for f in fields(self.cfg):
            v = getattr(self.cfg, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (v if _is_json_scalar(v) else repr(v))
        return out


def _is_json_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def method_fields(config_cls: type[MethodConfig]) -> list:
    """The dataclass fields a method adds on top of `MethodConfig` (its own CLI flags)."""
    common = {f.name for f in fields(MethodConfig)}
    return [f for f in fields(config_cls) if f.name not in common]


__all__ = [
    "SCHEDULES",
    "Method",
    "MethodConfig",
    "StepContext",
    "TrainingDefaults",
    "decoder_layers",
    "projection_parent",
    "kaiming_uniform_",
    "param_group_of",
    "top_svd",
    "refactor_lowrank",
    "method_fields",
]
