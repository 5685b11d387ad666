"""The correctness anchor in bf16 on the CPU: in one mixed batch of every delta kind served in bf16, each
request's logits are as close to its exact (fp32) reference as the same model with the adapter merged and rounded
to bf16 is (transformers in bf16: the rounding of the merged weights, and bf16 arithmetic)."""
import pytest
import torch

from adapters.delta import AdapterDeltas
from server.model.config import ModelConfig
from tests.helpers import every_kind, make_hf_model, reference_logits, reference_model, refs, run_capture, small_engine

# Ours may be off its fp32 reference by this many times what transformers' bf16 model with the merged weights is.
BF16_FACTOR = 3.0


@pytest.mark.parametrize("lora_dtype", ["auto", "bfloat16"])  # the LoRA factors in fp32 (exact) or rounded to bf16
def test_every_kind_in_one_mixed_batch_in_bf16(tmp_path, lora_dtype):
    path = make_hf_model(tmp_path / "m", "qwen2")
    cfg = ModelConfig.from_dir(path)
    adapters = every_kind(cfg)
    engine = small_engine(path, dtype="bf16", max_prefill_chunk=8, lora_dtype=lora_dtype)
    gen = torch.Generator().manual_seed(0)
    plan = [("base", None, 6), ("l4", "lora4", 13), ("l64", "lora64", 3), ("al", "alora", 19), ("so", "sorsa-2r", 9),
            ("pi", "pissa-2r", 4), ("si", "sift", 15), ("ia", "ia3", 8), ("pa", "para", 21),
            ("co", "lora+sift+ia3", 10), ("late", "lora4", 7)]
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}
    which = {rid: a for rid, a, _ in plan}
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=6, join_after={"late": 2})
    base_model = reference_model(path, AdapterDeltas(), 0)
    for rid, prompt in prompts.items():
        deltas = adapters[which[rid]] if which[rid] else AdapterDeltas()
        exact_model = reference_model(path, deltas, len(prompt))
        exact = reference_logits(exact_model, prompt, generated[rid])
        rounded = reference_logits(exact_model.to(torch.bfloat16), prompt, generated[rid])
        ours = torch.stack(logits[rid]).float()
        err, bound = (ours - exact).abs().max().item(), (rounded - exact).abs().max().item()
        assert err <= BF16_FACTOR * bound, f"{rid}: off its fp32 reference by {err:.3g}, bf16 merged by {bound:.3g}"
        if which[rid]:  # the bound is tight enough to catch an adapter not applied
            unadapted = (reference_logits(base_model, prompt, generated[rid]) - exact).abs().max().item()
            assert unadapted > 2 * BF16_FACTOR * bound, (rid, unadapted, bound)
