"""A GGUF file (llama.cpp's format) converted once into a Hugging Face checkpoint directory, so that every later
load is the ordinary one (server/model/loader.py, transformers, PEFT).

    x.gguf --GGUFReader--> metadata + raw tensors --gguf_dequant--> fp32 numpy, HF names, q/k un-permuted
        --> <tmp>/model.safetensors, config.json, tokenizer files, MARKER --os.replace--> out_dir

The directory appears complete or not at all: everything is written into a temporary sibling, the marker last,
and the sibling is renamed into place. A directory whose marker matches the file (path, size, mtime, converter
version) is returned at once; anything else (no marker, another file, a leftover temporary) is removed and redone,
under a lock so that two processes never convert into the same place at once.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from server.model.gguf_dequant import dequantize

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the output changes: directories written by an older converter are redone
MARKER = "multiplex-gguf.json"
MAX_SHARD_BYTES = 2 << 30  # fp32 bytes per safetensors file; bounds the memory a conversion holds

# GGUF general.architecture -> HF architecture. A new Llama-like family is one line here (plus, if llama.cpp
# permutes its q/k, one entry of PERMUTED_QK).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp's converter reorders the rows of q and k of these families for its interleaved-pair rope (HF's
# rotate_half pairs dimension i with i + head_dim/2): LlamaModel.permute in convert_hf_to_gguf.py. Mistral files
# written by llama.cpp say "llama"; Qwen2 uses llama.cpp's NEOX rope, which is HF's, and is stored as is.
PERMUTED_QK = {"llama", "mistral"}

GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope frequency factors: folded into config.json's rope_scaling


def ensure_gguf_checkpoint(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert `gguf_path` into the HF checkpoint directory `out_dir` unless it is already there; return out_dir."""
    src, out = Path(gguf_path).resolve(), Path(out_dir)
    marker = _marker(src)
    if _is_complete(out, marker):
        log.debug("%s: already converted from %s", out, src)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if _is_complete(out, marker):  # another process converted it while this one waited
            return out
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _convert(src, tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))  # last: its presence means complete
            for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create them private
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _marker(src: Path) -> dict:
    st = src.stat()
    return {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "converter": CONVERTER_VERSION}


def _is_complete(out: Path, marker: dict) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


@contextmanager
def _lock(out: Path):
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _remove_leftovers(out: Path) -> None:
    """Under the lock: temporaries of conversions that died, and an incomplete or outdated `out`."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        log.info("removing %s, left by an interrupted conversion", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():
        log.warning("%s is incomplete or from another file or converter version: converting again", out)
        shutil.rmtree(out)


def _convert(src: Path, out: Path) -> None:
    from gguf import GGUFReader

    start = time.perf_counter()
    reader = GGUFReader(src)
    meta = _Metadata(reader)
    arch = meta["general.architecture"]
    if meta.get("split.count", 1) > 1:
        raise ValueError(f"{src.name} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{src.name}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(meta, arch, tensors)
    log.info("converting %s (%s, %d tensors, %.0f MB) into %s", src, arch, len(tensors), src.stat().st_size / 1e6, out)
    _write_weights(tensors, arch, config, out)
    _write_tokenizer(src, meta, config, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("converted %s in %.1fs: %.0f MB written", src.name, time.perf_counter() - start, size / 1e6)


class _Metadata:
    """GGUF key/value metadata read on demand (the vocabulary arrays are left to the tokenizer conversion)."""

    def __init__(self, reader) -> None:
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def __getitem__(self, key: str):
        if key not in self.fields:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return self.fields[key].contents()


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05), as HF configs write it."""
    return float(str(np.float32(x)))


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest-moving dimension first


