"""Blast radius of one (issue 12): a step that raises fails only the requests of the adapter version that causes it;
that version is quarantined, its slot freed, and every other request's tokens are what they would have been.

Faults come from the adapter pool's one fault-injection seam (`AdapterPool.fault_hook`, see `fault_in`) or from
adapters that are broken in earnest (a PARA generator with an unknown activation, deltas that fail to load)."""
import logging
from dataclasses import dataclass, field

import httpx
import pytest
import torch

from adapters.delta import AdapterDeltas, Sparse
from server.engine.cuda_graphs import DecodeGraphs, eager_capture
from server.engine.errors import AdapterQuarantinedError
from server.engine.request import AdapterRef, Request, SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.model.config import ModelConfig
from tests.helpers import make_hf_model, random_lowrank, small_engine
from tests.live_server import running_server
from tests.helpers import random_ia3, random_para


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp("m") / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    adapters = {
        "lora-a": random_lowrank(cfg, {"q_proj": 4, "v_proj": 4}, seed=1),
        "lora-b": random_lowrank(cfg, {"o_proj": 8, "down_proj": 8}, seed=2),
        "ia3": random_ia3(cfg, seed=3),
        "para": random_para(cfg, seed=4),
        "bad": random_lowrank(cfg, {"q_proj": 2, "up_proj": 2}, seed=5),
    }
    return path, cfg, adapters


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def drive(engine, requests: dict, join_after: dict[str, int] | None = None, before_step=None) -> dict[str, Outcome]:
    """requests: id -> (prompt ids, AdapterRef or None, SamplingParams); those in `join_after` are added after that
    many steps; `before_step(step)` runs before each step. -> each request's tokens and how it ended."""
    join_after = join_after or {}
    pending, outcomes = dict(requests), {rid: Outcome() for rid in requests}
    step = 0
    while pending or engine.has_work():
        if before_step is not None:
            before_step(step)
        for rid in [r for r in pending if join_after.get(r, 0) <= step]:
            prompt, ref, params = pending.pop(rid)
            engine.add_request(Request(rid, prompt, params, adapter=ref))
        for out in engine.step():
            outcome = outcomes[out.request_id]
            outcome.token_ids += out.token_ids
            if out.finished:
                outcome.finish_reason, outcome.error = out.finish_reason, out.error
        step += 1
        assert step < 500, "the engine does not finish"
    return outcomes


def fault_in(engine, key: str, layer: int = 1):
    """A fault hook: adapter version `key` ("id@version") raises when its deltas are applied in `layer` (layer 1 of
    2: layer 0 has already written the step's K/V when it raises)."""
    cache = engine.scheduler.adapters

    def hook(slot: int, at_layer: int) -> None:
        entry = cache.resident.get(key)
        if entry is not None and entry.slot == slot and at_layer == layer:
            raise RuntimeError(f"injected fault in {key}")

    return hook


def plan(adapters, sampling: str, names: dict[str, str | None], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (rid, name) in enumerate(names.items()):
        prompt = torch.randint(3, 300, (5 + 3 * i,), generator=gen).tolist()
        params = (SamplingParams(max_tokens=10, temperature=0, ignore_eos=True) if sampling == "greedy" else
                  SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True))
        out[rid] = (prompt, AdapterRef(name, 1, adapters[name]) if name else None, params)
    return out


def assert_back_to_start(engine, num_para_rows: int) -> None:
    """No request holds anything: every KV block free, no adapter pinned, every PARA row free."""
    blocks = engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks
    assert all(entry.pins == 0 for entry in engine.scheduler.adapters.resident.values())
    assert engine.scheduler.para_rows.num_free == num_para_rows
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


