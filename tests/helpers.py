"""Shared test helpers: tiny random HF checkpoints, engines over them, and logit capture."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

if TYPE_CHECKING:  # imported where used, so that tests of adapters/ alone import nothing of the server
    from server.engine.engine import LLMEngine
    from server.engine.request import AdapterRef, SamplingParams

# The tiny random models' shape (tests/server, tests/adapters, tests/e2e); head_dim stated, as Qwen2Config does not
# derive it.
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # arch -> transformers class prefix


def small_config(arch: str = "llama", **overrides):
    """A tiny transformers config (llama | mistral | qwen2): SMALL with `overrides`."""
    import transformers

    prefix = ARCHITECTURES[arch]
    # a deep copy: transformers 5 writes rope_theta into the rope_scaling dict it is given
    cfg = getattr(transformers, f"{prefix}Config")(**copy.deepcopy({**SMALL, **overrides}))
    cfg.architectures = [f"{prefix}ForCausalLM"]
    return cfg


def small_model(arch: str = "llama", seed: int = 0, wide_init: bool = True, **overrides):
    """A tiny random transformers model of small_config(arch, **overrides), in eval mode, drawn after
    torch.manual_seed(seed): HF's init (its initializer_range), then with `wide_init` every weight drawn again, wider
    (matrices N(0, 0.1), vectors + N(0, 0.1)), so that logits differ visibly between tokens."""
    import transformers

    cfg = small_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg)
    if wide_init:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def char_llama_dir(path: Path, tokenizer) -> Path:
    """A local checkpoint the trainer can load: a tiny random Llama for `tokenizer` (the trainer tests' character
    tokenizer), as `save_pretrained` writes them."""
    model = small_model(
        seed=0, wide_init=False, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        initializer_range=0.1,  # the default 0.02 leaves the frozen head too weak to express a peaked distribution
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_hf_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save small_model(arch, seed, **overrides) with the byte-level tokenizer."""
    from server.model.tiny import byte_level_tokenizer

    small_model(arch, seed, **overrides).save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def small_engine(directory: Path, **opts) -> LLMEngine:
    from server.engine.builder import EngineOptions, build_llm_engine

    base = dict(device="cpu", dtype="fp32", max_num_seqs=16, block_size=4, num_kv_blocks=256,
                max_num_batched_tokens=64, max_prefill_chunk=16)
    return build_llm_engine(str(directory), EngineOptions(**{**base, **opts}))


def refs(which: dict[str, str | None], adapters: dict) -> dict[str, AdapterRef | None]:
    """Request id -> the AdapterRef of its adapter name in `adapters` (version 1), or None for the base model."""
    from server.engine.request import AdapterRef

    return {rid: AdapterRef(name, 1, adapters[name]) if name else None for rid, name in which.items()}


def run_capture(engine: LLMEngine, prompts: dict[str, list[int]], adapters: dict[str, AdapterRef | None], max_tokens: int,
                join_after: dict[str, int] | None = None, params: SamplingParams | None = None,
                ) -> tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]]:
    """Greedy-generate every prompt; requests in `join_after` are added after that many steps (mid-decode).
    -> (generated ids per request, the logits row that produced each generated token)."""
    from server.engine.request import Request, SamplingParams

    logits_log: dict[str, list[torch.Tensor]] = {rid: [] for rid in prompts}
    run = engine.runner.run  # every forward goes through it (scheduled or built ahead)

    def capture(step):
        logits = run(step)
        rows = [s.request.request_id for s in step.batch.seqs if s.needs_logits]
        for rid, row in zip(rows, logits):
            logits_log[rid].append(row.clone())
        return logits

    engine.runner.run = capture
    join_after = join_after or {}
    params = params or SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    pending = {rid: p for rid, p in prompts.items()}
    generated: dict[str, list[int]] = {rid: [] for rid in prompts}
    step = 0
    while pending or engine.has_work():
        for rid in [r for r in pending if join_after.get(r, 0) <= step]:
            engine.add_request(Request(rid, pending.pop(rid), params, adapter=adapters.get(rid)))
        for out in engine.step():
            generated[out.request_id] += out.token_ids
        step += 1
        assert step < 10_000
    engine.runner.run = run
    return generated, logits_log


