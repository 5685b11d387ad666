"""Every method's export, served in bf16, equals the trainer's model within the bf16 rounding of the merged weights.

The server keeps every adapter tensor in the model dtype (`server/model/adapter_pool.py`: LowRank factors, Sparse
values, Scale and PARA vectors), so the check here is: cast the exported tensors to bf16, build the weight the
server effectively applies, and compare it with the trainer's own weight, read off the trained module by probing it
with the identity (its fp32 forward: independent of the export code).

The backbone's projections are rounded to bf16 values first, so the served backbone equals the trainer's exactly
and every difference measured is the adapter's.

    served  = W + scale * B.bf16() @ A.bf16()          (LowRank; Sparse: values.bf16(); Scale: W * vec.bf16())
    trained = module(I).T                              (fp32)
    max |served - trained| <= 2 ulp of bf16 at max |trained|    (a bf16 copy of `trained` itself is off by 0.5 ulp)
    ||delta_served - delta_trained|| <= 2% ||delta_trained||     (LowRank and Sparse: the change itself survives)

Both at two sizes of change from the init: 0.1% (a typical short run on a large model) and 30%.
The delta check is what PiSSA's and SORSA's raw rank-2r export ([A; A0], [B, -B0]) fails: the two halves are
each of the size of W's principal part and cancel to a delta ~1000x smaller, below their own bf16 rounding.
Scale vectors (IA3, PARA) are multiplicative: l = 1 + small change, and bf16 resolves l only to 2^-8, so for them
only the merged check applies (a change below ~0.4% is lost in bf16 as it would be in a bf16 merged weight).
"""
from __future__ import annotations

import copy

import pytest
import torch

from adapters.delta import AdapterDeltas, parse_module_name
from adapters.methods.para import para_vectors, split_vectors
from adapters.train import build_method
from tests.helpers import small_model

BF16 = torch.bfloat16
REL = 1e-3  # the trained factors' change from their init, relative (0.1%)
MAX_DELTA_REL_ERR = 2e-2
MAX_ULPS = 2.0  # of bf16 at the merged weights' largest magnitude (rounding a bf16 copy costs up to 0.5)

# (case id, method, build_method kwargs)
CASES = [
    ("lora", "lora", {"rank": 4, "targets": ("q_proj", "v_proj", "down_proj")}),
    ("pissa", "pissa", {"rank": 4}),
    ("sorsa", "sorsa", {"rank": 4}),
    ("specadapt", "specadapt", {"rank": 4}),
    ("alora", "alora", {"rank": 2}),
    ("sift", "sift", {"options": {"rho": 0.05}}),
    ("ia3", "ia3", {}),
    ("para", "para", {"rank": 4}),
]


@pytest.fixture(scope="module")
def base_model():
    model = small_model(seed=0, wide_init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(BF16).float())  # bf16 values: the served backbone is exactly the trainer's
    return model


def perturbed(base_model, name: str, kwargs: dict, rel: float, seed: int = 0):
    """The method wrapped around a copy of the backbone, every trainable tensor moved `rel` (relative) from its init.

    A tensor that is zero at init (LoRA's B, SpecAdapt's a, SIFT's values, PARA's W_up) gets noise of size `rel`.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    method = build_method(name, model, **kwargs)
    if name == "sift":  # indices chosen by magnitude of a random "gradient": any fixed choice serves here
        for m in method.modules.values():
            k = max(1, int(0.05 * m.base.weight.numel()))
            m.select(torch.randperm(m.base.weight.numel())[:k])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            size = float(p.float().pow(2).mean().sqrt())
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.add_(rel * (size if size > 0 else 1.0) * noise)
    model.eval()
    return model, method


def trained_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the trained module applies, (out, in) fp32: its forward on the identity (no bias in Llama)."""
    eye = torch.eye(module.base.in_features)
    with torch.no_grad():
        return module(eye).T.float()