MIXED = {"base0": None, "a0": "lora-a", "bad0": "bad", "b0": "lora-b", "ia": "ia3", "pa": "para", "bad1": "bad",
         "base1": None, "a1": "lora-a"}


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_fault_mid_decode_fails_only_the_faulty_adapters_requests(model, sampling):
    path, _, adapters = model
    requests = plan(adapters, sampling, MIXED)
    innocent = {rid: r for rid, r in requests.items() if r[1] is None or r[1].adapter_id != "bad"}
    expected = drive(small_engine(path), innocent)

    engine = small_engine(path)
    num_para_rows = engine.scheduler.para_rows.num_free
    pool = engine.runner.adapter_pool

    def fault_from_step_4(step):  # every request has its prompt in and a few tokens out by then
        if step == 4:
            pool.fault_hook = fault_in(engine, "bad@1")

    got = drive(engine, requests, before_step=fault_from_step_4)
    for rid in ("bad0", "bad1"):
        assert got[rid].finish_reason == "error"
        assert "'bad' version 1" in got[rid].error and "quarantined" in got[rid].error
        assert 0 < len(got[rid].token_ids) < 10  # it failed mid-decode
    for rid in innocent:
        assert got[rid].finish_reason == "length" and got[rid].token_ids == expected[rid].token_ids, rid
    assert "bad@1" in engine.quarantined and engine.stats()["num_quarantined_adapters"] == 1
    assert "bad@1" not in engine.scheduler.adapters.resident  # its device slot is free
    assert_back_to_start(engine, num_para_rows)

    # The engine serves on; the quarantined version is refused at once, a new version of it is served.
    more = plan(adapters, sampling, {"late-base": None, "late-a": "lora-a"}, seed=1)
    assert all(o.finish_reason == "length" for o in drive(engine, more).values())
    with pytest.raises(AdapterQuarantinedError, match="'bad' version 1"):
        engine.add_request(Request("again", [5, 6, 7], SamplingParams(), adapter=AdapterRef("bad", 1, adapters["bad"])))
    v2 = {"v2": ([5, 6, 7], AdapterRef("bad", 2, adapters["bad"]), SamplingParams(max_tokens=4, temperature=0))}
    assert drive(engine, v2)["v2"].finish_reason == "length"
    assert_back_to_start(engine, num_para_rows)


def overflowing(cfg, kind: str) -> AdapterDeltas:
    """Adapters that pass every upload check and overflow only at run time: LoRA with lora_alpha 1e30 (scale 1e30 /
    r on q and up), IA3 vectors of 3e38 (a float32 value) on the MLP."""
    if kind == "lora":
        deltas = random_lowrank(cfg, {"q_proj": 2, "up_proj": 2}, seed=5)
        for lr in deltas.lowrank.values():
            lr.scale = 1e30 / 2
        return deltas
    deltas = random_ia3(cfg, seed=6)
    for key in deltas.scale:
        deltas.scale[key] = torch.full_like(deltas.scale[key], 3e38)
    return deltas


@pytest.mark.parametrize("kind,sampler", [("ia3", "ours"), ("ia3", "torch")])
def test_a_request_whose_adapter_overflows_fails_alone_and_nobody_else_notices(model, kind, sampler, monkeypatch):
    """Its logits are NaN or infinite: each of its requests ends with an error that says so (not with tokens drawn
    from noise), every other request of the mixed batch gets its own tokens, and the adapter is not quarantined
    (another tenant's prompt must not take a public adapter away): with our CPU sampler (which finds such rows on its
    own pass) and with the PyTorch ops (one reduction)."""
    from kernels import cpu_sampler
    from server.engine.errors import ADAPTER_OVERFLOW

    if sampler == "torch":
        monkeypatch.setattr(cpu_sampler, "enabled", lambda: False)
    path, cfg, adapters = model
    adapters = {**adapters, "bad": overflowing(cfg, kind)}
    requests = plan(adapters, "seeded", MIXED)
    innocent = {rid: r for rid, r in requests.items() if r[1] is None or r[1].adapter_id != "bad"}
    expected = drive(small_engine(path), innocent)
    engine = small_engine(path)
    failed, fail = [], engine.fail

    def recorded(rid, message, why="internal_error"):
        failed.append(why)
        return fail(rid, message, why)

    monkeypatch.setattr(engine, "fail", recorded)
    got = drive(engine, requests)
    for rid in ("bad0", "bad1"):
        assert got[rid].finish_reason == "error" and got[rid].token_ids == []
        assert "'bad' version 1 gave logits that are not finite" in got[rid].error, got[rid].error
    assert failed == [ADAPTER_OVERFLOW] * 2
    for rid in innocent:
        assert got[rid].finish_reason == "length" and got[rid].token_ids == expected[rid].token_ids, rid
    assert not engine.quarantined
    again = drive(engine, {"again": ([5, 6, 7], AdapterRef("bad", 1, adapters["bad"]), SamplingParams(max_tokens=3))})
    assert "not finite" in again["again"].error


