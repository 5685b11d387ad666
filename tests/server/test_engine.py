"""Engine behaviour: preemption by recompute, abort, sampling parameters, stop strings, block accounting."""
import pytest
import torch

from server.engine.block_manager import BlockManager
from server.engine.detokenizer import make_decoder, update_text
from server.engine.request import Request, SamplingParams
from server.engine.sampler import make_generator, sample
from server.model.config import ModelConfig
from server.model.tiny import byte_level_tokenizer
from tests.helpers import make_hf_model, run_capture, small_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("m"), "llama")


def _prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"r{i}": torch.randint(3, 300, (10 + 3 * i,), generator=gen).tolist() for i in range(n)}


def test_preemption_recomputes_to_the_same_tokens(model_dir):
    prompts = _prompts(6)
    roomy = small_engine(model_dir)
    expected, _ = run_capture(roomy, prompts, {}, max_tokens=12)
    tight = small_engine(model_dir, num_kv_blocks=24)  # 96 token slots for ~6 x 35 tokens: must preempt
    got, _ = run_capture(tight, prompts, {}, max_tokens=12)
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.scheduler.blocks.num_free == 24  # everything given back


def test_abort_frees_blocks_and_stops_output(model_dir):
    engine = small_engine(model_dir)
    engine.add_request(Request("a", list(range(3, 30)), SamplingParams(max_tokens=50, temperature=0)))
    engine.add_request(Request("b", list(range(3, 20)), SamplingParams(max_tokens=5, temperature=0)))
    engine.step()
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    while engine.has_work():
        assert all(o.request_id == "b" for o in engine.step())
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks


