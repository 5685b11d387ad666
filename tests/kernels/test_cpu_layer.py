"""kernels/cpu_layer.c (a layer in one call, or two around the prefill rows' attention) against its PyTorch reference,
kernels/cpu_layer.py's layer_ref: steps of decodes, of prefill chunks and of both, shapes (GQA groups, head sizes, widths that leave tails), row counts, windows, q|k|v bias, the LoRA
grid's factors (none, fp32, bf16; tokens without an adapter among them), 1 to 3 threads, and both forms of the
register blocks (AVX2, and AVX-512 where the CPU has it)."""
import pytest
import torch

from kernels import cpu_layer, cpu_matmul
from kernels.attention import AttentionMeta, prefill_attention_cpu
from kernels.attention_plan import plan_cpu_attention

pytestmark = pytest.mark.skipif(not cpu_layer.available(), reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")
FORMS = ["avx2", "avx512"] if cpu_matmul.VARIANT == "avx512" else ["avx2"]  # an AVX-512 CPU runs both


@pytest.fixture(params=FORMS, autouse=True)
def form(request, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "VARIANT", request.param)  # the layer is built in the matmul's form
    return request.param

BLOCK = 4
RANK = 8
SHAPES = {  # hidden, heads, kv heads, head dim, intermediate
    "mha": (64, 4, 4, 16, 96),
    "gqa4-tails": (72, 8, 2, 16, 100),  # intermediate and hidden not multiples of 16
    "gqa3": (96, 3, 1, 32, 160),
    "wide-heads": (192, 3, 3, 64, 256),
    "gqa8-d128": (256, 8, 1, 128, 320),  # Llama 3's GQA group and head size
}
D = 1  # a decode row: a sequence's query rows in a step, below
CASES = [  # shape, each sequence's query rows, window, bias, adapters, threads
    ("mha", (D,), 0, False, None, 1),
    ("mha", (D,) * 16, 0, True, "fp32", 2),
    ("mha", (D,) * 21, 5, False, "bf16", 2),
    ("gqa4-tails", (D,) * 3, 0, True, "fp32", 1),
    ("gqa4-tails", (D,) * 16, 7, False, None, 2),
    ("gqa4-tails", (D,) * 19, 0, False, "bf16", 2),
    ("gqa3", (D,) * 5, 0, False, "fp32", 2),
    ("gqa3", (D,) * 17, 3, True, "fp32", 1),
    ("wide-heads", (D,) * 2, 0, True, "bf16", 2),
    ("wide-heads", (D,) * 16, 0, False, "fp32", 2),
    ("gqa8-d128", (D,) * 64, 0, False, "fp32", 2),  # 64 rows: the matmul's three-panel blocks
    ("gqa8-d128", (D,) * 40, 9, True, "bf16", 2),
    ("gqa4-tails", (D,) * 7, 0, True, "fp32", 3),  # more threads than this machine's cores, an odd team
    # steps with prefill rows: layer_front, the prefills' attention in PyTorch, layer_back
    ("mha", (D, D, 5, D, 9), 0, False, "fp32", 2),
    ("gqa4-tails", (7, 12), 4, True, "bf16", 2),
    ("gqa3", (D, 20, D), 0, False, "fp32", 1),  # 16+ rows of one adapter: the grid's panel blocks
    ("gqa8-d128", (3, D, D, D), 6, False, None, 2),
]


def _weights(hidden, q_size, kv_size, inter, bias, gen):
    def m(n, k):
        return torch.randn(n, k, generator=gen) / k ** 0.5

    return {"input_norm": 1 + 0.1 * torch.randn(hidden, generator=gen), "qkv": m(q_size + 2 * kv_size, hidden),
            "qkv_bias": 0.1 * torch.randn(q_size + 2 * kv_size, generator=gen) if bias else None,
            "o": m(hidden, q_size), "post_norm": 1 + 0.1 * torch.randn(hidden, generator=gen),
            "gate_up": m(2 * inter, hidden), "down": m(hidden, inter)}


def _grids(hidden, q_size, kv_size, inter, num_rows, dtype, gen):
    """Random factors of 3 slots for every group and a token -> slot assignment (-1: no adapter) -> (factors per
    group, groups, slot of each row)."""
    slices = {"qkv": (hidden, (q_size, kv_size, kv_size)), "o": (q_size, (hidden,)),
              "gate_up": (hidden, (inter, inter)), "down": (inter, (hidden,))}
    factors = {}
    for group, (d_in, widths) in slices.items():
        a = (torch.randn(3, len(widths) * RANK, d_in, generator=gen) / d_in ** 0.5).to(dtype)
        bt = tuple((0.3 * torch.randn(3, RANK, w, generator=gen)).to(dtype) for w in widths)
        starts = tuple(sum(widths[:i]) for i in range(len(widths)))
        factors[group] = cpu_matmul.grid_factors(a, bt, starts)
    slot_of = torch.randint(-1, 3, (num_rows,), generator=gen)
    slots = [s for s in range(3) if (slot_of == s).any()]
    rows = torch.cat([torch.nonzero(slot_of == s).flatten() for s in slots] or [torch.zeros(0, dtype=torch.long)])
    offsets = torch.tensor([0] + [int((slot_of == s).sum()) for s in slots]).cumsum(0)
    return factors, cpu_matmul.grid_groups(torch.tensor(slots, dtype=torch.long), offsets, rows), slot_of


def _delta(factors, slot_of):
    def delta(group, inp):
        f = factors[group]
        out = torch.zeros(inp.shape[0], sum(b.shape[2] for b in f.bt))
        for t, s in enumerate(slot_of.tolist()):
            if s >= 0:
                for i, bt in enumerate(f.bt):
                    h = inp[t] @ f.a[s, i * RANK : (i + 1) * RANK].float().T
                    start = f.struct.out_start[i]
                    out[t, start : start + bt.shape[2]] += h @ bt[s].float()
        return out
    return delta


def _step(q_lens, num_kv_heads, head_dim, gen):
    """Sequence b has q_lens[b] query rows (1: a decode) after 0-19 tokens of context, in blocks drawn at random ->
    (caches, slot mapping, AttentionMeta)."""
    q_lens = torch.tensor(q_lens)
    lens = q_lens + torch.randint(0, 20, (len(q_lens),), generator=gen)
    per_seq, num_seqs = -(-int(lens.max()) // BLOCK), len(q_lens)
    tables = torch.randperm(num_seqs * per_seq + 4, generator=gen)[: num_seqs * per_seq].view(num_seqs, per_seq)
    caches = [torch.randn(num_seqs * per_seq + 4, BLOCK, num_kv_heads, head_dim, generator=gen) for _ in range(2)]
    slots = []
    for b, (n, length) in enumerate(zip(q_lens.tolist(), lens.tolist())):
        for pos in range(length - n, length):
            slots.append(int(tables[b, pos // BLOCK]) * BLOCK + pos % BLOCK)
    q_start = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    meta = AttentionMeta(q_start, lens.to(torch.int32), tables.to(torch.int32), int(q_lens.max()), int(lens.max()))
    return caches, torch.tensor(slots), meta


def _run_kernel(shapes, layer, out, cos, sin_signed, plan, meta, window, factors, groups, k_cache, v_cache):
    """The layer by our kernel over `out`, in place: one call when every row is a decode, else two around the
    prefills' attention (as server/model/fused_layers.py runs it)."""
    none = torch.zeros(0, dtype=torch.long)
    width = max(f.width for f in factors.values()) if factors else 1
    buffers = cpu_layer.step_refs(shapes, out, cos, sin_signed, plan.write_slots, plan.write_rows, plan.decode_rows,
                                  [plan.keys.get(window, none)], [plan.visible.get(window, none)], groups, width)
    grids = tuple(factors[g].struct if factors else None for g in ("qkv", "o", "gate_up", "down"))
    if not plan.prefills and plan.decode_rows is None:
        cpu_layer.decode_layer(shapes, layer, buffers.refs, grids)
        return
    num_rows, heads, head_dim = out.shape[0], shapes.num_heads, shapes.head_dim
    cpu_layer.layer_front(shapes, layer, buffers.refs, grids[0])
    q = buffers.qkv[:, : shapes.q_size].view(num_rows, heads, head_dim)
    prefill_attention_cpu(q, k_cache, v_cache, meta, shapes.sm_scale, window, plan,
                          buffers.attn.view(num_rows, heads, head_dim))
    cpu_layer.layer_back(shapes, layer, buffers.refs, grids[1:])


@pytest.mark.parametrize("shape, q_lens, window, bias, adapters, threads", CASES)
def test_layer_matches_its_reference(shape, q_lens, window, bias, adapters, threads):
    hidden, heads, kv_heads, head_dim, inter = SHAPES[shape]
    q_size, kv_size, num_rows = heads * head_dim, kv_heads * head_dim, sum(q_lens)
    gen = torch.Generator().manual_seed(num_rows * 7 + threads)
    w = _weights(hidden, q_size, kv_size, inter, bias, gen)
    (k_cache, v_cache), slot_mapping, meta = _step(q_lens, kv_heads, head_dim, gen)
    x = torch.randn(num_rows, hidden, generator=gen)
    cos, sin_signed = torch.randn(num_rows, head_dim, generator=gen), torch.randn(num_rows, head_dim, generator=gen)
    eps, sm_scale = 1e-5, head_dim ** -0.5
    factors = groups = delta = None
    if adapters:
        dtype = torch.float32 if adapters == "fp32" else torch.bfloat16
        factors, groups, slot_of = _grids(hidden, q_size, kv_size, inter, num_rows, dtype, gen)
        delta = _delta(factors, slot_of)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = cpu_layer.layer_ref(x, w, k_ref, v_ref, slot_mapping, meta, cos, sin_signed, eps, sm_scale,
                                          window, delta)
    plan = plan_cpu_attention(meta, slot_mapping, BLOCK, kv_heads, (window,))
    shapes = cpu_layer.Shapes(hidden, q_size, kv_size, inter, heads, kv_heads, head_dim, eps, sm_scale)
    packed = {g: cpu_matmul.pack(w[g]) for g in ("qkv", "o", "gate_up", "down")}
    layer = cpu_layer.layer_refs(w["input_norm"], packed["qkv"], w["qkv_bias"], packed["o"], w["post_norm"],
                                 packed["gate_up"], packed["down"], k_cache, v_cache, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = x.clone()
        _run_kernel(shapes, layer, out, cos, sin_signed, plan, meta, window, factors, groups, k_cache, v_cache)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_cache, k_ref, rtol=1e-5, atol=1e-5)  # the step's keys (rotated) and values written
    torch.testing.assert_close(v_cache, v_ref, rtol=1e-5, atol=1e-5)
    if adapters:  # the adapters really change the output
        plain = cpu_layer.layer_ref(x, w, k_ref.clone(), v_ref.clone(), slot_mapping, meta, cos, sin_signed,
                                           eps, sm_scale, window)
        assert (plain - expected).abs().max() > 1e-2


def test_step_refs_refuse_what_the_kernel_cannot_take():
    shapes = cpu_layer.Shapes(64, 64, 64, 96, 4, 4, 16, 1e-5, 0.25)
    keys = [torch.zeros(4, dtype=torch.long)] * (cpu_layer.MAX_WINDOWS + 1)
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="MAX_WINDOWS"):
        cpu_layer.step_refs(shapes, x, torch.zeros(1, 16), torch.zeros(1, 16), torch.zeros(1, dtype=torch.long), None,
                            None, keys, keys, None, 1)
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_layer.step_refs(shapes, torch.zeros(64, 2).T, torch.zeros(2, 16), torch.zeros(2, 16),
                            torch.zeros(2, dtype=torch.long), None, None, keys[:1], keys[:1], None, 1)
