"""The engine's lookahead: the next decode step scheduled and built while the forward runs (engine.py,
Scheduler.predict_decode_step / confirm, ModelRunner.prepare / PreparedStep.fill). It must never change a token."""
import threading

import pytest
import torch

from server.engine.request import Request, SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.model.config import ModelConfig
from tests.helpers import make_hf_model, random_lowrank, refs, run_capture, small_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("m"), "llama")


def _engine(model_dir, lookahead: bool, **opts):
    engine = small_engine(model_dir, **opts)
    assert engine.lookahead is False  # a CPU engine: off unless asked for (the builder turns it on for a GPU)
    engine.lookahead = lookahead
    return engine


def _prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"r{i}": torch.randint(3, 300, (5 + 4 * i,), generator=gen).tolist() for i in range(n)}


@pytest.mark.parametrize("num_kv_blocks", [256, 24])  # 24: tight, requests are preempted
def test_lookahead_gives_the_same_logits_with_adapters_arrivals_and_preemption(model_dir, num_kv_blocks):
    cfg = ModelConfig.from_dir(model_dir)
    adapters = {"x": random_lowrank(cfg, {"q_proj": 4, "down_proj": 2}, seed=1),
                "y": random_lowrank(cfg, {"v_proj": 8}, seed=2)}
    prompts = _prompts(6)
    which = refs({"r0": "x", "r1": None, "r2": "y", "r3": "x", "r4": None, "r5": "y"}, adapters)
    join_after = {"r3": 3, "r4": 7, "r5": 12}  # arrivals during decoding
    runs = {}
    for lookahead in (False, True):
        engine = _engine(model_dir, lookahead, num_kv_blocks=num_kv_blocks)
        runs[lookahead] = run_capture(engine, prompts, which, max_tokens=10, join_after=join_after)
        assert engine.scheduler.blocks.num_free == num_kv_blocks  # every block given back
        if lookahead:
            assert engine.num_lookahead_steps > 0
            if num_kv_blocks == 24:
                assert engine.scheduler.num_preemptions > 0
    (ids_off, logits_off), (ids_on, logits_on) = runs[False], runs[True]
    assert ids_on == ids_off
    for rid in prompts:
        assert len(logits_on[rid]) == 10
        assert torch.equal(torch.stack(logits_on[rid]), torch.stack(logits_off[rid]))


def _generate(engine, requests, abort_after: dict[str, int] | None = None):
    """Step until done; abort requests after that many steps. -> request id -> (token ids, finish reason)."""
    for r in requests:
        engine.add_request(r)
    tokens = {r.request_id: [] for r in requests}
    reasons = {}
    step = 0
    while engine.has_work():
        for rid in [rid for rid, n in (abort_after or {}).items() if n == step]:
            out = engine.abort(rid)
            reasons[rid] = out.finish_reason if out else reasons.get(rid)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
    return {rid: (tokens[rid], reasons[rid]) for rid in tokens}


