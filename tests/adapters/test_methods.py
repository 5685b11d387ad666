"""Training methods: every exported adapter, merged by the reference math, reproduces the trainer's own fp32 logits.

Reference forward (`reference_logits`): a copy of the ORIGINAL backbone with `deltas.weight_deltas()` added to
its weights, Scale vectors multiplied into the activations by hooks, and PARA vectors computed from the prompt
by an independent implementation of the pooling. Plus method-specific checks (SORSA/PiSSA init and rank-2r
export, the SORSA regularizer by hand, ALoRA's budget, SIFT's selection, the PEFT round trip).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from adapters.data import Tokenized, collate
from adapters.delta import AdapterDeltas, parse_module_name
from adapters.methods import METHODS
from adapters.methods.base import refactor_lowrank
from adapters.methods.para import ACTIVATIONS, PROMPT_MASK_KWARG
from adapters.methods.sorsa import orthonormal_regularizer
from adapters.methods.sift import num_selected
from adapters.peft_io import export_peft_lora
from adapters.spec import backbone_spec
from adapters.train import FitOptions, build_method, epoch_batches, evaluate, fit, lm_loss
from tests.helpers import SMALL, small_model

VOCAB = SMALL["vocab_size"]
ATOL = 1e-4
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")

# (case id, method, build_method kwargs)
CASES = [
    ("lora", "lora", {}),
    ("lora-rslora", "lora", {"rank": 4, "alpha": 8.0, "options": {"rslora": True}}),
    ("pissa", "pissa", {"rank": 4}),
    ("pissa-residual", "pissa", {"rank": 4, "options": {"materialize_residual": True}}),
    ("sorsa", "sorsa", {"rank": 4}),
    ("sorsa-decoupled", "sorsa", {"rank": 4, "options": {"update": "decoupled", "gamma": 1e-2}}),
    ("specadapt", "specadapt", {"rank": 4}),
    ("alora", "alora", {"rank": 2, "options": {"k1": 1, "k2": 1, "rounds": 2}}),
    ("sift", "sift", {"options": {"rho": 0.05}}),
    ("para", "para", {"rank": 4}),
    ("para-mean", "para", {"rank": 4, "options": {"pool": "mean"}}),
    ("para-last", "para", {"rank": 4, "options": {"pool": "last", "act": "tanh"}}),
    ("ia3", "ia3", {}),
]
STEPS = 4
LR = 1e-2


@pytest.fixture(scope="module")
def base_model():
    return small_model(seed=0, wide_init=False)


def random_examples(num: int, seed: int) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        n = int(torch.randint(8, 14, (1,), generator=g))
        p = int(torch.randint(3, 7, (1,), generator=g))
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [-100] * p + ids[p:], p))
    return out


@pytest.fixture(scope="module")
def data():
    return {"train": random_examples(16, 1), "eval": random_examples(4, 2), "test": collate(random_examples(5, 3), 0)}


def opts(**kw) -> FitOptions:
    return FitOptions(**{"lr": LR, "max_steps": STEPS, "batch_size": 4, "progress": False, "eval_every": 100, **kw})


@pytest.fixture(scope="module")
def trained(base_model, data):
    """case id -> (trained model, method, export), each trained once per module."""
    cache = {}

    def get(case_id: str):
        if case_id not in cache:
            _, name, kwargs = next(c for c in CASES if c[0] == case_id)
            torch.manual_seed(0)
            model = copy.deepcopy(base_model)
            method = build_method(name, model, **kwargs)
            fit(model, method, data["train"], data["eval"], 0, opts())
            cache[case_id] = (model, method, method.export())
        return cache[case_id]

    return get


# -- the reference forward ------------------------------------------------------------------------------------
def _projection(layer, proj):
    return getattr(layer.self_attn if proj in ATTN else layer.mlp, proj)


def _pool_ref(h: torch.Tensor, mask: torch.Tensor, para) -> torch.Tensor:
    """Independent pooling: per sequence, over the prompt rows only. h (B, T, d) -> (B, d)."""
    rows = []
    for b in range(h.shape[0]):
        hs = h[b][mask[b]]  # (P, d)
        if para.pool == "mean":
            rows.append(hs.mean(0))
        elif para.pool == "last":
            rows.append(hs[-1])
        else:
            w = torch.softmax(hs @ para.pool_query / math.sqrt(hs.shape[1]), dim=0)  # (P,)
            rows.append(w @ hs)
    return torch.stack(rows)


def reference_logits(base_model, deltas: AdapterDeltas, batch: dict) -> torch.Tensor:
    ref = copy.deepcopy(base_model).eval()
    layers = ref.model.layers
    with torch.no_grad():
        for name, dw in deltas.weight_deltas().items():
            i, proj = parse_module_name(name)
            _projection(layers[i], proj).weight += dw
    for key, vec in deltas.scale.items():
        _, i, target = key.split(".")
        layer = layers[int(i)]
        if target == "ffn":
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, v=vec: (args[0] * v,))
        else:
            module = _projection(layer, "up_proj" if target == "up" else f"{target}_proj")
            module.register_forward_hook(lambda m, args, out, v=vec: out * v)
    cfg = base_model.config
    d_q = cfg.num_attention_heads * cfg.head_dim
    d_kv = cfg.num_key_value_heads * cfg.head_dim
    mask = batch["prompt_mask"]
    for i, para in deltas.para.items():
        layer, state = layers[i], {}

        def make_vectors(m, args, out, para=para, state=state):
            z = ACTIVATIONS[para.act](_pool_ref(out.float(), mask, para) @ para.w_down.T)
            vec = 1 + z @ para.w_up.T  # (B, d_q + d_kv + d_ff)
            state["q"], state["v"], state["u"] = vec[:, :d_q], vec[:, d_q : d_q + d_kv], vec[:, d_q + d_kv :]

        layer.input_layernorm.register_forward_hook(make_vectors)
        for proj, key in (("q_proj", "q"), ("v_proj", "v"), ("up_proj", "u")):
            _projection(layer, proj).register_forward_hook(lambda m, a, out, k=key, s=state: out * s[k][:, None, :])
    with torch.no_grad():
        return ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trainer_logits(model, method, batch) -> torch.Tensor:
    with torch.no_grad():
        kwargs = method.forward_kwargs(batch)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, batch: dict) -> float:
    valid = batch["attention_mask"].bool()
    return float((a - b).abs()[valid].max())


# -- every method ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_export_reproduces_trainer_logits(case_id, trained, base_model, data):
    model, method, deltas = trained(case_id)
    batch = data["test"]
    ours = trainer_logits(model, method, batch)
    ref = reference_logits(base_model, deltas, batch)
    assert max_diff(ours, ref, batch) <= ATOL
    base = reference_logits(base_model, AdapterDeltas(), batch)
    assert max_diff(ours, base, batch) > 1e-3, "training changed nothing: the comparison would be vacuous"


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_artifact_round_trip(case_id, trained, base_model, data, tmp_path):
    artifact = pytest.importorskip("adapters.artifact", reason="adapters/artifact.py not available yet")
    model, method, deltas = trained(case_id)
    spec = backbone_spec(base_model.config)
    path = artifact.save_artifact(tmp_path / case_id, deltas, method=method.name, spec=spec, trainer=method.config_dict())
    loaded = artifact.load_adapter(path, spec)
    batch = data["test"]
    assert max_diff(trainer_logits(model, method, batch), reference_logits(base_model, loaded.deltas, batch), batch) <= ATOL


def test_registry_covers_every_method():
    assert sorted(METHODS) == sorted(["lora", "pissa", "sorsa", "specadapt", "alora", "sift", "para", "ia3"])
    for name, cls in METHODS.items():
        assert cls.name == name


def test_backbone_is_never_modified(trained, base_model):
    for case_id in ("lora", "sorsa", "sift"):
        model, method, _ = trained(case_id)
        for name, module in method.modules.items():
            i, proj = parse_module_name(name)
            assert torch.equal(module.base.weight, _projection(base_model.model.layers[i], proj).weight)


# -- SORSA and PiSSA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sorsa", "pissa", "specadapt"])
def test_identity_at_init(name, base_model, data):
    model = copy.deepcopy(base_model)
    method = build_method(name, model, rank=4)
    batch = data["test"]
    assert torch.equal(trainer_logits(model, method, batch), trainer_logits(base_model, method, batch))


def test_sorsa_export_is_exact_rank_at_most_2r(trained):
    """Re-factored (the default): B' A' equals s (B diag(S) A - B0 diag(S0) A0) to fp32 rounding, rank <= 2r."""
    model, method, deltas = trained("sorsa")
    r = method.cfg.rank
    for name, m in method.modules.items():
        lr = deltas.lowrank[name]
        assert lr.rank <= 2 * r and lr.scale == method.scale
        with torch.no_grad():
            truth = m.scale * (
                m.sorsa_B.double() * m.sorsa_S.double() @ m.sorsa_A.double() - m.B0.double() * m.S0.double() @ m.A0.double()
            )
        exported = lr.scale * (lr.B.double() @ lr.A.double())
        assert float((exported - truth).abs().max()) <= 1e-6 * float(truth.abs().max())
        # the trainer's module == the ORIGINAL weight plus the exported delta
        x = torch.randn(3, m.base.in_features)
        with torch.no_grad():
            assert torch.allclose(m(x), F.linear(x, m.base.weight + lr.delta_weight()), atol=1e-5)


def test_sorsa_and_pissa_raw_concatenation_on_request(trained):
    """refactor=False: the rank-2r concatenation [B' diag(S') | -B0 diag(S0)], [A'; A0] (PiSSA: [B, -B0], [A; A0])."""
    _, sorsa, _ = trained("sorsa")
    _, pissa, _ = trained("pissa")
    sorsa.cfg.refactor = pissa.cfg.refactor = False
    try:
        sorsa_raw, pissa_raw = sorsa.export(), pissa.export()
    finally:
        sorsa.cfg.refactor = pissa.cfg.refactor = True
    r = sorsa.cfg.rank
    for name, m in sorsa.modules.items():
        lr = sorsa_raw.lowrank[name]
        assert lr.rank == 2 * r
        assert torch.equal(lr.A[:r], m.sorsa_A.detach()) and torch.equal(lr.A[r:], m.A0)
    for name, m in pissa.modules.items():
        lr = pissa_raw.lowrank[name]
        assert torch.equal(lr.A, torch.cat([m.lora_A.detach(), m.A0]))
        assert torch.equal(lr.B, torch.cat([m.lora_B.detach(), -m.B0], 1))
    with pytest.raises(ValueError, match="refactor"):
        METHODS["pissa"].Config(refactor=False, refactor_energy=0.9)


def test_pissa_init_and_export(trained, base_model):
    model, method, deltas = trained("pissa")
    r = method.cfg.rank
    for name, m in method.modules.items():
        i, proj = parse_module_name(name)
        w = _projection(base_model.model.layers[i], proj).weight.detach().double()
        s = torch.linalg.svdvals(w)
        residual = w - m.scale * (m.B0.double() @ m.A0.double())
        assert math.isclose(float((residual**2).sum()), float((s[r:] ** 2).sum()), rel_tol=1e-4)  # principal part
        lr = deltas.lowrank[name]
        assert lr.rank <= 2 * r
        with torch.no_grad():
            truth = m.scale * (m.lora_B.double() @ m.lora_A.double() - m.B0.double() @ m.A0.double())
        assert float((lr.scale * (lr.B.double() @ lr.A.double()) - truth).abs().max()) <= 1e-6 * float(truth.abs().max())


def test_sorsa_regularizer_value_and_gradient_by_hand(base_model):
    torch.manual_seed(3)
    model = copy.deepcopy(base_model)
    method = build_method("sorsa", model, rank=4, targets=("q_proj", "down_proj"), options={"gamma": 4e-4})
    mods = list(method.modules.values())
    with torch.no_grad():
        for m in mods:
            m.sorsa_A.add_(0.1 * torch.randn_like(m.sorsa_A))
            m.sorsa_B.add_(0.1 * torch.randn_like(m.sorsa_B))
    big_m = len(mods)
    value, grads = 0.0, []
    for m in mods:
        a, b = m.sorsa_A.detach().double(), m.sorsa_B.detach().double()
        e = a @ a.T - torch.eye(4, dtype=torch.float64)
        f = b.T @ b - torch.eye(4, dtype=torch.float64)
        value += math.sqrt(float((e**2).sum())) + math.sqrt(float((f**2).sum()))
        # d||E||_F/dA = 2 E A / ||E||_F (E symmetric), d||F||_F/dB = 2 B F / ||F||_F
        grads += [2 * e @ a / e.norm() / (2 * big_m), 2 * b @ f / f.norm() / (2 * big_m)]
    value /= 2 * big_m
    assert math.isclose(method.orth_loss().item(), value, rel_tol=1e-5)
    auto = method._orth_grads()
    for g_auto, g_hand in zip(auto, grads):
        assert torch.allclose(g_auto.double(), g_hand, atol=1e-6)
    # the authors' update: grad += (gamma / lr_peak) * grad L_orth, after clipping
    for p in method._orth_params():
        p.grad = torch.ones_like(p)
    from adapters.methods.base import StepContext

    ctx = StepContext(step=0, lr=1e-3, peak_lr=2e-3, max_steps=10, steps_per_epoch=5, optimizer=None)
    method.before_optimizer_step(ctx)
    for p, g_hand in zip(method._orth_params(), grads):
        assert torch.allclose(p.grad.double(), 1 + (4e-4 / 2e-3) * g_hand, atol=1e-6)
    assert orthonormal_regularizer([(torch.eye(3), torch.eye(3))]).item() == 0.0


def test_refactor_lowrank_preserves_product_and_truncates():
    torch.manual_seed(0)
    a, b = torch.randn(6, 20), torch.randn(12, 6)
    a2, b2 = refactor_lowrank(a, b)
    assert a2.shape == (6, 20) and torch.allclose(b2 @ a2, b @ a, atol=1e-4)
    # balanced: B' = Qb U sqrt(S), A' = sqrt(S) Vh Qa^T, so B'^T B' == A' A'^T == diag(S)
    assert torch.allclose(b2.T @ b2, a2 @ a2.T, atol=1e-3)
    low_a = torch.cat([torch.randn(2, 20), 1e-6 * torch.randn(4, 20)])
    a3, b3 = refactor_lowrank(low_a, b, energy=0.999)
    assert a3.shape[0] == 2 and torch.allclose(b3 @ a3, b @ low_a, atol=1e-3)
    # two halves that cancel exactly: only directions above fp64 rounding are kept (at least one)
    a4, b4 = refactor_lowrank(torch.cat([a, a]), torch.cat([b, -b], 1))
    assert a4.shape[0] == 1 and float((b4 @ a4).abs().max()) < 1e-10
    a5, b5 = refactor_lowrank(torch.cat([a[:3], a]), torch.cat([b[:, :3], -b], 1))  # rank 3 left
    assert a5.shape[0] == 3 and torch.allclose(b5 @ a5, -b[:, 3:] @ a[3:], atol=1e-4)


# -- ALoRA ----------------------------------------------------------------------------------------------------
def test_alora_keeps_the_rank_budget(trained):
    model, method, deltas = trained("alora")
    assert method.rounds_done == 2
    assert method.total_live_rank() == method.budget == 2 * 14
    assert sum(lr.rank for lr in deltas.lowrank.values()) == method.budget
    pruned = {key for rec in method.history for key in rec["pruned"]}
    assert len(pruned) >= method.n_prune
    for name, m in method.modules.items():
        live = m.live()
        if not live:
            assert name not in deltas.lowrank
            continue
        a, b = (t.detach() for t in m.factors())
        assert torch.equal(deltas.lowrank[name].A, a[live])
        assert torch.equal(deltas.lowrank[name].B, b[:, live])
    for rec in method.history:  # new ranks only where nothing was pruned that round
        assert not {n for n, _ in rec["grown"]} & {n for n, _ in rec["pruned"]}
        assert len(rec["grown"]) == len(rec["pruned"])


def _b_column(m, slot: int) -> torch.Tensor:
    """Column `slot` of an ALoRA module's B (out,)."""
    return (m.factors()[1] if hasattr(m, "factors") else m.lora_B)[:, slot].detach().clone()


def test_alora_regrown_rank_takes_a_fresh_adam_step(base_model, data):
    """A rank regrown after t = 10 steps: its first update is a fresh Adam step, every entry of its (zero) B column
    moves by lr (bias-corrected m / sqrt(v) = sign g), not by lr (1 - b1) / (1 - b1^t) sqrt((1 - b2^t) / (1 - b2)),
    0.48 lr at t = 10 and up to 3.2 lr later, as zeroed moments under the run's step count give."""
    torch.manual_seed(0)
    model = copy.deepcopy(base_model).train()
    method = build_method("alora", model, rank=2, targets=("q_proj", "v_proj"), options={"n_prune": 2})
    lr = 1e-3
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=lr)
    batches = epoch_batches(data["train"], 4, 0, 0, "cpu")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, method, next(batches)).backward()
        optimizer.step()

    for _ in range(10):
        step()
    score_batch = collate(data["train"][:4], 0)
    record = method.run_round(lambda: evaluate(model, method, [score_batch]), optimizer)
    assert record["grown"]
    before = {key: _b_column(method.modules[key[0]], key[1]) for key in record["grown"]}
    step()
    for (name, slot), b0 in before.items():
        moved = (_b_column(method.modules[name], slot) - b0).abs() / lr  # (out,)
        assert float(moved.max()) <= 1 + 1e-4, f"{name}#{slot}: {moved.max():.3f} lr"
        assert float(moved.median()) >= 0.99, f"{name}#{slot}: {moved.median():.3f} lr"


