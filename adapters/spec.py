"""The backbone an adapter is checked against: its spec (the shape-defining fields of a HF config), the fingerprint
of that spec, and the shapes it gives every module, Scale vector and PARA generator."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from adapters.delta import PROJECTIONS, module_name
from adapters.errors import ArtifactError

ARCHITECTURES = ("llama", "mistral", "qwen2")
SPEC_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")


def backbone_spec(cfg: Any) -> dict:
    """The shape-defining fields of a HF config (a PretrainedConfig or a config.json dict)."""
    def get(key: str) -> Any:
        return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)

    arch = get("model_type")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"unsupported backbone model_type {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    spec: dict[str, Any] = {"architecture": arch}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if get(key) is None:
            raise ArtifactError(f"backbone config lacks {key!r}")
        spec[key] = int(get(key))
    spec["num_key_value_heads"] = int(get("num_key_value_heads") or spec["num_attention_heads"])
    head_dim = get("head_dim")
    if head_dim is None:
        if spec["hidden_size"] % spec["num_attention_heads"]:
            raise ArtifactError("backbone config: hidden_size is not a multiple of num_attention_heads")
        head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    spec["head_dim"] = int(head_dim)
    return spec


def fingerprint(spec: dict) -> str:
    """'sha256:' + hex digest of the canonical JSON (sorted keys, no spaces) of the spec's SPEC_KEYS."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ArtifactError(f"backbone spec lacks {missing}")
    canon = {k: (spec[k] if k == "architecture" else int(spec[k])) for k in SPEC_KEYS}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def num_modules(spec: dict) -> int:
    """How many projection modules an adapter may target: 7 per layer."""
    return len(PROJECTIONS) * spec["num_hidden_layers"]


def module_shapes(spec: dict) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every `layers.{i}.{proj}`."""
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    q_dim = spec["num_attention_heads"] * spec["head_dim"]
    kv_dim = spec["num_key_value_heads"] * spec["head_dim"]
    per_proj = {"q_proj": (q_dim, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
                "o_proj": (hidden, q_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                "down_proj": (hidden, inter)}
    return {module_name(i, p): per_proj[p] for i in range(spec["num_hidden_layers"]) for p in PROJECTIONS}


def scale_lengths(spec: dict) -> dict[str, int]:
    """Length of a Scale vector per target: q (heads*hd), k/v (kv_heads*hd), up/ffn (intermediate)."""
    kv_dim = spec["num_key_value_heads"] * spec["head_dim"]
    return {"q": spec["num_attention_heads"] * spec["head_dim"], "k": kv_dim, "v": kv_dim,
            "up": spec["intermediate_size"], "ffn": spec["intermediate_size"]}


def para_up_rows(spec: dict) -> int:
    lengths = scale_lengths(spec)
    return lengths["q"] + lengths["v"] + lengths["up"]  # [l_q; l_v; l_u]
