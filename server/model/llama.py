"""Llama-family forward (Llama, Mistral, Qwen2) over a flat batch of tokens from many requests.

Every projection is `base matmul + the batch's adapter deltas` (AdapterStep.apply); attention reads and writes
the paged KV cache. Weights are fused the way the kernels batch them: W_qkv = [W_q; W_k; W_v], W_gu = [W_g; W_u].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_elementwise
from kernels.attention import paged_attention, plan_cpu_attention, write_kv
from kernels.dispatch import use_triton
from kernels.linear import linear, prepack
from server.model.adapter_pool import AdapterPool
from server.model.adapter_step import AdapterStep
from server.model.config import ModelConfig
from server.model.forward_batch import ForwardBatch, KVCache
from server.model.fused_layers import FusedLayers
from server.model.rope import RotaryEmbedding


@dataclass
class LayerWeights:
    """One layer's weights; the matrices as kernels.linear.prepack made them (on a CPU oneDNN's layout, or our AVX2
    kernel's panels: kernels.cpu_matmul.PackedWeight, which the annotations below include)."""

    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # (q + 2kv, H)
    qkv_bias: torch.Tensor | None  # (q + 2kv,)
    o: torch.Tensor  # (H, q)
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2I, H)
    down: torch.Tensor  # (H, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # in fp32 the same math as below: our kernel's one pass on a CPU, else PyTorch's
        if x.device.type == "cpu" and x.stride(-1) == 1 and cpu_elementwise.enabled():
            return cpu_elementwise.rms_norm(x, weight, eps)
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)  # transformers' rounding: normalise in fp32, round, then scale


class LlamaModel:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device, dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype

        def w(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")  # (V, H)
        self.norm = w("model.norm.weight")
        head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in state else w("lm_head.weight")
        self.lm_head = prepack(head)  # (V, H); tied: on a CPU a second copy, in the layout prepack chose
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([w(attn + f"{n}_proj.bias") for n in "qkv"])
            self.layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=prepack(torch.cat([w(attn + f"{n}_proj.weight") for n in "qkv"])),
                qkv_bias=bias,
                o=prepack(w(attn + "o_proj.weight")),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=prepack(torch.cat([w(mlp + "gate_proj.weight"), w(mlp + "up_proj.weight")])),
                down=prepack(w(mlp + "down_proj.weight")),
            ))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device, dtype)
        self.sm_scale = cfg.head_dim ** -0.5
        self.windows = [cfg.attention_window(i) for i in range(cfg.num_layers)]  # 0 = full attention
        self.fused_layers = FusedLayers(self)

    def forward(self, batch: ForwardBatch, kv: KVCache, adapters: AdapterPool | None) -> torch.Tensor:
        """-> (B, V) fp32 logits for the rows in batch.logits_indices.

        What every layer shares is looked up once per step: the rotary tables of the positions, the CPU attention's
        gather indices and masks (CpuAttentionPlan; on a GPU the kernels read the metadata themselves) and the
        adapters' per-step rows (AdapterStep). On a CPU, a step whose adapters our grid kernel serves runs each layer as
        one or two calls of our C kernel (FusedLayers, server/model/fused_layers.py); the loop below is its reference."""
        cfg, kinds = self.cfg, batch.adapter_kinds
        step = AdapterStep(adapters, batch) if adapters is not None and (kinds.lowrank or kinds.sparse or kinds.scale) else None
        use_deltas, use_scale = step is not None and (kinds.lowrank or kinds.sparse), step is not None and kinds.scale
        plan = None
        if torch.device(self.device).type == "cpu" and not use_triton(self.device):
            plan = plan_cpu_attention(batch.attn, batch.slot_mapping, kv.k.shape[2], cfg.num_kv_heads, tuple(set(self.windows)))
        rope = self.rope.tables(batch.positions)  # (T, D) x 2
        ours = self.dtype == torch.float32 and torch.device(self.device).type == "cpu" and cpu_elementwise.enabled()
        q_size, kv_size, num_tokens = cfg.q_size, cfg.kv_size, batch.input_ids.shape[0]
        x = self.embed.index_select(0, batch.input_ids)  # (T, H)
        fused = self.fused_layers.run(x, batch, kv, plan, rope, step)  # on a CPU: a layer in one or two calls
        for i, lw in enumerate(() if fused else self.layers):
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)  # (T, H)
            if batch.para_prefills:
                step.compute_para(i, h)  # PARA vectors come from this layer's normed prompt states
            # (T, q + 2kv); each projection plus the step's deltas of its group (AdapterStep.linear)
            qkv = step.linear(i, "qkv", h, lw.qkv, lw.qkv_bias) if use_deltas else linear(h, lw.qkv, lw.qkv_bias)
            if use_scale:
                step.scale(i, "qkv", qkv)  # IA3 / PARA: after bias and deltas, before RoPE
            qk = qkv[:, : q_size + kv_size].view(num_tokens, -1, cfg.head_dim)  # the q and k heads, rotated in place
            (cpu_elementwise.rope_ if ours else cpu_elementwise.rope_ref_)(qk, *rope)
            q = qkv[:, :q_size].view(num_tokens, cfg.num_heads, cfg.head_dim)  # (T, Hq, D)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # (T, Hkv, D)
            v = qkv[:, q_size + kv_size :].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            write_kv(k, v, kv.k[i], kv.v[i], batch.slot_mapping, plan)
            attn = paged_attention(q, kv.k[i], kv.v[i], batch.attn, self.sm_scale, self.windows[i], plan)
            attn = attn.view(num_tokens, q_size)
            x = step.linear(i, "o", attn, lw.o, residual=x) if use_deltas else linear(attn, lw.o, residual=x)  # (T, H)
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gu = step.linear(i, "gate_up", h, lw.gate_up) if use_deltas else linear(h, lw.gate_up)  # (T, 2I)
            if use_scale:
                step.scale(i, "gate_up", gu)
            act = cpu_elementwise.silu_mul(gu) if ours else cpu_elementwise.silu_mul_ref(gu)  # (T, I): silu(gate) * up
            if use_scale:
                step.scale(i, "ffn", act)  # IA3's feed-forward vector: the input of down_proj
            x = step.linear(i, "down", act, lw.down, residual=x) if use_deltas else linear(act, lw.down, residual=x)
        x = rms_norm(x.index_select(0, batch.logits_indices), self.norm, cfg.rms_norm_eps)  # (B, H)
        return linear(x, self.lm_head).float()  # (B, V)