def reference_logits(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """HF logits at the positions that predicted each generated token: (len(generated), V)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


def hf_module(hf_model, name: str):
    """'layers.3.q_proj' -> the transformers nn.Linear."""
    _, layer, proj = name.split(".")
    block = hf_model.model.layers[int(layer)]
    return getattr(block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, proj)


def merged_hf(directory: Path, deltas):
    """The transformers model with an adapter's LowRank/Sparse deltas merged into its weights (the reference)."""
    model = load_hf(directory)
    with torch.no_grad():
        for name, dw in deltas.weight_deltas().items():
            hf_module(model, name).weight += dw
    return model


def random_lowrank(spec_cfg, targets: dict[str, int], seed: int, layers=None, magnitude: float = 0.3):
    """AdapterDeltas with LowRank deltas of rank targets[proj] on every layer (or `layers`)."""
    from adapters.delta import AdapterDeltas, LowRank
    from server.model.adapter_layout import Layout

    gen = torch.Generator().manual_seed(seed)
    c = spec_cfg
    dims = Layout.of(c).dims  # projection -> (d_out, d_in)
    out = AdapterDeltas()
    for layer in (layers if layers is not None else range(c.num_layers)):
        for proj, r in targets.items():
            d_out, d_in = dims[proj]
            a = torch.randn(r, d_in, generator=gen) * magnitude / d_in**0.5
            b = torch.randn(d_out, r, generator=gen) * magnitude
            out.lowrank[f"layers.{layer}.{proj}"] = LowRank(a, b, scale=2.0 / r)
    return out


# every projection a delta can target
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_sparse(cfg, procs, density, seed):
    """AdapterDeltas with Sparse deltas of `density` on `procs` of every layer."""
    from adapters.delta import AdapterDeltas, Sparse
    from server.model.adapter_layout import Layout

    gen = torch.Generator().manual_seed(seed)
    dims = Layout.of(cfg).dims  # projection -> (d_out, d_in)
    out = AdapterDeltas()
    for layer in range(cfg.num_layers):
        for proj in procs:
            d_out, d_in = dims[proj]
            k = max(1, int(density * d_out * d_in))
            flat = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values
            out.sparse[f"layers.{layer}.{proj}"] = Sparse((flat // d_in).int(), (flat % d_in).int(),
                                                          torch.randn(k, generator=gen) * 0.3, (d_out, d_in))
    return out


def random_ia3(cfg, seed):
    """AdapterDeltas with IA3 Scale vectors (k, v, ffn) on every layer."""
    from adapters.delta import AdapterDeltas

    gen = torch.Generator().manual_seed(seed)
    out = AdapterDeltas()
    for layer in range(cfg.num_layers):
        out.scale[f"layers.{layer}.k"] = 1 + 0.5 * torch.randn(cfg.kv_size, generator=gen)
        out.scale[f"layers.{layer}.v"] = 1 + 0.5 * torch.randn(cfg.kv_size, generator=gen)
        out.scale[f"layers.{layer}.ffn"] = 1 + 0.5 * torch.randn(cfg.intermediate_size, generator=gen)
    return out


def random_para(cfg, seed, pool="attention", layers=None):
    """AdapterDeltas with a PARA generator on every layer (or `layers`)."""
    from adapters.delta import AdapterDeltas, ParaLayer

    gen = torch.Generator().manual_seed(seed)
    n_out = cfg.q_size + cfg.kv_size + cfg.intermediate_size
    out = AdapterDeltas()
    for layer in (layers if layers is not None else range(cfg.num_layers)):
        out.para[layer] = ParaLayer(pool, torch.randn(6, cfg.hidden_size, generator=gen) * 0.3,
                                    torch.randn(n_out, 6, generator=gen) * 0.3,
                                    torch.randn(cfg.hidden_size, generator=gen) if pool == "attention" else None, "silu")
    return out


def combine(*parts):
    """One AdapterDeltas holding every part's deltas."""
    from adapters.delta import AdapterDeltas

    out = AdapterDeltas()
    for p in parts:
        out.lowrank.update(p.lowrank)
        out.sparse.update(p.sparse)
        out.scale.update(p.scale)
        out.para.update(p.para)
    return out


def every_kind(cfg) -> dict:
    """Adapter name -> AdapterDeltas, one of every delta kind and mix: LowRank of many ranks (LoRA, ALoRA, SORSA/PiSSA
    at 2r), Sparse (SIFT), Scale (IA3), PARA and combinations."""
    return {
        "lora4": random_lowrank(cfg, {"q_proj": 4, "v_proj": 4}, seed=1),
        "lora64": random_lowrank(cfg, dict.fromkeys(ALL, 64), seed=2),
        "alora": combine(random_lowrank(cfg, {"q_proj": 3, "down_proj": 11}, seed=3, layers=[0]),
                         random_lowrank(cfg, {"k_proj": 7, "gate_proj": 1, "o_proj": 5}, seed=4, layers=[1])),
        "sorsa-2r": random_lowrank(cfg, dict.fromkeys(ALL, 16), seed=5),
        "pissa-2r": random_lowrank(cfg, {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}, seed=6),
        "sift": random_sparse(cfg, ["q_proj", "v_proj", "up_proj", "down_proj"], 0.05, seed=7),
        "ia3": random_ia3(cfg, seed=8),
        "para": random_para(cfg, seed=9),
        "para-mean-lora": combine(random_para(cfg, seed=10, pool="mean", layers=[1]),
                                  random_lowrank(cfg, {"o_proj": 2}, seed=11)),
        "lora+sift+ia3": combine(random_lowrank(cfg, {"q_proj": 6, "up_proj": 6}, seed=12),
                                 random_sparse(cfg, ["k_proj", "down_proj"], 0.03, seed=13), random_ia3(cfg, seed=14)),
    }


def tiny_config(directory: Path):
    """The ModelConfig of the served tiny checkpoint (server/model/tiny.py), written at `directory` if not there."""
    from server.model.config import ModelConfig
    from server.model.tiny import ensure_tiny_checkpoint

    return ModelConfig.from_dir(ensure_tiny_checkpoint(directory))


def lora_artifact(directory: Path, cfg, targets: dict[str, int], seed: int, magnitude: float = 0.3) -> Path:
    """random_lowrank(cfg, targets, seed, magnitude=magnitude) saved as a format-1 LoRA artifact for `cfg` (a
    ModelConfig) at `directory`."""
    from adapters.artifact import save_artifact

    deltas = random_lowrank(cfg, targets, seed=seed, magnitude=magnitude)
    return save_artifact(directory, deltas, method="lora", spec=cfg.spec())


def reference_model(directory: Path, deltas, prompt_len: int):
    """The transformers model with `deltas` applied the reference way: LowRank/Sparse merged into the weights,
    IA3 vectors and PARA vectors (pooled from the first `prompt_len` positions) multiplied into activations."""
    from adapters.delta import SCALE_PROJECTION, parse_scale_name
    from adapters.methods.para import para_vectors

    model = merged_hf(directory, deltas)
    cfg = model.config
    d_q = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    d_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)

    def scale_out(vec):
        return lambda mod, args, out: out * vec.to(out.dtype)

    def scale_in(vec):
        return lambda mod, args: (args[0] * vec.to(args[0].dtype),)

    for name, vec in deltas.scale.items():
        layer, target = parse_scale_name(name)
        mod = hf_module(model, f"layers.{layer}.{SCALE_PROJECTION[target]}")
        if target == "ffn":
            mod.register_forward_pre_hook(scale_in(vec))
        else:
            mod.register_forward_hook(scale_out(vec))
    for layer, gen in deltas.para.items():
        block = model.model.layers[layer]
        state = {}

        def pool_hook(mod, args, out, gen=gen, state=state):
            mask = torch.zeros(out.shape[:2], dtype=torch.bool)
            mask[:, :prompt_len] = True
            state["vec"] = para_vectors(gen, out, mask)  # (B, d_q + d_kv + d_ff)

        block.input_layernorm.register_forward_hook(pool_hook)
        for proj, lo, hi in (("q_proj", 0, d_q), ("v_proj", d_q, d_q + d_kv), ("up_proj", d_q + d_kv, None)):
            mod = hf_module(model, f"layers.{layer}.{proj}")
            mod.register_forward_hook(lambda m, a, out, lo=lo, hi=hi, state=state: out * state["vec"][:, None, lo:hi].to(out.dtype))
    return model


def tar_dir(directory: Path) -> bytes:
    """A .tar.gz (in memory) of the files of `directory`, at the archive's root: what an upload sends."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(directory.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


# ---- HTTP answers -------------------------------------------------------------------------------------------
def parse_sse(raw: str) -> list[Any]:
    """`data: {json}\\n\\n` events -> decoded JSON objects, with the final `[DONE]` kept as the string."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events and events[-1] == "[DONE]"
    return events[:-1]


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_chat_checkpoint(tiny_dir: Path, directory: Path, template: str = CHATML_TEMPLATE) -> Path:
    """A copy of the tiny checkpoint whose tokenizer has `template` as its chat template."""
    shutil.copytree(tiny_dir, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return directory