def test_lookahead_is_dropped_when_a_request_ends_or_is_aborted(model_dir):
    """EOS, an abort and different max_tokens end requests at different steps (stop strings: test_engine.py), and
    seeded sampling draws from each request's generator: the same tokens and endings with the lookahead as without
    it."""
    full = _generate(_engine(model_dir, False), [Request("p", list(range(3, 14)), SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))])
    eos = full["p"][0][5]  # the 6th greedy token of "p", taken as its EOS below: it ends "p" early

    def requests():
        return [
            Request("p", list(range(3, 14)), SamplingParams(max_tokens=12, temperature=0)),
            Request("s", list(range(20, 29)), SamplingParams(max_tokens=9, temperature=0.8, seed=5, ignore_eos=True)),
            Request("t", list(range(40, 45)), SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=1,
                                                             ignore_eos=True)),
            Request("a", list(range(50, 61)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
        ]

    results = {}
    for lookahead in (False, True):
        engine = _engine(model_dir, lookahead)
        engine.eos_token_ids = {eos}
        results[lookahead] = _generate(engine, requests(), abort_after={"a": 4})
        assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks
        assert not engine.scheduler.running and not engine.requests
        if lookahead:
            assert engine.num_lookahead_steps > 0
    assert results[True] == results[False]
    assert results[True]["p"][1] == "stop" and len(results[True]["p"][0]) < 12  # ended by the EOS
    assert results[True]["a"][1] == "abort" and results[True]["s"][1] == "length"


def test_the_next_step_is_built_while_the_forward_runs(model_dir):
    """Each forward but the last waits until the next step's inputs are being built (prepare with lookahead): if
    the lookahead only followed the forward, every such forward would wait out its timeout. One request, 6 tokens:
    a prefill step and 5 decode steps, all 5 run from a lookahead."""
    engine = _engine(model_dir, True)
    built, timeouts = threading.Event(), []
    run, prepare = engine.runner.run, engine.runner.prepare

    def waiting_run(step):
        if engine.num_steps < 5 and not built.wait(timeout=5):
            timeouts.append(engine.num_steps)
        built.clear()
        return run(step)

    def watched_prepare(batch, lookahead=False):
        if lookahead:
            built.set()
        return prepare(batch, lookahead=lookahead)

    engine.runner.run, engine.runner.prepare = waiting_run, watched_prepare
    got = _generate(engine, [Request("a", list(range(3, 12)), SamplingParams(max_tokens=6, temperature=0,
                                                                             ignore_eos=True))])
    assert timeouts == [] and engine.num_steps == 6 and engine.num_lookahead_steps == 5
    assert len(got["a"][0]) == 6 and got["a"][1] == "length"
    assert engine.stats()["num_lookahead_steps"] == 5


def test_the_scheduler_predicts_only_what_schedule_would_make(model_dir):
    engine = _engine(model_dir, False, max_num_seqs=2)
    sched = engine.scheduler
    for i in range(3):
        engine.add_request(Request(f"r{i}", list(range(3, 8 + i)), SamplingParams(max_tokens=5, temperature=0,
                                                                                  ignore_eos=True)))
    batch = sched.schedule()  # r0, r1 prefilled; r2 waits: no room (max_num_seqs 2)
    assert [s.request.request_id for s in batch.seqs] == ["r0", "r1"] and len(sched.waiting) == 1
    predicted = sched.predict_decode_step(batch, engine.max_model_len)
    assert [(s.request.request_id, s.start, s.num_tokens) for s in predicted.seqs] == [("r0", 5, 1), ("r1", 6, 1)]
    assert not sched.confirm(predicted)  # the tokens of `batch` are not accepted yet
    for s in batch.seqs:
        s.request.num_computed_tokens = s.start + s.num_tokens
        s.request.output_ids.append(7)
    assert sched.confirm(predicted)  # no room for r2 either way: schedule() makes the same step
    sched.finish(batch.seqs[0].request, "stop")
    assert not sched.confirm(predicted)  # r0 ended: schedule() would admit r2
    mixed = sched.schedule()  # r1 decodes, r2's prompt is prefilled
    assert [s.request.request_id for s in mixed.seqs] == ["r1", "r2"]
    partial = ScheduledBatch(mixed.seqs[:1])  # not every running request: schedule() would make more
    assert sched.predict_decode_step(partial, engine.max_model_len) is None


def test_the_lookahead_setting_reaches_the_engine(model_dir, monkeypatch):
    """MULTIPLEX_LOOKAHEAD (`--lookahead`): unset, on a GPU only; set, as asked on any device."""
    from server.config import load_settings
    from server.engine.builder import build_engine_options

    for env, expected in ((None, False), ("true", True), ("false", False)):
        if env is None:
            monkeypatch.delenv("MULTIPLEX_LOOKAHEAD", raising=False)
        else:
            monkeypatch.setenv("MULTIPLEX_LOOKAHEAD", env)
        opts = build_engine_options(load_settings(device="cpu"))
        engine = small_engine(model_dir, lookahead=opts.lookahead)
        assert engine.lookahead is expected
