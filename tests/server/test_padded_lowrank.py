"""The CPU's padded LowRank store (server/model/padded_lowrank.py): each adapter padded to its own rank class, in
stacks that hold the resident adapters of that class only; a mixed step equals the dense deltas of each adapter;
the pool charges each adapter its padded bytes."""
import pytest
import torch

from kernels.segments import make_segments
from server.engine.adapter_cache import AdapterCache
from server.engine.request import AdapterRef
from server.model.adapter_layout import GROUPS, Layout
from server.model.adapter_pool import AdapterPool, AdapterPoolFull
from server.model.config import ModelConfig
from server.model.padded_lowrank import PaddedLowRank
from tests.helpers import SMALL, random_lowrank

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def cfg():
    return ModelConfig.from_hf({**SMALL, "architectures": ["LlamaForCausalLM"]})


def _pool(cfg, arena_bytes=1 << 24, dtype=torch.float32, max_slots=16, lora_dtype=None) -> AdapterPool:
    pool = AdapterPool(cfg, max_slots=max_slots, arena_bytes=arena_bytes, device="cpu", dtype=dtype,
                       lora_dtype=lora_dtype)
    assert isinstance(pool.lowrank, PaddedLowRank)
    return pool


def _lora(cfg, rank, seed, targets=ALL):
    return random_lowrank(cfg, dict.fromkeys(targets, rank), seed=seed)