def hf_config(meta: _Metadata, arch: str, tensors: dict) -> dict:
    """config.json for the HF class of `arch`, with every field ModelConfig.from_hf and transformers read."""
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    layers = meta[f"{arch}.block_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError(f"GGUF {arch}: a different number of kv heads per layer is not supported")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}: rope over part of each head ({meta[f'{arch}.rope.dimension_count']} of "
                         f"{head_dim}) is not supported")
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    eos_ids = list(dict.fromkeys(i for i in (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
                                 if i is not None))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _numpy_shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, head_dim, theta),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    if arch == "mistral":
        config["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
    return config


def _rope_scaling(meta: _Metadata, arch: str, tensors: dict, head_dim: int, theta: float) -> dict | None:
    """HF rope_scaling from the GGUF: Llama 3's factors come as a tensor, linear and YaRN as metadata."""
    if ROPE_FREQS in tensors:
        t = tensors[ROPE_FREQS]
        return _llama3_scaling(dequantize(t.data, t.tensor_type, _numpy_shape(t), t.name), head_dim, theta)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": meta[f"{arch}.rope.scaling.original_context_length"]}
    raise ValueError(f"GGUF {arch}: rope scaling {kind!r} is not supported (supported: none, linear, yarn, llama3)")


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Recover HF's llama3 rope_scaling from the per-frequency divisors llama.cpp stores (rope_freqs, (head_dim/2,)).

    The file keeps only the divisors; every Llama 3.x uses low/high frequency factors 1/4 and an original context
    of 8192, so those are assumed and checked: the divisors our rope computes from them must equal the file's."""
    from server.model.rope import inv_frequencies

    factor = _f32(factors.max())
    if factor == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    expected = (inv_frequencies(head_dim, theta, None) / inv_frequencies(head_dim, theta, scaling)).numpy()
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ValueError(f"rope_freqs does not match Llama 3's rope scaling with factor {factor}; not supported")
    return scaling


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp's tensor name -> HF's (blk.3.attn_q.bias -> model.layers.3.self_attn.q_proj.bias); None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m[2] in LAYER_TENSORS:
        return f"model.layers.{m[1]}.{LAYER_TENSORS[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m[1] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[m[1]]}.{m[2]}"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute on q or k rows ((num_heads * head_dim, ...) weight or bias): within
    each head, llama.cpp stores row 2i, 2i+1 for HF rows i, i + head_dim/2."""
    # (H, D/2, 2, ...) -> (H, 2, D/2, ...)
    return w.reshape(num_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(tensors: dict, arch: str, config: dict, out: Path) -> None:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    names = {name: hf_name(name) for name in tensors if name != ROPE_FREQS}
    unknown = sorted(name for name, hf in names.items() if hf is None)
    if unknown:
        raise ValueError(f"GGUF {arch}: tensors multiplex cannot map to {ARCHITECTURES[arch]}: {unknown[:8]}")
    missing = sorted(set(_expected_names(config)) - set(names.values()))
    if missing:
        raise ValueError(f"GGUF {arch}: the file lacks tensors the model needs: {missing[:8]}")
    shards = _plan_shards(tensors, list(names))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weight_map = {}
    with tqdm(total=len(names), desc="GGUF -> safetensors", unit="tensor", leave=False) as bar:
        for i, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {}
            for name in shard:
                t = tensors[name]
                w = dequantize(t.data, t.tensor_type, _numpy_shape(t), name)  # (out, in) / (n,)
                kind = name.split(".")[-2]
                if arch in PERMUTED_QK and kind in heads:
                    w = unpermute_qk(w, heads[kind])
                state[names[name]] = np.ascontiguousarray(w, dtype=np.float32)
                weight_map[names[name]] = file
                bar.update()
            save_file(state, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(4 * int(np.prod(_numpy_shape(tensors[n]))) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _expected_names(config: dict) -> list[str]:
    bias = config["attention_bias"] or config["model_type"] == "qwen2"
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [] if config["tie_word_embeddings"] else ["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        names += [f"model.layers.{i}.{leaf}.weight" for leaf in LAYER_TENSORS.values()]
        names += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv" if bias]
    return names


def _plan_shards(tensors: dict, names: list[str]) -> list[list[str]]:
    """Consecutive runs of tensors with at most MAX_SHARD_BYTES of fp32 each (a larger tensor alone)."""
    shards, size = [[]], 0
    for name in names:
        nbytes = 4 * int(np.prod(_numpy_shape(tensors[name])))
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_tokenizer(src: Path, meta: _Metadata, config: dict, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json, built by transformers' GGUF tokenizer conversion (offline)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    tok_config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("is_local", "local_files_only")}
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template  # also in chat_template.jinja; tokenizer_config.json for older readers
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in meta.fields:
            tok_config[key] = bool(meta.get(f"tokenizer.ggml.{key}"))
    path.write_text(json.dumps(tok_config, indent=2))
