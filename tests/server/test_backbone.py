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


def test_sliding_window_frees_blocks_behind_the_window_and_still_matches_transformers(tmp_path):
    """Mistral with a window of 8 and KV blocks of 4: a request keeps at most the blocks its window spans (plus the
    ones being filled), the freed blocks go back to the pool, and the logits stay equal to transformers'."""
    path = make_hf_model(tmp_path / "m", "mistral", sliding_window=8)
    engine = small_engine(path, max_prefill_chunk=8)  # block_size 4; prompts are chunked
    assert engine.scheduler.sliding_window == 8
    held: list[int] = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        held.extend(sum(b >= 0 for b in s.request.block_ids) for s in batch.seqs)
        return batch

    engine.scheduler.schedule = spy
    gen = torch.Generator().manual_seed(1)
    prompts = {"long": torch.randint(3, 300, (45,), generator=gen).tolist(),
               "short": torch.randint(3, 300, (6,), generator=gen).tolist()}
    generated, logits = run_capture(engine, prompts, {}, max_tokens=30)
    assert max(held) <= 8 // 4 + 3  # the window's blocks, a partial one at each end, and the chunk being written
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks  # everything came back
    hf = load_hf(path)
    for rid, prompt in prompts.items():
        ref = reference_logits(hf, prompt, generated[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid
