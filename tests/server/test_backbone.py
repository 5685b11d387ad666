"""Golden test: our flat-batch paged forward equals transformers' logits (prefill and decode, fp32)."""
import pytest
import torch

from server.model.config import ModelConfig
from tests.helpers import load_hf, make_hf_model, reference_logits, run_capture, small_engine

ARCHS = {
    "llama": {},
    "llama3-rope-tied": dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": dict(sliding_window=4096),
    "mistral-window": dict(sliding_window=8),  # prompts and generations run far past the window
    "qwen2": {},
    "qwen2-window": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # layer 1 slides, 0 not
}
WINDOWS = {"mistral": [4096, 4096], "mistral-window": [8, 8], "qwen2-window": [0, 6]}  # per layer; 0 = full


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(tmp_path, name):
    arch = name.split("-")[0].replace("llama3", "llama")
    path = make_hf_model(tmp_path / name, arch, **ARCHS[name])
    cfg = ModelConfig.from_dir(path)
    assert [cfg.attention_window(i) for i in range(cfg.num_layers)] == WINDOWS.get(name, [0, 0])
    hf = load_hf(path)
    engine = small_engine(path)
    gen = torch.Generator().manual_seed(0)
    prompts = {f"r{i}": torch.randint(3, 300, (n,), generator=gen).tolist() for i, n in enumerate([5, 23, 1, 40])}
    generated, logits = run_capture(engine, prompts, {}, max_tokens=6, join_after={"r3": 2})
    for rid, prompt in prompts.items():
        assert len(generated[rid]) == 6
        ref = reference_logits(hf, prompt, generated[rid])
        ours = torch.stack(logits[rid])
        assert (ours - ref).abs().max().item() <= 1e-4, rid