def test_a_fault_in_prefill_fails_only_the_request_that_joins(model):
    path, _, adapters = model
    requests = plan(adapters, "greedy", {"base": None, "a": "lora-a", "pa": "para", "bad": "bad"})
    innocent = {rid: r for rid, r in requests.items() if rid != "bad"}
    expected = drive(small_engine(path), innocent)
    engine = small_engine(path)
    engine.runner.adapter_pool.fault_hook = fault_in(engine, "bad@1", layer=0)
    got = drive(engine, requests, join_after={"bad": 3})  # its prefill runs beside the others' decode steps
    assert got["bad"].finish_reason == "error" and got["bad"].token_ids == []
    assert "'bad' version 1" in got["bad"].error
    assert {rid: got[rid].token_ids for rid in innocent} == {rid: o.token_ids for rid, o in expected.items()}


def test_a_para_adapter_with_an_unknown_activation_is_quarantined_with_its_waiting_requests(model):
    """The probe of issue 12: a PARA manifest naming an unknown activation. Its generator raises during the prefill;
    its second request, still waiting for a sequence slot, gets the same error in the same step."""
    path, cfg, adapters = model
    broken = random_para(cfg, seed=6)
    for layer in broken.para.values():
        layer.act = "no-such-activation"
    adapters = {**adapters, "para-bogus": broken}
    requests = plan(adapters, "greedy", {"base": None, "a": "lora-a", "pa": "para", "bogus0": "para-bogus",
                                         "bogus1": "para-bogus"})
    innocent = {rid: r for rid, r in requests.items() if not rid.startswith("bogus")}
    expected = drive(small_engine(path), innocent)
    engine = small_engine(path, max_num_seqs=4)  # bogus1 waits
    num_para_rows = engine.scheduler.para_rows.num_free
    got = drive(engine, requests)
    assert got["bogus0"].finish_reason == got["bogus1"].finish_reason == "error"
    assert got["bogus0"].error == got["bogus1"].error and "'para-bogus' version 1" in got["bogus0"].error
    assert {rid: got[rid].token_ids for rid in innocent} == {rid: o.token_ids for rid, o in expected.items()}
    assert "para-bogus@1" in engine.quarantined
    assert_back_to_start(engine, num_para_rows)


def test_an_adapter_whose_load_raises_is_quarantined_and_its_arena_range_given_back(model):
    path, cfg, adapters = model
    d_out, d_in = cfg.hidden_size, cfg.intermediate_size
    corrupt = AdapterDeltas(sparse={"layers.0.down_proj": Sparse(torch.tensor([d_out + 3], dtype=torch.int32),
                                                                 torch.tensor([0], dtype=torch.int32),
                                                                 torch.tensor([1.0]), (d_out, d_in))})
    adapters = {**adapters, "corrupt": corrupt}
    requests = plan(adapters, "greedy", {"base": None, "corrupt": "corrupt", "a": "lora-a"})
    engine = small_engine(path)
    pool = engine.runner.adapter_pool
    free_before = (pool.allocator.num_free, pool.idx_allocator.num_free, len(pool.free_slots()))
    got = drive(engine, requests)
    assert got["corrupt"].finish_reason == "error" and "'corrupt' version 1" in got["corrupt"].error
    assert got["base"].finish_reason == got["a"].finish_reason == "length"
    assert "corrupt@1" in engine.quarantined
    engine.scheduler.adapters.discard(AdapterRef("lora-a", 1, adapters["lora-a"]))
    assert (pool.allocator.num_free, pool.idx_allocator.num_free, len(pool.free_slots())) == free_before


