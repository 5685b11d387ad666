"""PARA — a RECONSTRUCTION from the abstract and summaries only (see METHODS.md); the choices are configurable.

Each decoder layer i gets a small generator fed by H, the layer's normed input hidden states (the output of its
input_layernorm, fp32) at the PROMPT tokens only:

    p = Pool(H)                                  (d,)   see `pool_prompt`
    z = act(W_down p)                            (r,)   W_down (r, d), nn.Linear-style init
    [l_q; l_v; l_u] = 1 + W_up z                 (d_q + d_kv + d_ff,)   W_up zero-initialised: identity at start

applied at EVERY position (prompt and generated) of that request:
    q  = (x W_Q^T) * l_q      (before RoPE)       d_q  = num_heads * head_dim
    v  = (x W_V^T) * l_v                          d_kv = num_kv_heads * head_dim
    up = (x W_U^T) * l_u      (before act(gate) * up)   d_ff = intermediate_size

Pooling (`pool`): "attention" (default): a = softmax_t(H_t . q_pool / sqrt(d)) over the prompt tokens, p = sum_t
a_t H_t, with a learned q_pool (d,) initialised to zero (= mean pooling at start); "mean"; "last" (the last prompt
token). Layer i's H already reflects layers < i's PARA vectors, exactly as during a server prefill.

During training the model forward receives `para_prompt_mask` (B, T) bool (prompt tokens: the completion and the
padding excluded) as a keyword argument, which transformers passes to every decoder layer. The pooling and the
vectors of one exported `ParaLayer` are defined once, in adapters/delta.py (`para_pool`, `para_vectors`), which
the server's prefill calls too.
Served as ParaLayer per layer (vectors computed once per request at prefill, reused at every decode step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.delta import PARA_ACTIVATIONS, PARA_POOLS, AdapterDeltas, ParaLayer, para_pool, para_vectors
from adapters.methods.base import Method, MethodConfig, TrainingDefaults, decoder_layers

PROMPT_MASK_KWARG = "para_prompt_mask"
POOLS, ACTIVATIONS = PARA_POOLS, PARA_ACTIVATIONS


def check_prompt_mask(prompt_mask: torch.Tensor) -> None:
    """Refuse a sequence without a prompt token (a training batch's mistake; pooling needs one)."""
    if not bool(prompt_mask.to(torch.bool).any(dim=1).all()):
        raise ValueError("PARA: every sequence needs at least one prompt token")


def pool_prompt(h: torch.Tensor, prompt_mask: torch.Tensor, pool: str, pool_query: torch.Tensor | None) -> torch.Tensor:
    """adapters.delta.para_pool, checked."""
    check_prompt_mask(prompt_mask)
    return para_pool(h, prompt_mask, pool, pool_query)


def split_vectors(vec: torch.Tensor, d_q: int, d_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, d_q + d_kv + d_ff) -> l_q (B, d_q), l_v (B, d_kv), l_u (B, d_ff)."""
    return vec[..., :d_q], vec[..., d_q : d_q + d_kv], vec[..., d_q + d_kv :]


class ParaGenerator(nn.Module):
    """The trainable generator of one layer; `as_layer()` is its exported ParaLayer (same tensors)."""

    def __init__(self, d_model: int, rank: int, n_out: int, pool: str, act: str, device):
        super().__init__()
        self.pool, self.act = pool, act
        w_down = torch.empty(rank, d_model, device=device)
        nn.init.kaiming_uniform_(w_down, a=math.sqrt(5))
        self.w_down = nn.Parameter(w_down)  # (r, d)
        self.w_up = nn.Parameter(torch.zeros(n_out, rank, device=device))  # (n_out, r)
        self.pool_query = nn.Parameter(torch.zeros(d_model, device=device)) if pool == "attention" else None  # (d,)

    def as_layer(self) -> ParaLayer:
        return ParaLayer(pool=self.pool, w_down=self.w_down, w_up=self.w_up, pool_query=self.pool_query, act=self.act)

    def forward(self, h: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        check_prompt_mask(prompt_mask)
        return para_vectors(self.as_layer(), h, prompt_mask)


class ScaledOutput(nn.Module):
    """y = base(x) * vec[:, None, :] while a vector is set (only for the duration of one decoder-layer call)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.vec: torch.Tensor | None = None  # (B, d_out), set by ParaDecoderLayer.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.vec is None:
            raise RuntimeError("PARA projection called outside its decoder layer's forward")
        return (y.float() * self.vec.unsqueeze(-2)).to(y.dtype)


class ParaDecoderLayer(nn.Module):
    """Wraps one decoder layer: pools its normed input over the prompt, then runs it with q/v/up scaled."""

    def __init__(self, layer: nn.Module, generator: ParaGenerator, d_q: int, d_kv: int):
        super().__init__()
        self.layer = layer
        self.generator = generator
        self.d_q, self.d_kv = d_q, d_kv
        self.scaled = (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        prompt_mask = kwargs.pop(PROMPT_MASK_KWARG, None)
        if prompt_mask is None:
            raise ValueError(f"PARA forward needs model(..., {PROMPT_MASK_KWARG}=(B, T) bool mask of prompt tokens)")
        h = self.layer.input_layernorm(hidden_states)  # (B, T, d)
        vec = self.generator(h, prompt_mask)  # (B, n_out)
        for module, v in zip(self.scaled, split_vectors(vec, self.d_q, self.d_kv)):
            module.vec = v
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for module in self.scaled:
                module.vec = None


@dataclass
class PARAConfig(MethodConfig):
    """PARA (reconstruction). `rank` is the generator's bottleneck r (12 ~ 8.9M parameters at 7B); targets fixed."""

    rank: int = field(default=12, metadata={"help": "generator bottleneck r"})
    targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj", "up_proj"), metadata={"help": "fixed: q_proj,v_proj,up_proj"}
    )
    pool: str = field(default="attention", metadata={"help": f"prompt pooling: one of {POOLS}"})
    act: str = field(default="silu", metadata={"help": f"generator activation: one of {sorted(ACTIVATIONS)}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.targets) != {"q_proj", "v_proj", "up_proj"}:
            raise ValueError("PARA scales q_proj, v_proj and up_proj; targets cannot be changed")
        if self.pool not in POOLS:
            raise ValueError(f"para pool must be one of {POOLS}, got {self.pool!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"para act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")


class PARA(Method):
    name = "para"
    Config = PARAConfig
    # No published code or recipe was available (see METHODS.md): these are our choices, not the authors'.
    defaults = TrainingDefaults(lr=1e-3, source="none available: reconstruction, trainer's own recipe")

    def __init__(self, model: nn.Module, cfg: PARAConfig):
        super().__init__(model, cfg)
        self.generators: dict[int, ParaGenerator] = {}

    def install(self) -> None:
        layers = decoder_layers(self.model)
        for i in range(len(layers)):
            layer = layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            d_model = attn.q_proj.in_features
            d_q, d_kv, d_ff = attn.q_proj.out_features, attn.v_proj.out_features, mlp.up_proj.out_features
            for parent, proj in ((attn, "q_proj"), (attn, "v_proj"), (mlp, "up_proj")):
                scaled = ScaledOutput(getattr(parent, proj))
                setattr(parent, proj, scaled)
                self.modules[f"layers.{i}.{proj}"] = scaled
            device = attn.q_proj.base.weight.device
            gen = ParaGenerator(d_model, self.cfg.rank, d_q + d_kv + d_ff, self.cfg.pool, self.cfg.act, device)
            self.generators[i] = gen
            layers[i] = ParaDecoderLayer(layer, gen, d_q, d_kv)

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {PROMPT_MASK_KWARG: batch["prompt_mask"]}

    def export(self) -> AdapterDeltas:
        para = {}
        for i, gen in self.generators.items():
            q = None if gen.pool_query is None else gen.pool_query.detach().float().cpu().clone()
            para[i] = ParaLayer(
                pool=gen.pool,
                w_down=gen.w_down.detach().float().cpu().clone(),
                w_up=gen.w_up.detach().float().cpu().clone(),
                pool_query=q,
                act=gen.act,
            )
        return AdapterDeltas(para=para)