def test_max_tokens_and_context_limit(model_dir):
    engine = small_engine(model_dir, max_model_len=40)
    engine.add_request(Request("a", list(range(3, 33)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 10


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    runs = [sample(logits, [p] * 3, [make_generator(p) for _ in range(3)]).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    k1 = SamplingParams(temperature=1.5, top_k=1)
    assert sample(logits, [k1] * 3, [make_generator(k1)] * 3).token_ids == logits.argmax(-1).tolist()
    p_small = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample(logits, [p_small] * 3, [make_generator(p_small)] * 3).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8),
                                                     (0.8, 4, 0.9)])
def test_sampled_tokens_follow_the_truncated_tempered_distribution(temperature, top_k, top_p):
    """20000 rows in one call, against the distribution computed by hand: softmax(logits / T), keep the top_k most
    likely, then the smallest prefix whose mass reaches top_p, renormalise."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0])
    probs = torch.softmax(logits / temperature, -1)  # already in descending order
    keep = torch.ones(6, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    keep &= probs.cumsum(-1) - probs < top_p
    expected = probs * keep / (probs * keep).sum()
    n = 20000
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    gen = make_generator(p)
    ids = sample(logits.expand(n, 6), [p] * n, [gen] * n).token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=6).float() / n
    assert (freq[~keep] == 0).all()
    assert (freq - expected).abs().max().item() < 0.015, (freq, expected)


def test_penalties_subtract_presence_and_frequency_of_generated_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0], [0.0, 3.0, 2.5, 1.0], [0.0, 3.0, 2.5, 1.0]])
    plain = SamplingParams(temperature=0)
    freq = SamplingParams(temperature=0, frequency_penalty=0.3)  # token 1 twice: 3.0 - 0.6 = 2.4 < 2.5
    pres = SamplingParams(temperature=0, presence_penalty=0.3)  # 3.0 - 0.3 = 2.7 > 2.5: still token 1
    outputs = [[1, 1], [1, 1], [1, 1]]
    res = sample(logits, [plain, freq, pres], [None] * 3, outputs)
    assert res.token_ids == [1, 2, 1]
    logp = SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=1)
    res = sample(logits[:1], [logp], [None], [[1]])
    assert res.token_ids == [2]
    assert res.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())  # the model's, unpenalized


def test_engine_greedy_with_penalties_picks_the_argmax_of_penalized_logits(model_dir):
    from tests.helpers import run_capture, small_engine

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=0.7, presence_penalty=0.4)
    prompts = {"a": [5, 9, 17, 3], "b": [40, 41, 42, 43, 44, 45]}
    tokens, logits = run_capture(small_engine(model_dir), prompts, {}, 16, params=params)
    for rid in prompts:
        counts = torch.zeros(logits[rid][0].shape[0])
        for step, row in enumerate(logits[rid]):
            expected = (row - 0.4 * (counts > 0) - 0.7 * counts).argmax().item()
            assert tokens[rid][step] == expected
            counts[tokens[rid][step]] += 1


def test_logprobs_are_log_softmax():
    logits = torch.randn(1, 20)
    p = SamplingParams(temperature=0, logprobs=3)
    res = sample(logits, [p], [None])
    ref = torch.log_softmax(logits[0], -1)
    assert res.logprobs[0] == pytest.approx(ref.max().item(), abs=1e-6)
    assert [t for t, _ in res.top[0]] == ref.topk(3).indices.tolist()


def test_stop_string_cuts_text_and_never_leaks_a_partial_stop():
    tok = byte_level_tokenizer()
    req = Request("s", [1], SamplingParams(stop=("END",)))
    sent = ""
    for ch in "abc EN":
        req.output_ids += tok.encode(ch, add_special_tokens=False)
        new, hit = update_text(req, make_decoder(tok), final=False)
        sent += new
        assert not hit
    assert "EN" not in sent  # held back: it may start a stop string
    req.output_ids += tok.encode("Dxyz", add_special_tokens=False)
    new, hit = update_text(req, make_decoder(tok), final=False)
    assert hit and sent + new == "abc "


def test_block_manager_free_list():
    bm = BlockManager(num_blocks=4, block_size=4)
    a: list[int] = []
    bm.grow(a, 9)
    assert len(a) == 3 and bm.num_free == 1
    assert not bm.can_grow(a, 17) and bm.can_grow(a, 16)
    bm.release(a)
    assert a == [] and bm.num_free == 4


def test_text_of_the_previous_step_is_made_while_the_forward_runs(model_dir):
    """Each forward after the first waits until the previous step's tokens have been decoded: if text work only
    followed the forward, every such step would wait out its timeout."""
    import threading

    engine = small_engine(model_dir)
    engine.overlap_text = True  # the builder turns it on for a GPU only
    decoded, timeouts = threading.Event(), []
    execute, decode = engine.runner.execute, engine._decode

    def waiting_execute(batch):
        if engine.num_steps > 0 and not decoded.wait(timeout=5):
            timeouts.append(engine.num_steps)
        decoded.clear()
        return execute(batch)

    class WatchedDecoder:
        def new_text(self, req, final):
            decoded.set()
            return decode.new_text(req, final)

    engine.runner.execute, engine._decode = waiting_execute, WatchedDecoder()
    prompt = list(range(3, 12))  # one prefill step that samples, then decode steps
    engine.add_request(Request("a", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    outs = []
    while engine.has_work():
        engine.step(outs.extend)
    assert timeouts == [] and engine.num_steps == 6
    assert sum(len(o.token_ids) for o in outs) == 6 and outs[-1].finished


@pytest.mark.parametrize("overlap,lookahead", [(True, False), (False, False), (True, True), (False, True)])
def test_a_stop_string_found_a_step_late_drops_the_extra_token_and_frees_everything(model_dir, overlap, lookahead):
    engine = small_engine(model_dir)
    engine.overlap_text, engine.lookahead = overlap, lookahead
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = list(range(3, 20))
    engine.add_request(Request("full", prompt, params))
    full = []
    while engine.has_work():
        full += engine.step()
    text = "".join(o.text for o in full)
    stop = text[4:6]
    assert stop and text.find(stop) == 4
    engine.add_request(Request("cut", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                             stop=(stop,))))
    engine.add_request(Request("other", list(range(5, 15)), params))
    outs = {"cut": [], "other": []}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    cut = outs["cut"]
    assert "".join(o.text for o in cut) == text[:4] and cut[-1].finish_reason == "stop"
    assert [t for o in cut for t in o.token_ids] == [t for o in full for t in o.token_ids][: cut[-1].num_output_tokens]
    assert sum(len(o.token_ids) for o in outs["other"]) == 12 and outs["other"][-1].finish_reason == "length"
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks
    assert not engine.requests and not engine.scheduler.running


def test_step_times_split_forward_and_host_time(model_dir):
    engine = small_engine(model_dir)
    assert engine.overlap_text is False  # a CPU engine: the text work follows the forward
    for i in range(4):
        engine.add_request(Request(f"r{i}", list(range(3, 12)), SamplingParams(max_tokens=5, temperature=0,
                                                                                ignore_eos=True)))
    while engine.has_work():
        engine.step()
    times = list(engine.step_times)
    assert len(times) == engine.num_steps and times[0].period_s is None
    assert all(t.forward_s > 0 and t.period_s >= t.forward_s for t in times[1:])
    assert engine.stats()["host_ms_per_step"] >= 0


def test_an_eos_is_counted_in_the_usage_but_not_in_the_tokens_or_text(model_dir):
    """As vLLM and OpenAI count it: the EOS was generated (a step computed it), so completion_tokens includes it;
    it is neither a token of the output nor text."""
    engine = small_engine(model_dir)
    engine.add_request(Request("a", list(range(3, 15)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    free_run = [t for o in run_steps(engine) for t in o.token_ids]
    engine = small_engine(model_dir)
    engine.eos_token_ids = {free_run[3]}  # the 4th greedy token, taken as EOS: it ends the request there
    engine.add_request(Request("a", list(range(3, 15)), SamplingParams(max_tokens=8, temperature=0)))
    outs = run_steps(engine)
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == free_run[: free_run.index(free_run[3])] and outs[-1].finish_reason == "stop"
    assert outs[-1].num_output_tokens == len(tokens) + 1


def run_steps(engine):
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


def test_tenants_are_admitted_in_turn_not_behind_one_tenants_backlog(model_dir):
    """4 places: a backlog of 6 requests of tenant a, then 2 of b, then 1 without a tenant. FIFO would admit a's
    first four; tenants in turn admit a, b, None, a (FIFO within each). As places free, the tenant with the fewest
    requests running goes first, the earlier request on a tie."""
    engine = small_engine(model_dir, max_num_seqs=4)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for rid, tenant in [(f"a{i}", "a") for i in range(6)] + [("b0", "b"), ("b1", "b"), ("n0", None)]:
        engine.add_request(Request(rid, list(range(3, 9)), params, tenant=tenant))

    def running():
        return [r.request_id for r in engine.scheduler.running]

    engine.step()
    assert running() == ["a0", "b0", "n0", "a1"]
    assert [r.request_id for r in engine.scheduler.waiting] == ["a2", "a3", "a4", "a5", "b1"]
    engine.abort("a0")
    engine.abort("a1")
    engine.step()  # a has none running, b one: a2, then a3 before b1 (a3 is a's second, b1 b's second; a3 earlier)
    assert running() == ["b0", "n0", "a2", "a3"]
    engine.abort("n0")
    engine.step()  # a has two running, b one: b1 before a4
    assert running() == ["b0", "a2", "a3", "b1"]


@pytest.mark.parametrize("arch,window", [("llama", None), ("mistral", 8)])
def test_a_decode_step_is_built_as_the_general_loop_builds_it(tmp_path, arch, window):
    """ModelRunner.build's decode path (one token a request, NumPy over the batch, block tables from rows kept
    across steps where no sliding window frees blocks) gives the inputs its general per-request loop gives (which a
    `pending` list selects), step after step: requests growing blocks, ending, arriving, preempted (few blocks),
    and with a sliding window, blocks freed in place."""
    from dataclasses import fields

    path = make_hf_model(tmp_path / "m", arch, **({} if window is None else {"sliding_window": window}))
    engine = small_engine(path, num_kv_blocks=40)
    assert (engine.runner._block_tables is None) == (window is not None)
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0)
    for i in range(5):
        engine.add_request(Request(f"r{i}", list(range(3, 8 + 5 * i)), params))
    compared = 0
    for step in range(400):
        if step in (10, 20):
            engine.add_request(Request(f"late{step}", list(range(3, 30)), params))
        batch = engine.scheduler.schedule()
        if batch.seqs and all(s.num_tokens == 1 for s in batch.seqs):
            fast, loop = engine.runner.build(batch), engine.runner.build(batch, pending=[])
            _assert_same_inputs(fast, loop, fields)
            compared += 1
        if batch.seqs:  # run the step it scheduled (as LLMEngine.step would)
            engine._accept(batch, engine._run(batch)[1])
            engine._emit_text(lambda outs: None)
        if not engine.has_work():
            break
    assert not engine.has_work() and compared > 20
    assert engine.scheduler.num_preemptions > 0 or window is not None  # a window frees blocks: nobody waits
    assert engine.scheduler.blocks.num_free == 40


def test_a_decode_step_with_every_adapter_kind_is_built_as_the_general_loop_builds_it(tmp_path):
    """The decode path keeps what depends on the requests' adapter slots (segments, IA3 rows, PARA rows) from one
    decode step to the next: it still equals the general loop's inputs while adapters of every kind come and go
    through 3 slots (loads and frees), requests of one-token prompts (a PARA prefill in a one-token step) arrive,
    and a small token budget splits prompts into one-token chunks that need no logits."""
    from dataclasses import fields

    from tests.helpers import every_kind, refs

    path = make_hf_model(tmp_path / "m", "qwen2")
    adapters = every_kind(ModelConfig.from_dir(path))
    engine = small_engine(path, max_num_seqs=6, max_adapter_slots=3, max_num_batched_tokens=5, max_prefill_chunk=4)
    names = [None, "lora4", None, "ia3", None, "para", None, "sift", None, "lora+sift+ia3", "para-mean-lora", None, "lora64"]
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)
    kept = compared = chunks = 0
    last = None
    for step in range(600):
        if step < 40 and step % 2 == 0:
            name = names[step // 2 % len(names)]
            size = 1 if step % 3 == 0 else int(torch.randint(2, 13, (), generator=gen))
            prompt = torch.randint(3, 300, (size,), generator=gen).tolist()
            engine.add_request(Request(f"r{step}", prompt, params, adapter=refs({"x": name}, adapters)["x"]))
        batch = engine.scheduler.schedule()
        if batch.seqs and all(s.num_tokens == 1 for s in batch.seqs):
            fast, loop = engine.runner.build(batch), engine.runner.build(batch, pending=[])
            _assert_same_inputs(fast, loop, fields)
            kept += last is not None and fast.segments is last.segments and fast.scale_rows is last.scale_rows
            last, compared = fast, compared + 1
            chunks += not all(s.needs_logits for s in batch.seqs)
        if batch.seqs:
            engine._accept(batch, engine._run(batch)[1])
            engine._emit_text(lambda outs: None)
        if not engine.has_work() and step >= 40:
            break
    assert not engine.has_work() and compared > 20 and kept > 5 and chunks > 3
    assert engine.runner.adapter_pool.changes > 6  # adapters were loaded and freed in between


@pytest.mark.parametrize("case", ["slot reloaded", "para rows swapped"])
def test_a_decode_step_keeps_nothing_of_a_request_that_took_its_place(tmp_path, case):
    """What the decode path keeps is keyed by the requests' adapter slots and PARA rows and the pool's changes: a
    request that ends at the step another one arrives (its prefill built by the general loop in between) may leave
    the next decode step the same slots but another adapter in one (one slot: lora then IA3) or the same slots with
    PARA rows in another order (P1 row 0, P2 row 1; P1 ends, P3 takes row 0)."""
    from dataclasses import fields

    from tests.helpers import every_kind, refs

    path = make_hf_model(tmp_path / "m", "qwen2")
    adapters = every_kind(ModelConfig.from_dir(path))
    engine = small_engine(path, max_num_seqs=3, max_adapter_slots=1 if case == "slot reloaded" else 2)

    def request(rid, name, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        return Request(rid, list(range(3, 9)), params, adapter=refs({rid: name}, adapters)[rid])

    if case == "slot reloaded":
        first, successor = [request("a", "lora4", 4)], request("c", "ia3", 4)
    else:
        first, successor = [request("p1", "para", 3), request("p2", "para", 8)], request("p3", "para", 4)
    for req in first:
        engine.add_request(req)
    kept = compared = 0
    last, layouts = None, []
    while engine.has_work():
        batch = engine.scheduler.schedule()
        if batch.seqs and all(s.num_tokens == 1 for s in batch.seqs):
            fast, loop = engine.runner.build(batch), engine.runner.build(batch, pending=[])
            _assert_same_inputs(fast, loop, fields)
            kept += last is not None and fast.segments is last.segments
            last, compared = fast, compared + 1
            layouts.append([(s.request.slot, s.request.para_row) for s in batch.seqs])
        engine._accept(batch, engine._run(batch)[1])
        engine._emit_text(lambda outs: None)
        if first[0].finish_reason is not None and successor.request_id not in engine.requests \
                and successor.finish_reason is None:
            engine.add_request(successor)  # before the next schedule: no decode-only step in between
    assert compared >= 5 and kept >= 2 and successor.finish_reason == "length"
    if case == "slot reloaded":  # the same slot before and after, another adapter in it
        assert layouts[0] == layouts[-1] == [(0, -1)]
    else:  # P1 and P2 decode, then P2 and P3: the same slots, their PARA rows swapped
        assert [(0, 0), (0, 1)] in layouts and [(0, 1), (0, 0)] in layouts


def test_a_decode_step_keeps_no_logits_rows_of_a_prompt_chunk(tmp_path):
    """A token budget of 2 beside a decoding request feeds another request's prompt one token a step: one-token
    steps whose second row needs no logits, then one whose second row does (the prompt's last token), with the same
    adapter slots: the decode path builds each as the general loop does."""
    from dataclasses import fields

    engine = small_engine(make_hf_model(tmp_path / "m"), max_num_seqs=2, max_num_batched_tokens=2,
                          max_prefill_chunk=2)
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    a = Request("a", [5, 6], params)
    engine.add_request(a)
    patterns = []
    while engine.has_work():
        batch = engine.scheduler.schedule()
        if a.output_ids and "b" not in engine.requests and not patterns:
            engine.add_request(Request("b", list(range(3, 9)), params))
        if all(s.num_tokens == 1 for s in batch.seqs):
            _assert_same_inputs(engine.runner.build(batch), engine.runner.build(batch, pending=[]), fields)
            patterns.append(tuple(s.needs_logits for s in batch.seqs))
        engine._accept(batch, engine._run(batch)[1])
        engine._emit_text(lambda outs: None)
    assert patterns.count((True, False)) >= 3 and (True, False) in patterns[patterns.index((True, True)) - 1:]


def _assert_same_inputs(fast, loop, fields) -> None:
    for f in fields(fast):
        a, b = getattr(fast, f.name), getattr(loop, f.name)
        if f.name == "attn":
            for g in fields(a):
                x, y = getattr(a, g.name), getattr(b, g.name)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, g.name
        elif isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        elif f.name == "scale_rows":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
        elif f.name == "segments":
            for g in ("seg_start", "seg_slot", "token_slot"):
                assert torch.equal(getattr(a, g), getattr(b, g)), g
        else:
            assert a == b, f.name