def test_alora_scores_ranks_on_a_training_batch(base_model, data):
    """The importance scores are taken on training examples only: the held-out split is what the reported eval
    loss measures, so it must not steer training."""
    model = copy.deepcopy(base_model)
    method = build_method("alora", model, rank=2, targets=("q_proj",), options={"k1": 1, "k2": 1, "rounds": 1})
    scored: list[tuple[int, ...]] = []  # the token rows of every batch a round scored on
    real_scores = method.importance_scores

    def scores(score_loss=None, score_batch=None):
        rows = zip(score_batch["input_ids"], score_batch["attention_mask"])
        scored.extend(tuple(ids[mask.bool()].tolist()) for ids, mask in rows)
        return real_scores(score_loss, score_batch)

    method.importance_scores = scores
    fit(model, method, data["train"], data["eval"], 0, opts())
    assert method.rounds_done == 1 and scored
    train_rows = {tuple(t.input_ids) for t in data["train"]}
    eval_rows = {tuple(t.input_ids) for t in data["eval"]}
    assert all(r in train_rows for r in scored) and not any(r in eval_rows for r in scored)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "gate_proj", "down_proj")])
def test_alora_suffix_scores_equal_whole_forward_scores(base_model, data, targets):
    """SuffixScorer (re-running only the layers from the rank's on, the head at the counted positions, oneDNN
    projections) gives the scores of two whole forwards per rank, within fp32 rounding, after some training (so
    that every rank matters) and with some ranks gated off."""
    torch.manual_seed(0)
    model = copy.deepcopy(base_model).train()
    method = build_method("alora", model, rank=3, targets=targets)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    batches = epoch_batches(data["train"], 4, 0, 0, "cpu")
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, method, next(batches)).backward()
        optimizer.step()
    first = next(iter(method.modules.values()))
    first.gate[1] = 0.0  # a dead slot is neither scored nor switched on
    model.eval()
    score_batch = collate(data["train"][:4], 0)
    plain = method.importance_scores(lambda: evaluate(model, method, [score_batch]))
    fast = method.importance_scores(score_batch=score_batch)
    assert plain.keys() == fast.keys() and len(plain) == 3 * len(method.modules) - 1
    spread = max(abs(v) for v in plain.values())
    assert spread > 1e-4  # the ranks matter: the comparison is not of zeros
    for key in plain:  # a score is a difference of two losses near 6, each a few of their ulps (5e-7) apart
        assert abs(plain[key] - fast[key]) <= 1e-5 * spread + 4e-6, (key, plain[key], fast[key])
    assert float(first.gate[1]) == 0.0 and all(float(g) == 1.0 for g in first.gate[[0, 2]])


