"""The soak's adapters (random LoRAs, a few weight variants each) and their expected texts, computed by a separate
engine in this process before the server starts (see benchmarks/soak/__init__.py)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.soak.config import PROMPTS, RANKS, TARGET_SETS, Adapter, SoakConfig


# ---- adapters and their expected texts ----------------------------------------------------------------------

def make_adapters(model_dir: Path, work_dir: Path, cfg: SoakConfig) -> tuple[list[Adapter], dict]:
    """The adapters with their variants' archives, and the deltas of each (adapter id, variant)."""
    import torch

    from adapters.artifact import load_adapter, save_artifact
    from adapters.delta import AdapterDeltas, LowRank
    from clients.archive import pack_directory
    from server.model.adapter_layout import Layout
    from server.model.config import ModelConfig

    model_cfg = ModelConfig.from_dir(model_dir)
    dims = Layout.of(model_cfg).dims  # projection -> (d_out, d_in)
    adapters, deltas_of = [], {}
    for i in range(cfg.num_adapters):
        tenant = ("alpha" if i == cfg.num_adapters - 2 else "beta" if i == cfg.num_adapters - 1 else None)
        adapter = Adapter(f"soak-{i:02d}", RANKS[i % len(RANKS)], TARGET_SETS[i % len(TARGET_SETS)], tenant)
        for variant in range(cfg.num_variants):
            gen = torch.Generator().manual_seed(cfg.seed * 100_000 + i * 100 + variant)
            deltas = AdapterDeltas()
            for layer in range(model_cfg.num_layers):
                for proj in adapter.targets:
                    d_out, d_in = dims[proj]
                    a = torch.randn(adapter.rank, d_in, generator=gen) * 0.6 / d_in**0.5  # (r, d_in)
                    b = torch.randn(d_out, adapter.rank, generator=gen) * 0.6  # (d_out, r)
                    deltas.lowrank[f"layers.{layer}.{proj}"] = LowRank(a, b, scale=2.0 / adapter.rank)
            directory = save_artifact(work_dir / "adapters" / f"{adapter.adapter_id}-v{variant}", deltas,
                                      method="lora", spec=model_cfg.spec())
            adapter.archives.append(pack_directory(directory).read())
            deltas_of[adapter.adapter_id, variant] = load_adapter(directory, model_cfg.spec()).deltas
        adapters.append(adapter)
    return adapters, deltas_of


def expected_texts(model_dir: Path, deltas_of: dict, cfg: SoakConfig) -> dict[tuple[str | None, int], list[str]]:
    """(adapter id or None for the base model, variant) -> the greedy text of each prompt, each request run alone
    in a separate engine (the server's engine code, on the same checkpoint, cpu fp32)."""
    import torch

    # One intra-op thread: on this small model torch's parallel index_add_ (the CPU low-rank path) costs 100x more
    # with two threads than with one, and the server is not running yet.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _expected_texts(model_dir, deltas_of, cfg)
    finally:
        torch.set_num_threads(num_threads)


def _expected_texts(model_dir: Path, deltas_of: dict, cfg: SoakConfig) -> dict[tuple[str | None, int], list[str]]:
    from server.engine.builder import EngineOptions, build_llm_engine
    from server.engine.request import AdapterRef, Request, SamplingParams

    engine = build_llm_engine(str(model_dir), EngineOptions(device="cpu", dtype="float32", max_num_seqs=1,
                                                            max_adapter_slots=2, cuda_graphs=False))
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    prompt_ids = [engine.tokenizer.encode(prompt, add_special_tokens=True) for prompt in PROMPTS]
    cases = [(None, 0, None)] + [(adapter_id, variant, AdapterRef(adapter_id, variant + 1, deltas))
                                 for (adapter_id, variant), deltas in deltas_of.items()]
    texts = {}
    for adapter_id, variant, ref in cases:
        texts[adapter_id, variant] = []
        for index, ids in enumerate(prompt_ids):
            request_id = f"{adapter_id}-{variant}-{index}"
            engine.add_request(Request(request_id, list(ids), params, adapter=ref))
            pieces = []
            while engine.has_work():
                pieces += [out.text for out in engine.step() if out.request_id == request_id]
            texts[adapter_id, variant].append("".join(pieces))
    return texts