@pytest.mark.parametrize("culprit", ["base", "adapter"])
def test_a_failure_without_adapters_fails_the_step_once_and_the_engine_serves_on(model, caplog, culprit):
    """Not an adapter's fault: a token id outside the vocabulary breaks the base model's forward, in a base request
    (the base model's part fails alone) or in an adapter request (its part fails alone, but also as the base model:
    its adapter is not to blame). Every request of the step fails, the traceback is logged once, no adapter is
    quarantined, and the next requests are served."""
    path, _, adapters = model
    engine = small_engine(path)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    lora_a, lora_b = (AdapterRef(name, 1, adapters[name]) for name in ("lora-a", "lora-b"))
    requests = {"a": ([9, 10, 11], lora_a, params), "oov": ([5, 10**6], None if culprit == "base" else lora_b, params)}
    if culprit == "base":
        requests["base"] = ([5, 6, 7, 8], None, params)
    with caplog.at_level(logging.ERROR):
        got = drive(engine, requests, join_after={"oov": 2})
    assert all(o.finish_reason == "error" for o in got.values())
    assert caplog.text.count("failed even without adapters") == 1
    assert not engine.quarantined
    assert_back_to_start(engine, engine.scheduler.para_rows.num_free)
    again = drive(engine, {"next": ([5, 6, 7, 8], None, params), "next-b": ([9, 10], lora_b, params)})
    assert all(o.finish_reason == "length" for o in again.values())


def test_a_step_failing_in_the_graph_capture_warm_up_leaves_graphs_on(model):
    path, _, _ = model
    runner = small_engine(path).runner
    graphs = DecodeGraphs(4, "cpu", eager_capture)
    fb = runner.build(ScheduledBatch([]), pad_to=2, device="cpu")

    def faulty_forward(fb):
        raise RuntimeError("adapter fault")

    with pytest.raises(RuntimeError, match="adapter fault"):
        graphs.run(runner.graph_key(fb), fb, faulty_forward)
    assert graphs.enabled and not graphs.graphs
    assert graphs.run(runner.graph_key(fb), fb, runner.forward) is not None and graphs.num_captures == 1


def _sse_events(response: httpx.Response) -> list[dict]:
    import json

    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_over_http_a_faulty_adapters_stream_errors_while_another_tenants_stream_completes(adapters_dir, tmp_path):
    prompt, keys = "The quick brown fox", {"alpha": "key-a", "beta": "key-b"}

    def body(adapter_id, max_tokens, **extra):
        return {"prompt": prompt, "adapter_id": adapter_id, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, **extra}

    def headers(tenant):
        return {"Authorization": f"Bearer {keys[tenant]}"}

    with running_server(model="tiny", adapters=adapters_dir, data_dir=tmp_path / "data",
                        api_keys="key-a:alpha,key-b:beta") as server:
        client, engine = server.client, server.engine.engine
        expected = client.post("/v1/completions", json=body("lora-r4", 64), headers=headers("beta"))
        assert expected.status_code == 200
        expected_text = expected.json()["choices"][0]["text"]

        def hook(slot, layer):  # lora-r2 fails once its request has 3 tokens out and beta's request runs too
            for req in list(engine.requests.values()):
                if req.slot == slot and req.adapter is not None and req.adapter.adapter_id == "lora-r2" \
                        and len(req.output_ids) >= 3 and len(engine.requests) >= 2:
                    raise RuntimeError("injected fault in lora-r2")

        engine.runner.adapter_pool.fault_hook = hook
        # alpha's request is long enough (it would run 1000 steps) that beta's joins it before it could end
        with client.stream("POST", "/v1/completions", json=body("lora-r2", 1000, stream=True),
                           headers=headers("alpha")) as faulty, \
                client.stream("POST", "/v1/completions", json=body("lora-r4", 64, stream=True),
                              headers=headers("beta")) as healthy:
            faulty_events = _sse_events(faulty)
            healthy_events = _sse_events(healthy)
        assert "error" in faulty_events[-1] and not any("error" in e for e in faulty_events[:-1])
        assert faulty_events[-1]["error"]["type"] == "adapter_quarantined"  # the stream says whose fault it was
        assert "quarantined" in faulty_events[-1]["error"]["message"]
        assert not any("error" in e for e in healthy_events)
        assert "".join(e["choices"][0]["text"] for e in healthy_events if e.get("choices")) == expected_text

        refused = client.post("/v1/completions", json=body("lora-r2", 4), headers=headers("alpha"))
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["type"] == "adapter_quarantined" and "lora-r2" in error["message"]
        again = client.post("/v1/completions", json=body("lora-r4", 64), headers=headers("beta"))
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected_text
