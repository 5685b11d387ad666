"""A CPU step's layers in one call each, or two around the prefill rows' attention (kernels/cpu_layer.c via
server/model/fused_layers.py): the same logits and tokens as the op-by-op path, bit for bit, and the merged-weights
anchor's; really run where it applies (not a silent fallback), and not run where it does not."""
import pytest
import torch

from kernels import cpu_attention, cpu_elementwise, cpu_layer, cpu_matmul
from kernels.dispatch import use_triton
from server.model.config import ModelConfig
from tests.helpers import (
    make_hf_model, merged_hf, random_lowrank, random_sparse, reference_logits, refs, run_capture, small_engine,
)

pytestmark = pytest.mark.skipif(
    use_triton("cpu") or not (cpu_layer.available() and cpu_matmul.enabled() and cpu_attention.enabled()
                              and cpu_elementwise.enabled()),
    reason="needs our CPU kernels (x86-64 with AVX2 and FMA, a C compiler) and not the Triton pass")

FORMS = ["avx2", "avx512"] if cpu_matmul.VARIANT == "avx512" else ["avx2"]  # an AVX-512 CPU runs both


@pytest.fixture(params=FORMS, autouse=True)
def form(request, monkeypatch):
    """Both forms of our kernels' register blocks: the projections op by op and the layer are built in the same."""
    monkeypatch.setattr(cpu_matmul, "VARIANT", request.param)
    return request.param


ARCHS = {
    "llama": {},
    "qwen2-window": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # q|k|v bias; 2 windows
    "mistral-window": dict(sliding_window=8),  # generations run past the window
}


def _spy(monkeypatch) -> dict[str, int]:
    """Counts of the kernel's calls: whole layers (a step of decodes), fronts (a step with prefill rows), and layers
    or fronts that took the adapters' grids."""
    calls = {"layers": 0, "fronts": 0, "with_grid": 0}
    layer, front = cpu_layer.decode_layer, cpu_layer.layer_front

    def layer_spy(shapes, refs, step, grids):
        calls["layers"] += 1
        calls["with_grid"] += any(g is not None for g in grids)
        return layer(shapes, refs, step, grids)

    def front_spy(shapes, refs, step, grid):
        calls["fronts"] += 1
        calls["with_grid"] += grid is not None
        return front(shapes, refs, step, grid)

    monkeypatch.setattr(cpu_layer, "decode_layer", layer_spy)
    monkeypatch.setattr(cpu_layer, "layer_front", front_spy)
    return calls


def _run(path, which, adapters, prompts, layer_on: bool, monkeypatch):
    monkeypatch.setattr(cpu_layer, "_enabled", layer_on)
    engine = small_engine(path)
    return run_capture(engine, prompts, refs(which, adapters), max_tokens=12, join_after={"late": 4})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_layers_give_the_op_by_op_logits_bit_for_bit(tmp_path, monkeypatch, arch):
    path = make_hf_model(tmp_path / "m", arch.split("-")[0], **ARCHS[arch])
    cfg = ModelConfig.from_dir(path)
    adapters = {  # one rank class (16): the grid serves every projection
        "qv": random_lowrank(cfg, {"q_proj": 4, "v_proj": 8}, seed=1),
        "all": random_lowrank(cfg, dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], 16), seed=2),
        "mlp": random_lowrank(cfg, {"up_proj": 3, "down_proj": 5}, seed=3, layers=[1]),
    }
    which = {"base": None, "a": "qv", "b": "all", "c": "mlp", "late": "all"}
    gen = torch.Generator().manual_seed(0)
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist()
               for rid, n in zip(which, (5, 9, 3, 12, 7))}
    calls = _spy(monkeypatch)
    generated, logits = _run(path, which, adapters, prompts, True, monkeypatch)
    # it ran, with the adapters' grids, for the steps of decodes and those with prefills (the late request's)
    assert calls["with_grid"] > 0 and calls["layers"] > 0 and calls["fronts"] > 0
    assert calls["layers"] % cfg.num_layers == calls["fronts"] % cfg.num_layers == 0
    fused_calls = dict(calls)
    generated_ops, logits_ops = _run(path, which, adapters, prompts, False, monkeypatch)
    assert calls == fused_calls  # switched off: not called
    assert generated == generated_ops
    for rid in prompts:
        assert torch.equal(torch.stack(logits[rid]), torch.stack(logits_ops[rid])), rid
    models = {a: merged_hf(path, d) for a, d in adapters.items()}
    models[None] = merged_hf(path, type(adapters["qv"])())
    for rid, prompt in prompts.items():
        ref = reference_logits(models[which[rid]], prompt, generated[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid


def test_base_only_steps_fuse_and_other_kinds_keep_the_op_by_op_path(tmp_path, monkeypatch):
    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    gen = torch.Generator().manual_seed(1)
    prompts = {rid: torch.randint(3, 300, (6,), generator=gen).tolist() for rid in ("x", "y")}
    calls = _spy(monkeypatch)
    run_capture(small_engine(path), prompts, {"x": None, "y": None}, max_tokens=4)
    assert calls["layers"] > 0 and calls["fronts"] > 0 and calls["with_grid"] == 0  # no adapters: no grids
    calls.update(layers=0, fronts=0)
    adapters = {"s": random_sparse(cfg, ["q_proj", "down_proj"], 0.05, seed=4)}  # Sparse: the grid cannot serve it
    run_capture(small_engine(path), prompts, refs({"x": "s", "y": None}, adapters), max_tokens=4)
    assert calls["layers"] == calls["fronts"] == 0
