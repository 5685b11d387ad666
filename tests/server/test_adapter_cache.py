"""Device adapter cache: load on first use, pin while in use, LRU eviction, wait when full, versions side by side."""
import pytest
import torch

from server.engine.adapter_cache import AdapterCache
from server.engine.request import AdapterRef
from server.model.adapter_pool import AdapterPool
from server.model.config import ModelConfig
from tests.helpers import SMALL, random_lowrank


@pytest.fixture
def cfg():
    return ModelConfig.from_hf({**SMALL, "architectures": ["LlamaForCausalLM"]})


def _ref(cfg, name, rank, version=1):
    return AdapterRef(name, version, random_lowrank(cfg, {"q_proj": rank, "down_proj": rank}, seed=rank + version))


def test_lru_eviction_pinning_and_waiting(cfg):
    one = _ref(cfg, "a", 8)
    pool = AdapterPool(cfg, max_slots=8, arena_bytes=0, device="cpu", dtype=torch.float32)
    per_adapter = pool.nbytes(one.deltas)
    pool = AdapterPool(cfg, max_slots=8, arena_bytes=2 * per_adapter, device="cpu", dtype=torch.float32)
    cache = AdapterCache(pool)
    a, b, c = one, _ref(cfg, "b", 8), _ref(cfg, "c", 8)
    sa, sb = cache.acquire(a), cache.acquire(b)
    assert sa is not None and sb is not None and sa != sb
    assert cache.acquire(c) is None  # both pinned: c waits, nothing fails
    cache.release(a)
    sc = cache.acquire(c)  # a is unpinned and least recently used: evicted
    assert sc is not None and "a@1" not in cache.resident and cache.stats.evictions == 1
    assert cache.acquire(b) == sb and cache.stats.hits == 1  # resident: no reload
    # the slot's contents are c's now: rank table shows c's rank in q_proj of layer 0
    assert pool.rank_of(sc, 0, "q_proj") == 8


def test_new_version_gets_its_own_slot_while_old_is_pinned(cfg):
    pool = AdapterPool(cfg, max_slots=4, arena_bytes=1 << 22, device="cpu", dtype=torch.float32)
    cache = AdapterCache(pool)
    v1, v2 = _ref(cfg, "x", 4, version=1), _ref(cfg, "x", 6, version=2)
    s1 = cache.acquire(v1)
    s2 = cache.acquire(v2)
    assert s1 != s2 and pool.rank_of(s1, 0, "q_proj") == 4 and pool.rank_of(s2, 0, "q_proj") == 6


def test_slots_run_out_before_bytes(cfg):
    pool = AdapterPool(cfg, max_slots=2, arena_bytes=1 << 22, device="cpu", dtype=torch.float32)
    cache = AdapterCache(pool)
    refs = [_ref(cfg, n, 2) for n in "pqr"]
    assert cache.acquire(refs[0]) is not None and cache.acquire(refs[1]) is not None
    assert cache.acquire(refs[2]) is None
    cache.release(refs[1])
    assert cache.acquire(refs[2]) is not None and "q@1" not in cache.resident


def test_every_kind_counts_against_the_pool(cfg):
    from tests.helpers import random_para, random_sparse

    pool = AdapterPool(cfg, max_slots=4, arena_bytes=1 << 22, device="cpu", dtype=torch.float32)
    for deltas in (random_para(cfg, seed=1), random_sparse(cfg, ["q_proj", "down_proj"], 0.05, seed=2)):
        free_before = pool.allocator.num_free
        n, _ = pool.footprint(deltas)
        assert n > 0
        slot = pool.free_slots()[0]
        pool.load(slot, deltas)
        assert pool.allocator.num_free == free_before - n
        pool.free(slot)
        assert pool.allocator.num_free == free_before