# -- SIFT -----------------------------------------------------------------------------------------------------
def test_sift_selects_top_gradient_entries_and_only_they_change(trained, base_model, data):
    model, method, deltas = trained("sift")
    first = next(epoch_batches(data["train"], 4, 0, 0, "cpu"))
    ref = copy.deepcopy(base_model).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = {}
    for name in method.modules:
        i, proj = parse_module_name(name)
        weights[name] = _projection(ref.model.layers[i], proj).weight
        weights[name].requires_grad_(True)
    logits = ref(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, VOCAB), first["labels"][:, 1:].reshape(-1), ignore_index=-100).backward()
    for name, m in method.modules.items():
        g = weights[name].grad.abs().flatten()
        k = num_selected(0.05, g.numel())
        chosen = torch.zeros_like(g, dtype=torch.bool)
        chosen[m.indices] = True
        assert int(chosen.sum()) == k == m.indices.numel()
        assert float(g[chosen].min()) >= float(g[~chosen].max())  # exactly the top-k |grad| (ties aside)
        sp = deltas.sparse[name]
        assert sp.rows.dtype == torch.int32 and sp.cols.dtype == torch.int32 and sp.values.numel() == k
        flat = sp.rows.long() * sp.shape[1] + sp.cols.long()
        assert bool((flat.diff() > 0).all())  # sorted, unique
        changed = deltas.weight_deltas()[name].flatten() != 0
        assert bool((changed <= chosen).all()) and int(changed.sum()) == k


