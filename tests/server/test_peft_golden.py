"""Golden test: a mixed batch of PEFT LoRA checkpoints (made here with peft) gives PEFT's logits and greedy tokens."""
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapters.artifact import load_adapter
from server.model.config import ModelConfig
from tests.helpers import load_hf, make_hf_model, refs, run_capture, small_engine

PEFT_ADAPTERS = {
    "p-r2-qv": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "p-r8-all": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False),
    "p-r16-rslora-mlp": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "down_proj"], init_lora_weights=False),
    "p-pattern": LoraConfig(r=4, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], rank_pattern={"o_proj": 12},
                            alpha_pattern={"up_proj": 32}, init_lora_weights=False),
}


def test_mixed_peft_batch_matches_peft(tmp_path):
    path = make_hf_model(tmp_path / "base", "llama")
    spec = ModelConfig.from_dir(path).spec()
    for i, (name, cfg) in enumerate(PEFT_ADAPTERS.items()):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(load_hf(path), cfg)
        with torch.no_grad():  # larger than PEFT's random init so the adapters visibly move the logits
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.mul_(4.0)
        peft_model.save_pretrained(tmp_path / name, safe_serialization=True)
    adapters = {name: load_adapter(tmp_path / name, spec=spec).deltas for name in PEFT_ADAPTERS}
    engine = small_engine(path)
    gen = torch.Generator().manual_seed(1)
    plan = [("x0", None, 9), ("x1", "p-r2-qv", 14), ("x2", "p-r8-all", 5), ("x3", "p-r16-rslora-mlp", 21),
            ("x4", "p-pattern", 11), ("x5", "p-r8-all", 17)]
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}
    which = {rid: a for rid, a, _ in plan}
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=8, join_after={"x5": 4})

    peft_model = PeftModel.from_pretrained(load_hf(path), tmp_path / "p-r2-qv", adapter_name="p-r2-qv")
    for name in list(PEFT_ADAPTERS)[1:]:
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    peft_model.eval()
    for rid, prompt in prompts.items():
        name = which[rid] or "__base__"
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[name],
                                      max_new_tokens=8, min_new_tokens=8, do_sample=False)
            full = peft_model(input_ids=out, adapter_names=[name]).logits[0]
        assert out[0, len(prompt):].tolist() == generated[rid], rid
        ref = full[len(prompt) - 1 : len(prompt) + 7]
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid
