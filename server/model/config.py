"""The backbone's shape, read from a Hugging Face config.json (Llama, Mistral, Qwen2)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# HF architecture name -> our family name; every family runs the same forward (server/model/llama.py),
# differing only in the flags below. A new Llama-like backbone is one line here.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # Mistral (and Qwen2 with use_sliding_window): keys a query sees, its own included
    sliding_layers: tuple[int, ...] = ()  # the layers that use it (Mistral: all; Qwen2: from max_window_layers on)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    def attention_window(self, layer: int) -> int:
        """The sliding window of this layer's attention, 0 for full attention."""
        return self.sliding_window if self.sliding_window and layer in self.sliding_layers else 0

    def spec(self) -> dict:
        """The backbone spec the adapter fingerprint is computed from (adapters.artifact.fingerprint)."""
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(cfg.get("model_type", ""))
        if family is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')}; supported: {sorted(ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if (family == "mistral" or cfg.get("use_sliding_window")) else None
        num_layers = cfg["num_hidden_layers"]
        sliding_layers: tuple[int, ...] = ()
        if sliding:
            if cfg.get("layer_types"):  # transformers >= 4.53 writes which layers slide
                sliding_layers = tuple(i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention")
            elif family == "qwen2":
                sliding_layers = tuple(range(cfg.get("max_window_layers", num_layers), num_layers))
            else:
                sliding_layers = tuple(range(num_layers))
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling") or _rope_params_scaling(cfg.get("rope_parameters")),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding,
            sliding_layers=sliding_layers,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf(json.loads((Path(path) / "config.json").read_text()))


def _rope_params_scaling(params: dict | None) -> dict | None:
    """transformers 5 writes `rope_parameters` instead of `rope_scaling`; default rope means no scaling."""
    if not params or params.get("rope_type", "default") == "default":
        return None
    return params