# -- PARA -----------------------------------------------------------------------------------------------------
def test_para_vectors_come_from_the_prompt_only(trained, data):
    model, method, _ = trained("para")
    batch = data["test"]
    changed = batch["input_ids"].clone()
    changed[~batch["prompt_mask"]] = 5  # rewrite every completion (and pad) token
    a = trainer_logits(model, method, batch)
    b = trainer_logits(model, method, {**batch, "input_ids": changed})
    pm = batch["prompt_mask"]
    assert torch.allclose(a[pm], b[pm], atol=1e-6)  # causal + prompt-only vectors: prompt logits unchanged
    with pytest.raises(ValueError, match=PROMPT_MASK_KWARG):
        model(input_ids=batch["input_ids"])


def test_para_is_identity_at_init(base_model, data):
    model = copy.deepcopy(base_model)
    method = build_method("para", model)
    batch = data["test"]
    assert torch.equal(trainer_logits(model, method, batch), reference_logits(base_model, AdapterDeltas(), batch))


# -- SpecAdapt ------------------------------------------------------------------------------------------------
def test_specadapt_init_follows_the_authors(base_model):
    """U, s, V from svd_lowrank(W, q=min(out, in, max_rank)); a zeros (d, r); b truncated normal (r, d) within 2 std of
    std sqrt(1/d); one identity sh shared by every module; delta W = U a sh b V^T, exported exactly as B = U a,
    A = sh b V^T (rank r)."""
    model = copy.deepcopy(base_model)
    method = build_method("specadapt", model, rank=4, options={"max_rank": 48})
    shared = {id(m.spec_sh) for m in method.modules.values()}
    assert len(shared) == 1 and torch.equal(method.shared, torch.eye(4))
    assert sum(p is method.shared for p in method.trainable_parameters()) == 1
    for name, m in method.modules.items():
        i, proj = parse_module_name(name)
        w = _projection(base_model.model.layers[i], proj).weight.detach()
        d = min(*w.shape, 48)
        assert m.U.shape == (w.shape[0], d) and m.Vh.shape == (d, w.shape[1]) and m.sigma.shape == (d,)
        assert torch.allclose(m.U.T @ m.U, torch.eye(d), atol=1e-4)
        assert torch.equal(m.spec_a, torch.zeros(d, 4)) and m.spec_b.shape == (4, d)
        assert float(m.spec_b.detach().abs().max()) <= 2 * math.sqrt(1 / d) + 1e-7
    with torch.no_grad():
        for m in method.modules.values():
            m.spec_a.normal_()
        method.shared.add_(0.1 * torch.randn(4, 4))
    deltas = method.export()
    for name, m in method.modules.items():
        lr = deltas.lowrank[name]
        truth = (m.U.double() @ m.spec_a.double() @ m.spec_sh.double() @ m.spec_b.double() @ m.Vh.double()).float()
        assert lr.rank == 4 and torch.allclose(lr.delta_weight(), truth, atol=1e-5)


