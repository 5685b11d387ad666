"""SIFT: sparse increment fine-tuning (after `song-wx/SIFT`).

Per target matrix W (out, in): k = min(floor(rho * numel) + 1, numel) positions, the top-k of |dL/dW| summed over
the first `window` micro-batches (default 1), which make no update. The dense gradient exists only transiently:
a post-accumulate-grad hook on each weight takes it (top-k when the window closes, or adds it to a running sum
for window > 1) and frees it. Then only `delta (k,)` is trained (AdamW, weight decay 0, as the authors' code
effectively does); forward y = x W^T + x scatter(I, delta)^T, the sparse term in fp32.

Served as Sparse(rows, cols, values) per module: int32 indices, sorted by (row, col), unique.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, Sparse
from adapters.methods.base import Method, MethodConfig, TrainingDefaults


def num_selected(rho: float, numel: int) -> int:
    return min(int(rho * numel) + 1, numel)


class SparseLinear(nn.Module):
    """y = base(x) + x D^T with D = scatter(indices, delta) (out, in) in fp32; no term until indices are chosen."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        dev = base.weight.device
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long, device=dev))  # (k,) flat, sorted
        self.delta = nn.Parameter(torch.zeros(0, device=dev))  # (k,)

    def select(self, indices: torch.Tensor) -> None:
        self.indices = torch.sort(indices.to(self.base.weight.device).long()).values
        self.delta = nn.Parameter(torch.zeros(self.indices.numel(), device=self.base.weight.device))

    def dense_delta(self) -> torch.Tensor:  # (out, in) fp32
        flat = torch.zeros(self.base.weight.numel(), device=self.delta.device, dtype=torch.float32)
        return flat.scatter(0, self.indices, self.delta.float()).view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.indices.numel() == 0:
            return y
        return y + F.linear(x.float(), self.dense_delta()).to(x.dtype)


@dataclass
class SIFTConfig(MethodConfig):
    """SIFT. `rank` and `alpha` are unused. Authors' defaults: rho 0.05 (LLaMA instruction tuning), lr 2e-4."""

    rho: float = field(default=0.05, metadata={"help": "fraction of each matrix's entries trained"})
    window: int = field(default=1, metadata={"help": "micro-batches whose summed gradient chooses the indices"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"sift rho must be in [0, 1], got {self.rho}")
        if self.window < 1:
            raise ValueError(f"sift window must be >= 1, got {self.window}")


class SIFT(Method):
    name = "sift"
    Config = SIFTConfig
    # HF Trainer's defaults where the script is silent: linear schedule, clipping at 1.0. The script's weight decay
    # 0.01 acts on a sparse increment that the authors' hook folds into W and zeroes before every step: no effect.
    defaults = TrainingDefaults(
        lr=2e-4, schedule="linear", warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
        source="song-wx/SIFT exp/instruction_finetuning/sparse_llama_7b_alpaca.sh, train.py, sift/sift.py",
    )

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return SparseLinear(linear)

    def num_prepare_batches(self) -> int:
        return self.cfg.window

    def prepare(self, loss_fn: Callable[[dict], torch.Tensor], batches: list[dict]) -> None:
        """Choose every module's indices from the gradient of the first `window` micro-batches (no update)."""
        if not batches:
            raise ValueError("SIFT needs at least one micro-batch to choose its indices")
        batches = batches[: self.cfg.window]
        running: dict[str, torch.Tensor] = {}  # only for window > 1: summed dense gradient
        chosen: dict[str, torch.Tensor] = {}
        remaining = {"n": len(batches)}
        handles = []

        def make_hook(name: str):
            def hook(p: torch.Tensor) -> None:
                g = p.grad.float() if name not in running else running.pop(name).add_(p.grad.float())
                p.grad = None  # free the dense gradient now
                if remaining["n"] == 1:
                    k = num_selected(self.cfg.rho, g.numel())
                    chosen[name] = torch.topk(g.abs().flatten(), k, sorted=False).indices
                else:
                    running[name] = g

            return hook

        weights = {name: m.base.weight for name, m in self.modules.items()}
        try:
            for name, w in weights.items():
                w.requires_grad_(True)
                handles.append(w.register_post_accumulate_grad_hook(make_hook(name)))
            for batch in batches:
                loss_fn(batch).backward()
                remaining["n"] -= 1
        finally:
            for h in handles:
                h.remove()
            for w in weights.values():
                w.requires_grad_(False)
                w.grad = None
        missing = [n for n in weights if n not in chosen]
        if missing:
            raise RuntimeError(f"SIFT: no gradient reached {missing[:3]}... (are they used by the forward?)")
        for name, m in self.modules.items():
            m.select(chosen[name])

    def export(self) -> AdapterDeltas:
        sparse = {}
        for name, m in self.modules.items():
            out_f, in_f = m.base.weight.shape
            idx = m.indices.cpu()  # sorted flat indices == sorted by (row, col), unique
            sparse[name] = Sparse(
                rows=(idx // in_f).to(torch.int32),
                cols=(idx % in_f).to(torch.int32),
                values=m.delta.detach().float().cpu().clone(),
                shape=(int(out_f), int(in_f)),
            )
        return AdapterDeltas(sparse=sparse)
