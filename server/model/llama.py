"""Llama-family forward (Llama, Mistral, Qwen2) over a flat batch of tokens from many requests.

Every projection is `base matmul + the batch's adapter deltas` (AdapterPool.apply); attention reads and writes
the paged KV cache. Weights are fused the way the kernels batch them: W_qkv = [W_q; W_k; W_v], W_gu = [W_g; W_u].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention import paged_attention, write_kv
from server.model.adapter_pool import AdapterPool
from server.model.config import ModelConfig
from server.model.forward_batch import ForwardBatch, KVCache
from server.model.rope import RotaryEmbedding


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # (q + 2kv, H)
    qkv_bias: torch.Tensor | None  # (q + 2kv,)
    o: torch.Tensor  # (H, q)
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2I, H)
    down: torch.Tensor  # (H, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device, dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype

        def w(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")  # (V, H)
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in state else w("lm_head.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([w(attn + f"{n}_proj.bias") for n in "qkv"])
            self.layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=torch.cat([w(attn + f"{n}_proj.weight") for n in "qkv"]),
                qkv_bias=bias,
                o=w(attn + "o_proj.weight"),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([w(mlp + "gate_proj.weight"), w(mlp + "up_proj.weight")]),
                down=w(mlp + "down_proj.weight"),
            ))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device, dtype)
        self.sm_scale = cfg.head_dim ** -0.5
        self.windows = [cfg.attention_window(i) for i in range(cfg.num_layers)]  # 0 = full attention

    def forward(self, batch: ForwardBatch, kv: KVCache, adapters: AdapterPool | None) -> torch.Tensor:
        """-> (B, V) fp32 logits for the rows in batch.logits_indices."""
        cfg, kinds = self.cfg, batch.adapter_kinds
        use_adapters = adapters is not None and (kinds.lowrank or kinds.sparse)
        use_scale = adapters is not None and kinds.scale
        x = self.embed[batch.input_ids]  # (T, H)
        num_tokens = x.shape[0]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)  # (T, H)
            if batch.para_prefills:
                adapters.compute_para(i, h, batch)  # PARA vectors come from this layer's normed prompt states
            qkv = F.linear(h, lw.qkv, lw.qkv_bias)  # (T, q + 2kv)
            if use_adapters:
                adapters.apply(i, "qkv", qkv, h, batch)
            if use_scale:
                adapters.scale_activation(i, "qkv", qkv, batch)  # IA3 / PARA: after bias and deltas, before RoPE
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(num_tokens, cfg.num_heads, cfg.head_dim)  # (T, Hq, D)
            k = k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # (T, Hkv, D)
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            q, k = self.rope.apply(q, k, batch.positions)
            write_kv(k, v, kv.k[i], kv.v[i], batch.slot_mapping)
            attn = paged_attention(q, kv.k[i], kv.v[i], batch.attn, self.sm_scale, self.windows[i])
            attn = attn.view(num_tokens, cfg.q_size)
            o = F.linear(attn, lw.o)  # (T, H)
            if use_adapters:
                adapters.apply(i, "o", o, attn, batch)
            x = x + o
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gu = F.linear(h, lw.gate_up)  # (T, 2I)
            if use_adapters:
                adapters.apply(i, "gate_up", gu, h, batch)
            if use_scale:
                adapters.scale_activation(i, "gate_up", gu, batch)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up  # (T, I)
            if use_scale:
                adapters.scale_activation(i, "ffn", act, batch)  # IA3's feed-forward vector: the input of down_proj
            d = F.linear(act, lw.down)  # (T, H)
            if use_adapters:
                adapters.apply(i, "down", d, act, batch)
            x = x + d
        x = rms_norm(x[batch.logits_indices], self.norm, cfg.rms_norm_eps)  # (B, H)
        return F.linear(x, self.lm_head).float()  # (B, V)