def test_specadapt_dropout_acts_on_the_delta_weight(base_model):
    """Training: y = base(x) + x dropout(delta W)^T (F.dropout's mask, kept entries / (1 - p)); eval: no dropout."""
    model = copy.deepcopy(base_model)
    method = build_method("specadapt", model, rank=4, targets=("q_proj",))
    m = method.modules["layers.0.q_proj"]
    with torch.no_grad():
        m.spec_a.normal_()
    x = torch.randn(3, m.base.in_features)
    delta = (m.U @ m.spec_a @ m.spec_sh @ m.spec_b @ m.Vh).detach()  # (out, in)
    m.train()
    torch.manual_seed(7)
    y = m(x).detach()
    torch.manual_seed(7)
    expected = F.linear(x, m.base.weight) + F.linear(x, F.dropout(delta, 0.1))
    assert torch.allclose(y, expected, atol=1e-5)
    assert not torch.allclose(y, F.linear(x, m.base.weight + delta), atol=1e-5)
    m.eval()
    assert torch.allclose(m(x).detach(), F.linear(x, m.base.weight + delta), atol=1e-5)


def test_specadapt_update_normalises_then_decays_by_singular_value(base_model):
    """before_optimizer_step: grads to unit RMS per rank component (a over dim 0, b over dim 1, eps 1e-8 inside the
    root), sh's untouched; then a[i, :] and b[:, i] *= 1 - lr * wd * extra_decay * (1 - s_i / s_1), lr and wd read
    from the optimizer's group (wd is also AdamW's own decay, on a, b and sh)."""
    from adapters.methods.base import StepContext

    model = copy.deepcopy(base_model)
    method = build_method("specadapt", model, rank=4, targets=("q_proj", "down_proj"), options={"extra_decay": 1.3})
    optimizer = torch.optim.AdamW(method.param_groups(0.3), lr=0.5)
    assert method.defaults.weight_decay == 0.3 and method.defaults.max_grad_norm == 0
    with torch.no_grad():
        for m in method.modules.values():
            m.spec_a.fill_(1.0)
            m.spec_b.fill_(1.0)
    for p in method.trainable_parameters():
        p.grad = 3.0 * torch.randn_like(p)
    sh_grad = method.shared.grad.clone()
    ctx = StepContext(step=0, lr=0.5, peak_lr=0.5, max_steps=1, steps_per_epoch=1, optimizer=optimizer)
    method.before_optimizer_step(ctx)
    assert torch.equal(method.shared.grad, sh_grad)
    for m in method.modules.values():
        rms_a = m.spec_a.grad.pow(2).mean(0)  # (r,)
        rms_b = m.spec_b.grad.pow(2).mean(1)  # (r,)
        assert torch.allclose(rms_a, torch.ones(4), rtol=1e-5) and torch.allclose(rms_b, torch.ones(4), rtol=1e-5)
        factor = 1 - 0.5 * 0.3 * 1.3 * (1 - m.sigma / m.sigma[0])  # (d,)
        assert float(factor[0]) == 1.0 and float(factor[-1]) < 1.0
        assert torch.allclose(m.spec_a.detach(), factor[:, None].expand_as(m.spec_a))
        assert torch.allclose(m.spec_b.detach(), factor[None, :].expand_as(m.spec_b))


