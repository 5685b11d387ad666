"""IA3: static learned vectors (init 1) scaling k, v and the FFN intermediate (PEFT IA3's default targets).

k = (x W_K^T) * l_k,  v = (x W_V^T) * l_v,  down = (act(gate) * up * l_ffn) W_D^T  (the input of down_proj).
q_proj / up_proj may also be targeted (output scaling). Served as Scale vectors under `layers.{i}.{k|v|ffn|q|up}`.

Defaults are T-Few's (r-three/t-few: configs/ia3.json and src/utils/Config.py): lr 3e-3, linear decay after a
6% warm-up, weight decay 0, gradient clipping at 1.0. T-Few uses Adafactor; the trainer uses AdamW for every
method. Its unlikelihood and length-normalised losses score answer choices and do not apply to SFT.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.delta import AdapterDeltas
from adapters.methods.base import Method, MethodConfig, TrainingDefaults

# projection -> (Scale key, scales the projection's input?)
SCALE_POINTS = {
    "q_proj": ("q", False),
    "k_proj": ("k", False),
    "v_proj": ("v", False),
    "up_proj": ("up", False),
    "down_proj": ("ffn", True),
}


class IA3Linear(nn.Module):
    """y = base(x) * l (output scaling) or y = base(x * l) (input scaling, down_proj); l (d,) fp32, init 1."""

    def __init__(self, base: nn.Linear, scale_input: bool):
        super().__init__()
        self.base = base
        self.scale_input = scale_input
        dim = base.in_features if scale_input else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(dim, device=base.weight.device))  # (d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return self.base((x.float() * self.ia3_l).to(x.dtype))
        y = self.base(x)
        return (y.float() * self.ia3_l).to(y.dtype)


@dataclass
class IA3Config(MethodConfig):
    """IA3. `rank` and `alpha` are unused."""

    targets: tuple[str, ...] = field(
        default=("k_proj", "v_proj", "down_proj"),
        metadata={"help": "k_proj,v_proj,down_proj (ffn) by default; q_proj, up_proj allowed"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [t for t in self.targets if t not in SCALE_POINTS]
        if bad:
            raise ValueError(f"IA3 cannot scale {bad}; choose from {sorted(SCALE_POINTS)}")


class IA3(Method):
    name = "ia3"
    Config = IA3Config
    defaults = TrainingDefaults(
        lr=3e-3, schedule="linear", warmup_ratio=0.06, weight_decay=0.0, max_grad_norm=1.0,
        source="r-three/t-few configs/ia3.json, src/utils/Config.py (Adafactor there, AdamW here)",
    )

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return IA3Linear(linear, scale_input=SCALE_POINTS[proj][1])

    def export(self) -> AdapterDeltas:
        scale = {}
        for name, m in self.modules.items():
            prefix, proj = name.rsplit(".", 1)
            scale[f"{prefix}.{SCALE_POINTS[proj][0]}"] = m.ia3_l.detach().float().cpu().clone()
        return AdapterDeltas(scale=scale)