def served_weight(deltas: AdapterDeltas, name: str, w: torch.Tensor) -> torch.Tensor:
    """W plus what the server applies for module `name`, every adapter tensor cast to bf16 (product in fp32)."""
    out = w.clone()
    if name in deltas.lowrank:
        lr = deltas.lowrank[name]
        out += lr.scale * (lr.B.to(BF16).float() @ lr.A.to(BF16).float())
    if name in deltas.sparse:
        sp = deltas.sparse[name]
        out[sp.rows.long(), sp.cols.long()] += sp.values.to(BF16).float()
    prefix, proj = name.rsplit(".", 1)
    key = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "up_proj": "up", "down_proj": "ffn"}.get(proj)
    if key is not None and f"{prefix}.{key}" in deltas.scale:
        vec = deltas.scale[f"{prefix}.{key}"].to(BF16).float()
        out = out * vec[None, :] if key == "ffn" else out * vec[:, None]  # ffn scales down_proj's input
    return out


def bf16_ulp(w: torch.Tensor) -> float:
    """The spacing of bf16 numbers at max |w| (8 significant bits): 2^(floor(log2 max|w|) - 7)."""
    return 2.0 ** (float(torch.floor(torch.log2(w.abs().max()))) - 7)


def check_module(w: torch.Tensor, trained: torch.Tensor, served: torch.Tensor, check_delta: bool) -> None:
    err = float((served - trained).abs().max())
    rounding = float((trained.to(BF16).float() - trained).abs().max())  # a bf16 copy of the merged weights
    assert err <= MAX_ULPS * bf16_ulp(trained), (
        f"merged weight off by {err:.3g} = {err / bf16_ulp(trained):.2f} ulp (its own bf16 rounding: {rounding:.3g})"
    )
    if check_delta:
        delta = trained - w
        assert float(delta.norm()) > 0, "nothing changed: the check would be vacuous"
        rel = float((served - trained).norm() / delta.norm())
        assert rel <= MAX_DELTA_REL_ERR, f"served delta off by {rel:.1%} of the trained delta"


@pytest.mark.parametrize("case_id", [c[0] for c in CASES if c[1] != "para"])
@pytest.mark.parametrize("rel", [REL, 0.3])
def test_bf16_served_weights_match_the_trainer(case_id, rel, base_model):
    _, name, kwargs = next(c for c in CASES if c[0] == case_id)
    model, method = perturbed(base_model, name, kwargs, rel)
    deltas = method.export()
    layers = base_model.model.layers
    for module_name, module in method.modules.items():
        i, proj = parse_module_name(module_name)
        parent = layers[i].self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layers[i].mlp
        w = getattr(parent, proj).weight.detach().float()
        trained = trained_weight(module)
        served = served_weight(deltas, module_name, w)
        check_module(w, trained, served, check_delta=not deltas.scale)


@pytest.mark.parametrize("rel", [REL, 0.3])
def test_bf16_para_vectors_match_the_trainer(rel, base_model):
    """PARA's vectors, computed by the server from the exported generator and stored in bf16, scale q, v and up."""
    model, method = perturbed(base_model, "para", {"rank": 4}, rel)
    deltas = method.export()
    h = torch.randn(1, 7, base_model.config.hidden_size)
    mask = torch.ones(1, 7, dtype=torch.bool)
    cfg = base_model.config
    d_q, d_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layers = base_model.model.layers
    for i, gen in method.generators.items():
        with torch.no_grad():
            trained_vec = gen(h, mask)[0]  # (n_out,) fp32
        served_vec = para_vectors(deltas.para[i], h, mask)[0].to(BF16).float()
        weights = (layers[i].self_attn.q_proj.weight, layers[i].self_attn.v_proj.weight, layers[i].mlp.up_proj.weight)
        for w, lt, ls in zip(weights, split_vectors(trained_vec, d_q, d_kv), split_vectors(served_vec, d_q, d_kv)):
            w = w.detach().float()
            check_module(w, w * lt[:, None], w * ls[:, None], check_delta=False)