# -- PEFT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["lora", "lora-rslora", "alora"])
def test_lora_peft_round_trip(case_id, trained, base_model, data, tmp_path):
    """Exported as a PEFT LoRA directory (ALoRA: rank_pattern / alpha_pattern), loaded by peft: the same logits."""
    peft = pytest.importorskip("peft")
    model, method, deltas = trained(case_id)
    spec = backbone_spec(base_model.config)
    out = export_peft_lora(deltas, tmp_path / "peft", spec)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(out)).eval()
    batch = data["test"]
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert max_diff(trainer_logits(model, method, batch), theirs, batch) <= ATOL


# -- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_export_reproduces_cuda_training(case_id, base_model, data):
    """Trained on the GPU in fp32, the exported adapter reproduces the GPU logits under the CPU reference."""
    _, name, kwargs = next(c for c in CASES if c[0] == case_id)
    torch.manual_seed(0)
    model = copy.deepcopy(base_model).cuda()
    method = build_method(name, model, **kwargs)
    fit(model, method, data["train"], data["eval"], 0, opts(device="cuda"))
    batch = data["test"]
    ours = trainer_logits(model, method, {k: v.cuda() for k, v in batch.items()}).cpu()
    assert max_diff(ours, reference_logits(base_model, method.export(), batch), batch) <= ATOL
