"""Decode steps replayed from captured static inputs (server/engine/cuda_graphs.py).

On a CPU the capture is `eager_capture` (the step re-runs on the captured static inputs and refills the captured
output), which checks what graphs add besides the graph itself: padding to the captured batch size, fixed shapes,
keys, inputs copied into static buffers, stale graphs dropped, the eager fallback. The GPU test captures real CUDA
graphs. Everything is compared with eager steps and with reference models."""
import logging

import pytest
import torch

from adapters.delta import AdapterDeltas
from server.engine.cuda_graphs import DecodeGraphs, batch_sizes, eager_capture
from server.engine.request import Request, SamplingParams
from server.model.config import ModelConfig
from tests.helpers import every_kind, make_hf_model, reference_logits, reference_model, refs, run_capture, small_engine


def test_batch_sizes_cover_every_batch_and_end_at_the_maximum():
    assert batch_sizes(1) == (1,)
    assert batch_sizes(16) == (1, 2, 4, 8, 16)
    assert batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert batch_sizes(64)[-4:] == (40, 48, 56, 64)


def graph_engine(path, capture=eager_capture, **opts):
    engine = small_engine(path, **opts)
    engine.runner.graphs = DecodeGraphs(engine.scheduler.max_num_seqs, "cpu", capture)
    return engine


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp("m") / "m", "qwen2")
    cfg = ModelConfig.from_dir(path)
    return path, every_kind(cfg)


def prompts_for(plan, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}


@pytest.mark.parametrize("lookahead", [False, True])  # on a GPU both are on: decode steps built during the forward
def test_graph_steps_equal_eager_steps_and_references_with_every_kind(model, lookahead):
    path, adapters = model
    # 7 requests (padded to 8) of every kind, two joining mid-decode (steps with prefill run eagerly), then
    # requests finishing at different lengths shrink the batch through 4, 2 and 1.
    plan = [("base", None, 6), ("l4", "lora4", 13), ("so", "sorsa-2r", 9), ("si", "sift", 15), ("ia", "ia3", 8),
            ("pa", "para", 11), ("co", "lora+sift+ia3", 10), ("late-pa", "para", 5), ("late-l4", "lora4", 3)]
    prompts, which = prompts_for(plan), {rid: a for rid, a, _ in plan}
    join = {"late-pa": 4, "late-l4": 7}
    eager_tokens, eager_logits = run_capture(small_engine(path), prompts, refs(which, adapters), 12, join)
    engine = graph_engine(path)
    engine.lookahead = lookahead
    tokens, logits = run_capture(engine, prompts, refs(which, adapters), 12, join)
    assert (engine.num_lookahead_steps > 0) is lookahead
    graphs = engine.runner.graphs
    assert graphs.enabled and graphs.num_replays >= 12 and graphs.num_captures <= len(graphs.graphs) + 4
    sizes = {k.batch_size for k in graphs.graphs}
    assert {8, 1} <= sizes and sizes <= set(batch_sizes(16))
    kinds = {k.kinds for k in graphs.graphs}
    assert any(k.lowrank and k.sparse and k.scale for k in kinds)  # the full mix was captured
    assert tokens == eager_tokens
    for rid, prompt in prompts.items():
        ours = torch.stack(logits[rid])
        assert (ours - torch.stack(eager_logits[rid])).abs().max().item() <= 1e-5, rid
        deltas = adapters[which[rid]] if which[rid] else AdapterDeltas()
        ref = reference_logits(reference_model(path, deltas, len(prompt)), prompt, tokens[rid])
        assert (ours - ref).abs().max().item() <= 1e-4, rid


def test_with_graphs_on_only_graph_steps_are_built_ahead(model):
    """A lookahead step that would not replay a graph is not built: its device copies could overlap a capture."""
    path, _ = model
    engine = graph_engine(path)
    engine.add_request(Request("p", list(range(3, 12)), SamplingParams(max_tokens=3, temperature=0)))
    prefill = engine.scheduler.schedule()
    assert engine.runner.graphs.batch_size_for(prefill) is None
    assert engine.runner.prepare(prefill, lookahead=True) is None
    assert engine.runner.prepare(prefill) is not None  # scheduled after the forward: built as usual