def _row_values(cfg, targets=ALL) -> int:
    """fp32 values of one adapter's padded rows per unit of R, from the model's shapes: for every layer and every
    group it targets, num_slices x d_in of A plus the group's output width of B^T."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_group = {"qkv": 3 * h + q + 2 * kv, "o": q + h, "gate_up": 2 * h + 2 * inter, "down": inter + h}
    projs = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
             "down": ("down_proj",)}
    return cfg.num_layers * sum(v for g, v in per_group.items() if set(projs[g]) & set(targets))


def _stack_values(store: PaddedLowRank) -> dict[int, int]:
    """Rank class -> the values its stacks hold (what is allocated)."""
    return {r: sum(t.numel() for per_group in cls.factors for f in per_group.values() for t in (f.a, *f.bt))
            for r, cls in store.classes.items()}


def _dense(adapters: dict, cfg, layer: int, group: str, x, seg_lens, seg_slots, bf16=False) -> torch.Tensor:
    """y (T, group width) of every token's adapter, one adapter and projection at a time: x A^T B^T * scale
    (bf16: with A and scale B^T rounded to bf16, as bf16 stacks hold them)."""
    layout = Layout.of(cfg)
    y = torch.zeros(x.shape[0], layout.group_width[group], dtype=torch.float64)
    t = 0
    for n, slot in zip(seg_lens, seg_slots):
        for proj in ALL[GROUPS[group][0] : GROUPS[group][1]]:
            lr = adapters[slot].lowrank.get(f"layers.{layer}.{proj}") if slot in adapters else None
            if lr is not None:
                _, col, w = layout.col[proj]
                if bf16:
                    h = x[t : t + n].double() @ lr.A.bfloat16().double().t()
                    y[t : t + n, col : col + w] += h @ (lr.B.float().t() * float(lr.scale)).bfloat16().double()
                    continue
                h = x[t : t + n].double() @ lr.A.double().t()  # (n, r)
                y[t : t + n, col : col + w] += lr.scale * h @ lr.B.double().t()
        t += n
    return y


def _check_step(pool, adapters, cfg, seg, seg_lens, seg_slots, gen, bf16=False):
    for layer in range(cfg.num_layers):
        for group in GROUPS:
            x = torch.randn(seg.num_tokens, pool.layout.dims[ALL[GROUPS[group][0]]][1], generator=gen)
            y0 = torch.randn(seg.num_tokens, pool.layout.group_width[group], generator=gen)
            y = y0.clone()
            pool.lowrank.apply(layer, group, y, x, seg)
            want = y0.double() + _dense(adapters, cfg, layer, group, x, seg_lens, seg_slots, bf16)
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_a_high_rank_adapter_takes_rows_of_its_own_class_only(cfg):
    pool = _pool(cfg)
    store, v = pool.lowrank, _row_values(cfg)
    for slot in range(3):
        pool.load(slot, _lora(cfg, 4 + slot, seed=slot))
    assert _stack_values(store) == {16: 4 * 16 * v}  # 3 adapters: rows doubled 1 -> 2 -> 4
    pool.load(3, _lora(cfg, 100, seed=9))
    assert _stack_values(store) == {16: 4 * 16 * v, 128: 1 * 128 * v}
    assert store.classes[16].factors[1]["qkv"].a.shape == (4, 3 * 16, cfg.hidden_size)
    assert store.classes[128].factors[1]["qkv"].a.shape == (1, 3 * 128, cfg.hidden_size)
    assert store.classes[128].factors[1]["down"].bt[0].shape == (1, 128, cfg.hidden_size)
    assert store.max_rank == 128 and store.rank_of(3, 0, "q_proj") == 100 and store.rank_of(0, 0, "q_proj") == 4
    pool.free(3)
    assert _stack_values(store) == {16: 4 * 16 * v} and store.max_rank == 16
    for slot in range(3):
        pool.free(slot)
    assert _stack_values(store) == {} and store.max_rank == 16


def test_stacks_shrink_to_what_is_resident_keeping_each_adapters_factors(cfg):
    """Six adapters of rank class 16 take 8 rows; with two left (a quarter), 4, the survivors moved to the first
    rows; a group no adapter of the class targets has no stacks."""
    pool, gen = _pool(cfg), torch.Generator().manual_seed(3)
    adapters = {slot: _lora(cfg, 16 - slot, seed=slot) for slot in range(5)}
    adapters[5] = _lora(cfg, 8, seed=5, targets=("q_proj",))
    for slot, deltas in adapters.items():
        pool.load(slot, deltas)
    store = pool.lowrank
    assert len(store.classes[16].slots) == 8
    for slot in (0, 2, 3, 5):
        pool.free(slot)
        del adapters[slot]
    assert store.classes[16].slots == [1, 4, None, None]
    assert _stack_values(store) == {16: 4 * 16 * _row_values(cfg)}
    seg_lens, seg_slots = [1, 2, 1, 1], [4, 1, 0, 5]  # slots 0 and 5 are free now: nothing applied
    _check_step(pool, adapters, cfg, make_segments(seg_lens, seg_slots, "cpu"), seg_lens, seg_slots, gen)
    pool.load(0, _lora(cfg, 8, seed=6, targets=("q_proj",)))
    pool.free(1)
    pool.free(4)
    assert store.classes[16].slots == [0, None] and set(store.classes[16].factors[0]) == {"qkv"}


def test_a_mixed_step_of_several_rank_classes_equals_each_adapters_dense_delta(cfg, grid_path):
    """Ranks 4, 8, 16, 40 and 100 (classes 16, 16, 16, 64, 128), some projections of lower rank than the adapter's
    class; prefills (solo slots) and decodes (the padded grid) in one step; slots loaded and freed between steps of
    one Segments, whose per-class plans are then built again, and only then; the grid every way this CPU runs
    (tests/conftest.py's grid_path)."""
    pool, gen = _pool(cfg), torch.Generator().manual_seed(0)
    adapters = {0: _lora(cfg, 4, seed=1), 1: _lora(cfg, 16, seed=2, targets=("q_proj", "v_proj", "down_proj")),
                2: random_lowrank(cfg, {"q_proj": 40, "o_proj": 3, "up_proj": 7}, seed=3),
                3: random_lowrank(cfg, {"k_proj": 100, "gate_proj": 2, "down_proj": 5}, seed=4),
                4: _lora(cfg, 8, seed=5)}
    for slot, deltas in adapters.items():
        pool.load(slot, deltas)
    # slot 0: a prefill of 12 tokens and a decode (solo); 1 and 4: decodes (a grid); 2: the only one of its class
    # (solo); 3: two runs of a prefill (solo); slot 6: never loaded; -1: the base model
    seg_lens, seg_slots = [12, 1, 1, 2, 1, 10, 1, 3, 2], [0, 1, 2, 3, -1, 3, 0, 6, 4]
    seg = make_segments(seg_lens, seg_slots, "cpu")
    store = pool.lowrank
    plans = {cls.rank: plan for cls, plan in store.plans(seg)}
    assert sorted(plans) == [16, 64, 128]
    assert len(plans[16].solo) == 1 and plans[16].padded is not None and len(plans[16].padded.rows) == 3
    assert plans[64].padded is None and plans[128].padded is None and len(plans[128].solo_runs[0]) == 2
    builds = []
    real_plans = store.plans
    store.plans = lambda s: builds.append(s) or real_plans(s)
    _check_step(pool, adapters, cfg, seg, seg_lens, seg_slots, gen)
    assert len(builds) == 1  # once for every layer and group of the step
    class64 = store.classes[64]
    pool.free(2)  # class 64 empties: its stacks are released, though the step's cached plans still name it
    del adapters[2]
    assert 64 not in store.classes and not any(class64.factors)
    pool.free(4)
    adapters[4] = _lora(cfg, 5, seed=6, targets=("q_proj",))  # into slot 4's old row, of which it uses qkv only
    pool.load(4, adapters[4])
    adapters[6] = random_lowrank(cfg, {"v_proj": 30, "gate_proj": 30}, seed=7)  # class 32, into the unused slot
    pool.load(6, adapters[6])
    pool.free(1)
    adapters[1] = _lora(cfg, 128, seed=8)  # slot 1 now holds a class-128 adapter
    pool.load(1, adapters[1])
    _check_step(pool, adapters, cfg, seg, seg_lens, seg_slots, gen)
    assert len(builds) == 2 and sorted(store.classes) == [16, 32, 128] and store.where[4][1] == 2
    seg.forget_host_views()
    assert "host_views" not in seg.__dict__


def test_bf16_stacks_give_each_adapter_its_delta_with_its_factors_rounded_to_bf16(cfg, grid_path):
    """`--lora-dtype bfloat16` on a CPU: the stacks hold each factor rounded once to bf16 (B with its scale folded
    in); a mixed step of prefills and decodes over several rank classes is the dense delta of those rounded factors
    (fp32 tolerance), every way this CPU runs the grid; a slot freed and reloaded keeps nothing of the old one."""
    pool, gen = _pool(cfg, lora_dtype=torch.bfloat16), torch.Generator().manual_seed(0)
    adapters = {0: _lora(cfg, 4, seed=1), 1: _lora(cfg, 16, seed=2, targets=("q_proj", "v_proj", "down_proj")),
                2: random_lowrank(cfg, {"q_proj": 40, "o_proj": 3, "up_proj": 7}, seed=3), 4: _lora(cfg, 8, seed=5)}
    for slot, deltas in adapters.items():
        pool.load(slot, deltas)
    assert pool.lowrank_dtype == torch.bfloat16
    assert {t.dtype for cls in pool.lowrank.classes.values() for per_group in cls.factors
            for f in per_group.values() for t in (f.a, *f.bt)} == {torch.bfloat16}
    seg_lens, seg_slots = [12, 1, 1, 2, 1, 1, 3], [0, 1, 2, 4, -1, 0, 6]
    seg = make_segments(seg_lens, seg_slots, "cpu")
    _check_step(pool, adapters, cfg, seg, seg_lens, seg_slots, gen, bf16=True)
    pool.free(4)
    adapters[4] = _lora(cfg, 5, seed=6, targets=("q_proj",))
    pool.load(4, adapters[4])
    _check_step(pool, adapters, cfg, seg, seg_lens, seg_slots, gen, bf16=True)


def test_bf16_stacks_are_charged_half_the_bytes(cfg):
    deltas = _lora(cfg, 4, seed=1, targets=("q_proj", "down_proj"))
    values = 16 * _row_values(cfg, ("q_proj", "down_proj"))
    fp32, bf16 = _pool(cfg).nbytes(deltas), _pool(cfg, lora_dtype=torch.bfloat16).nbytes(deltas)
    assert bf16 == -(-values // 2 // 64) * 64 * 4 and fp32 == 2 * bf16
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        _pool(cfg, lora_dtype=torch.float16)


def test_the_pool_charges_the_padded_size_in_the_arenas_dtype(cfg):
    deltas = _lora(cfg, 4, seed=1, targets=("q_proj", "down_proj"))
    values = 16 * _row_values(cfg, ("q_proj", "down_proj"))  # rank 4 pads to 16
    exact = sum(lr.A.numel() + lr.B.numel() for lr in deltas.lowrank.values())
    assert exact < values

    def rounded(n):
        return -(-n // 64) * 64  # the arena allocator's alignment

    assert _pool(cfg).nbytes(deltas) == rounded(values) * 4
    assert _pool(cfg, dtype=torch.bfloat16).nbytes(deltas) == rounded(2 * values) * 2  # fp32 stacks: 2 bf16 each
    pool = _pool(cfg)
    free = pool.allocator.num_free
    pool.load(0, deltas)
    assert pool.allocator.num_free == free - rounded(values) and pool.slots[0].nbytes == rounded(values) * 4
    pool.free(0)
    assert pool.allocator.num_free == free


def test_an_adapter_whose_padded_size_exceeds_the_pool_is_refused(cfg):
    deltas = random_lowrank(cfg, {"q_proj": 65, "down_proj": 1}, seed=2)  # class 128
    padded = 128 * _row_values(cfg, ("q_proj", "down_proj")) * 4
    exact = 4 * sum(lr.A.numel() + lr.B.numel() for lr in deltas.lowrank.values())
    pool = _pool(cfg, arena_bytes=(exact + padded) // 2)
    assert not pool.fits_empty(deltas)
    with pytest.raises(AdapterPoolFull):
        pool.load(0, deltas)
    assert pool.lowrank.classes == {} and pool.slots == {}
    assert _pool(cfg, arena_bytes=padded + 4096).fits_empty(deltas)


def test_a_pool_of_rank16_adapters_makes_a_rank128_one_wait_until_they_are_evicted(cfg):
    """A rank-128 adapter takes 8 rank-16 ones' bytes: with three rank-16 adapters pinned in a pool of nine, it
    waits; once they are released, the cache evicts all three (its range must be contiguous) and loads it."""
    small = [AdapterRef(f"s{i}", 1, _lora(cfg, 16, seed=i)) for i in range(3)]
    big = AdapterRef("big", 1, _lora(cfg, 128, seed=9))
    per_small = _pool(cfg).nbytes(small[0].deltas)
    assert _pool(cfg).nbytes(big.deltas) == 8 * per_small
    pool = _pool(cfg, arena_bytes=9 * per_small)
    cache = AdapterCache(pool)
    assert all(cache.acquire(ref) is not None for ref in small)
    assert cache.acquire(big) is None and sorted(pool.lowrank.classes) == [16]
    for ref in small:
        cache.release(ref)
    slot = cache.acquire(big)
    assert slot is not None and cache.stats.evictions == 3 and list(cache.resident) == ["big@1"]
    assert sorted(pool.lowrank.classes) == [128] and pool.rank_of(slot, 1, "down_proj") == 128