def test_a_replay_sees_the_new_batch_not_the_captured_one(model):
    """Same batch size and key, different requests, adapters and positions: the second run must not reuse the
    first run's inputs."""
    path, adapters = model
    engine = graph_engine(path)
    first = {"a": "lora4", "b": "sorsa-2r", "c": None}
    run_capture(engine, prompts_for([(r, a, 5) for r, a in first.items()], seed=1), refs(first, adapters), 4)
    (first_key,) = engine.runner.graphs.graphs  # one batch of 3, padded to 4
    second = {"x": "sorsa-2r", "y": None, "z": "lora4"}
    prompts = prompts_for([("x", None, 17), ("y", None, 4), ("z", None, 9)], seed=2)
    tokens, logits = run_capture(engine, prompts, refs(second, adapters), 6)
    graphs = engine.runner.graphs
    assert first_key in graphs.graphs and graphs.num_captures == len(graphs.graphs)  # replayed, not recaptured
    for rid, prompt in prompts.items():
        deltas = adapters[second[rid]] if second[rid] else AdapterDeltas()
        ref = reference_logits(reference_model(path, deltas, len(prompt)), prompt, tokens[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid


def test_a_higher_rank_adapter_replaces_the_graphs_of_the_lower_max_rank(model):
    path, adapters = model
    engine = graph_engine(path)
    which = {"a": "lora4", "b": "lora64"}
    prompts = prompts_for([("a", None, 7), ("b", None, 6)], seed=3)
    tokens, logits = run_capture(engine, prompts, refs(which, adapters), 8, join_after={"b": 4})
    graphs = engine.runner.graphs
    assert graphs.num_captures > len(graphs.graphs)  # the rank-4 graphs were dropped
    assert {k.max_rank for k in graphs.graphs} == {64}
    for rid, prompt in prompts.items():
        ref = reference_logits(reference_model(path, adapters[which[rid]], len(prompt)), prompt, tokens[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid


def test_graphs_captured_at_start_up_serve_base_and_lowrank_steps_without_new_captures(model):
    path, adapters = model
    engine = graph_engine(path)
    engine.runner.capture_decode_graphs()
    graphs = engine.runner.graphs
    assert graphs.num_captures == 2 * len(graphs.sizes)  # per size: no adapter, LowRank
    which = {"a": "lora4", "b": None, "c": "sorsa-2r", "d": "lora4", "e": None}
    prompts = prompts_for([(r, None, n) for r, n in zip(which, (5, 9, 3, 12, 7))], seed=5)
    replays = graphs.num_replays
    tokens, logits = run_capture(engine, prompts, refs(which, adapters), 7, join_after={"e": 3})
    assert graphs.num_captures == 2 * len(graphs.sizes) and graphs.num_replays - replays >= 5
    for rid, prompt in prompts.items():
        deltas = adapters[which[rid]] if which[rid] else AdapterDeltas()
        ref = reference_logits(reference_model(path, deltas, len(prompt)), prompt, tokens[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid


def test_a_failed_capture_turns_graphs_off_and_the_step_runs_eagerly(model, caplog):
    path, adapters = model

    def failing_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = graph_engine(path, capture=failing_capture)
    which = {"a": "lora4", "b": None}
    prompts = prompts_for([("a", None, 5), ("b", None, 8)], seed=4)
    with caplog.at_level(logging.WARNING):
        tokens, logits = run_capture(engine, prompts, refs(which, adapters), 5)
    assert not engine.runner.graphs.enabled and engine.runner.graphs.num_replays == 0
    assert "decode steps run without graphs" in caplog.text
    eager_tokens, _ = run_capture(small_engine(path), prompts, refs(which, adapters), 5)
    assert tokens == eager_tokens


@pytest.mark.gpu
def test_cuda_graph_engine_equals_eager_engine_on_gpu(model):
    path, adapters = model
    plan = [("base", None, 6), ("l4", "lora4", 13), ("so", "sorsa-2r", 9), ("si", "sift", 15), ("ia", "ia3", 8),
            ("pa", "para", 11), ("co", "lora+sift+ia3", 10), ("l64", "lora64", 5)]
    prompts, which = prompts_for(plan), {rid: a for rid, a, _ in plan}
    opts = dict(device="cuda", dtype="fp32")
    plain = small_engine(path, cuda_graphs=False, **opts)
    plain.overlap_text = plain.lookahead = False  # the reference: every step scheduled, run, then postprocessed
    eager_tokens, eager_logits = run_capture(plain, prompts, refs(which, adapters), 12, {"l64": 3})
    engine = small_engine(path, **opts)
    assert engine.runner.graphs is not None and engine.overlap_text and engine.lookahead  # a GPU's defaults
    tokens, logits = run_capture(engine, prompts, refs(which, adapters), 12, {"l64": 3})
    assert engine.runner.graphs.enabled and engine.runner.graphs.num_replays > 0
    assert engine.num_lookahead_steps > 0
    assert tokens == eager_tokens
    for rid in prompts:
        diff = (torch.stack(logits[rid]) - torch.stack(eager_logits[rid])).abs().max().item()
        assert diff <= 1e-4, rid
