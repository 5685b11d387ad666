"""Artifact format 1, PEFT LoRA / IA3 import, PEFT LoRA export, validation. Real files, tiny random Llama, CPU."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from adapters.artifact import load_adapter, save_artifact
from adapters.delta import (
    SCALE_PROJECTION,
    AdapterDeltas,
    LowRank,
    ParaLayer,
    Sparse,
    parse_module_name,
    parse_scale_name,
)
from adapters.errors import ArtifactError
from adapters.manifest import LoadedAdapter
from adapters.peft_io import _exact_alpha, export_peft_lora
from adapters.spec import backbone_spec, fingerprint, module_shapes
from adapters.validate import validate
from tests.helpers import small_model

# tests/archives.py's SPEC as a transformers config dict: SMALL (tests/helpers.py) with a wider MLP and a smaller
# vocabulary; the shape checks below state these numbers
HF_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4  # max abs logit difference, fp32


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return small_model(seed=0, wide_init=False, **{k: v for k, v in HF_CONFIG.items() if k != "model_type"})


@pytest.fixture(scope="module")
def spec(base) -> dict:
    return backbone_spec(base.config)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, HF_CONFIG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


def _linear(model: LlamaForCausalLM, layer: int, proj: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    return getattr(block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, proj)


@torch.no_grad()
def merged_logits(base: LlamaForCausalLM, deltas: AdapterDeltas, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference: the deltas merged into a copy of the weights (Scale: rows of k/v/q/up, columns of down)."""
    model = copy.deepcopy(base)
    for name, dw in deltas.weight_deltas().items():
        _linear(model, *parse_module_name(name)).weight += dw
    for key, vec in deltas.scale.items():
        layer, target = parse_scale_name(key)
        weight = _linear(model, layer, SCALE_PROJECTION[target]).weight
        weight *= vec.float()[None, :] if target == "ffn" else vec.float()[:, None]
    return model(input_ids).logits


@torch.no_grad()
def peft_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids).logits


# ----------------------------------------------------------------------------------------------------------------
# spec and fingerprint


def test_backbone_spec_from_config_and_dict(base, spec):
    assert backbone_spec(HF_CONFIG) == spec
    expected = {k: v for k, v in HF_CONFIG.items() if k != "model_type"} | {"architecture": "llama", "head_dim": 16}
    assert spec == expected
    fp = fingerprint(spec)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint({**spec, "vocab_size": 256}) != fp
    assert fingerprint(backbone_spec({**HF_CONFIG, "model_type": "qwen2"})) != fp
    with pytest.raises(ArtifactError, match="gpt2"):
        backbone_spec({**HF_CONFIG, "model_type": "gpt2"})


def test_module_shapes(spec):
    shapes = module_shapes(spec)
    assert len(shapes) == 2 * 7
    assert shapes["layers.1.q_proj"] == (64, 64)
    assert shapes["layers.0.k_proj"] == shapes["layers.0.v_proj"] == (32, 64)
    assert shapes["layers.0.o_proj"] == (64, 64)
    assert shapes["layers.0.gate_proj"] == shapes["layers.1.up_proj"] == (128, 64)
    assert shapes["layers.1.down_proj"] == (64, 128)


# ----------------------------------------------------------------------------------------------------------------
# format 1 round trip


def _sparse(shape: tuple[int, int], nnz: int, gen: torch.Generator) -> Sparse:
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz].sort().values  # (nnz,) unique, row-major
    return Sparse((flat // shape[1]).int(), (flat % shape[1]).int(), torch.randn(nnz, generator=gen), shape)


def random_deltas(kinds: set[str], seed: int = 0) -> AdapterDeltas:
    g = torch.Generator().manual_seed(seed)
    d = AdapterDeltas()
    if "lowrank" in kinds:  # a different rank, scale and dtype per module
        d.lowrank["layers.0.q_proj"] = LowRank(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 0.5)
        d.lowrank["layers.1.down_proj"] = LowRank(torch.randn(7, 128, generator=g), torch.randn(64, 7, generator=g),
                                                  1 / 3)
        d.lowrank["layers.1.v_proj"] = LowRank(torch.randn(1, 64, generator=g).bfloat16(),
                                               torch.randn(32, 1, generator=g).bfloat16(), 2.0)
    if "sparse" in kinds:
        d.sparse["layers.1.o_proj"] = _sparse((64, 64), 50, g)
        d.sparse["layers.0.gate_proj"] = _sparse((128, 64), 9, g)
    if "scale" in kinds:
        for key, n in (("layers.0.k", 32), ("layers.0.v", 32), ("layers.1.ffn", 128), ("layers.1.q", 64),
                       ("layers.0.up", 128)):
            d.scale[key] = 1 + 0.1 * torch.randn(n, generator=g)
    if "para" in kinds:
        for layer in (0, 1):
            d.para[layer] = ParaLayer("attention", torch.randn(3, 64, generator=g),
                                      torch.randn(64 + 32 + 128, 3, generator=g), torch.randn(64, generator=g))
    return d


def assert_deltas_equal(a: AdapterDeltas, b: AdapterDeltas) -> None:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))

    assert a.lowrank.keys() == b.lowrank.keys() and a.sparse.keys() == b.sparse.keys()
    assert a.scale.keys() == b.scale.keys() and a.para.keys() == b.para.keys()
    for m in a.lowrank:
        assert same(a.lowrank[m].A, b.lowrank[m].A) and same(a.lowrank[m].B, b.lowrank[m].B)
        assert a.lowrank[m].scale == b.lowrank[m].scale
    for m in a.sparse:
        assert all(same(getattr(a.sparse[m], f), getattr(b.sparse[m], f)) for f in ("rows", "cols", "values"))
        assert tuple(a.sparse[m].shape) == tuple(b.sparse[m].shape)
    for k in a.scale:
        assert same(a.scale[k], b.scale[k])
    for layer in a.para:
        pa, pb = a.para[layer], b.para[layer]
        assert (pa.pool, pa.act) == (pb.pool, pb.act)
        assert same(pa.w_down, pb.w_down) and same(pa.w_up, pb.w_up) and same(pa.pool_query, pb.pool_query)


ALL_KINDS = {"lowrank", "sparse", "scale", "para"}


@pytest.mark.parametrize("kinds", [{"lowrank"}, {"sparse"}, {"scale"}, {"para"}, ALL_KINDS])
def test_round_trip_bit_exact(tmp_path, spec, kinds):
    deltas = random_deltas(kinds)
    out = save_artifact(tmp_path / "a", deltas, method="test", spec=spec, trainer={"lr": 1e-4})
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["format"] == 1 and manifest["name"] == "a" and manifest["method"] == "test"
    assert manifest["base"] == {"architecture": "llama", "fingerprint": fingerprint(spec)}
    assert manifest["kinds"] == sorted(kinds) and manifest["trainer"] == {"lr": 1e-4}
    digest = hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest()
    assert manifest["sha256"] == {"adapter.safetensors": digest}
    assert manifest["ranks"] == {m: lr.rank for m, lr in deltas.lowrank.items()}
    loaded = load_adapter(out, spec)
    assert loaded.source_format == "multiplex"
    assert_deltas_equal(deltas, loaded.deltas)
    assert_deltas_equal(deltas, load_adapter(out).deltas)  # without a spec: Sparse shapes from the manifest


def test_manifest_targets_and_readme_allowed(tmp_path, spec):
    deltas = random_deltas({"lowrank", "scale"})
    out = save_artifact(tmp_path / "a", deltas, method="ia3+lora", spec=spec, name="nice", extra={"notes": "x"})
    (out / "README.md").write_text("hello")
    manifest = load_adapter(out, spec).manifest
    assert manifest["name"] == "nice" and manifest["notes"] == "x"
    assert manifest["targets"] == sorted(["layers.0.q_proj", "layers.1.down_proj", "layers.1.v_proj",
                                          "layers.0.k_proj", "layers.0.v_proj", "layers.0.up_proj",
                                          "layers.1.q_proj"])


# ----------------------------------------------------------------------------------------------------------------
# PEFT LoRA import and export


LORA_CASES = {
    "all-seven": dict(target_modules=ALL_SEVEN, r=4, lora_alpha=8),
    "patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                     alpha_pattern={"v_proj": 3, "model.layers.0.mlp.down_proj": 5}),
    "rslora": dict(target_modules=["q_proj", "up_proj"], r=4, lora_alpha=8, use_rslora=True),
    "regex": dict(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj", r=3, lora_alpha=5),
}


def _peft_lora(base, **kwargs):
    torch.manual_seed(2)
    return get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_lora_import_matches_peft(tmp_path, base, spec, input_ids, case):
    model = _peft_lora(base, **LORA_CASES[case])
    model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    loaded = load_adapter(tmp_path / "peft", spec)
    assert loaded.source_format == "peft-lora" and loaded.manifest["method"] == "lora"
    if case == "patterns":
        assert loaded.manifest["ranks"]["layers.1.q_proj"] == 2 and loaded.manifest["ranks"]["layers.0.down_proj"] == 6
        assert loaded.manifest["scale"]["layers.0.v_proj"] == 3 / 4
        assert loaded.manifest["scale"]["layers.0.down_proj"] == 5 / 6
        assert loaded.manifest["scale"]["layers.1.down_proj"] == 8 / 6
    if case == "rslora":
        assert loaded.deltas.lowrank["layers.0.q_proj"].scale == 8 / math.sqrt(4)
    if case == "regex":
        assert sorted(loaded.deltas.lowrank) == ["layers.1.k_proj", "layers.1.q_proj"]
    want = peft_logits(model, input_ids)
    assert (merged_logits(base, loaded.deltas, input_ids) - want).abs().max() <= TOL


def test_peft_lora_key_variants(tmp_path, base, spec):
    """Adapter-name infixes (`lora_A.default.weight`) and keys without `.weight` load the same deltas."""
    _peft_lora(base, **LORA_CASES["patterns"]).save_pretrained(tmp_path / "peft", safe_serialization=True)
    want = load_adapter(tmp_path / "peft", spec).deltas
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for i, (old, new) in enumerate([(".weight", ".default.weight"), (".weight", "")]):
        out = tmp_path / f"v{i}"
        out.mkdir()
        shutil.copy(tmp_path / "peft" / "adapter_config.json", out)
        save_file({k.replace(old, new): t for k, t in tensors.items()}, str(out / "adapter_model.safetensors"))
        assert_deltas_equal(want, load_adapter(out, spec).deltas)
    both = tensors | {k.replace(".weight", ".other.weight"): t.clone() for k, t in tensors.items()}
    save_file(both, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="several adapters"):
        load_adapter(tmp_path / "peft")


def test_peft_lora_refusals_where_we_would_serve_other_weights_than_peft(tmp_path, base, spec):
    """Two tensors for one module under different key prefixes (one was dropped silently), and an alpha_pattern key
    whose unescaped '.' PEFT's regex lets match another character (`q.proj` gives q_proj its alpha in PEFT; read as
    a dot it matched nothing and q_proj was served with the default alpha)."""
    _peft_lora(base, **LORA_CASES["all-seven"]).save_pretrained(tmp_path / "peft", safe_serialization=True)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k)
    save_file(tensors | {key.removeprefix("base_model.model."): tensors[key] * 2}, str(weights))
    with pytest.raises(ArtifactError, match="are both the lora_A of layer 0's q_proj; one tensor per module"):
        load_adapter(tmp_path / "peft", spec)
    save_file(tensors, str(weights))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"alpha_pattern": {"q.proj": 64}}))
    with pytest.raises(ArtifactError, match="only where its unescaped '.' stands for another character"):
        load_adapter(tmp_path / "peft", spec)
    config_path.write_text(json.dumps(config | {"alpha_pattern": {"self_attn.q_proj": 64}}))  # a dot as a dot
    assert load_adapter(tmp_path / "peft", spec).manifest["scale"]["layers.0.q_proj"] == 64 / 4


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_export_peft_lora_round_trip(tmp_path, base, spec, input_ids, case):
    model = _peft_lora(base, **LORA_CASES[case])
    model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    loaded = load_adapter(tmp_path / "peft", spec)
    out = export_peft_lora(loaded, tmp_path / "export", spec, base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out)
    want = peft_logits(model, input_ids)
    assert (peft_logits(reloaded, input_ids) - want).abs().max() <= TOL
    assert_deltas_equal(loaded.deltas, load_adapter(out, spec).deltas)


def test_export_partial_modules_and_odd_scales(tmp_path, base, spec, input_ids):
    g = torch.Generator().manual_seed(3)
    deltas = AdapterDeltas(lowrank={
        "layers.1.q_proj": LowRank(torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g), 0.3),
        "layers.0.q_proj": LowRank(torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g), 0.3),
        "layers.0.down_proj": LowRank(torch.randn(5, 128, generator=g), torch.randn(64, 5, generator=g), 1 / 3),
    })
    out = export_peft_lora(deltas, tmp_path / "export", spec)
    config = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # down_proj only in layer 0: an exact regex
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out)
    assert (peft_logits(reloaded, input_ids) - merged_logits(base, deltas, input_ids)).abs().max() <= TOL
    assert_deltas_equal(deltas, load_adapter(out, spec).deltas)  # scales exact


def test_exact_alpha():
    for r in range(1, 130):
        for scale in (0.3, 1 / 3, 2.0, 1.7, 16 / 7, 1e-3, math.pi):
            alpha = _exact_alpha(scale, r)
            assert abs(alpha / r - scale) <= math.ulp(scale)  # exact unless fl(alpha / r) steps over scale
            if r & (r - 1) == 0 or (scale * r).is_integer():
                assert alpha / r == scale
    assert _exact_alpha(2.0, 4) == 8 and isinstance(_exact_alpha(2.0, 4), int)
    assert _exact_alpha(0.1, 3) / 3 != 0.1  # no float64 alpha exists: 0.3 / 3 < 0.1 < 0.30000000000000004 / 3


def test_export_refuses_other_kinds(tmp_path, spec):
    with pytest.raises(ArtifactError, match="LowRank deltas only.*sparse"):
        export_peft_lora(random_deltas({"lowrank", "sparse"}), tmp_path / "x", spec)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(use_dora=True), "use_dora"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_peft_lora_unsupported_features_refused(tmp_path, base, kwargs, needle):
    config = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4) | kwargs
    _peft_lora(base, **config).save_pretrained(tmp_path / "peft", safe_serialization=True)
    with pytest.raises(ArtifactError, match=needle):
        load_adapter(tmp_path / "peft")


# ----------------------------------------------------------------------------------------------------------------
# PEFT IA3 import


def _peft_ia3(base, target_modules, feedforward_modules):
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=target_modules,
                                                          feedforward_modules=feedforward_modules))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("targets, feedforward", [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    (["q_proj", "up_proj", "down_proj"], ["down_proj"]),
])
def test_peft_ia3_import_matches_peft(tmp_path, base, spec, input_ids, targets, feedforward):
    model = _peft_ia3(base, targets, feedforward)
    model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    loaded = load_adapter(tmp_path / "peft", spec)
    assert loaded.source_format == "peft-ia3" and loaded.manifest["kinds"] == ["scale"]
    expect = {"k_proj": "k", "v_proj": "v", "q_proj": "q", "up_proj": "up", "down_proj": "ffn"}
    assert sorted(loaded.deltas.scale) == sorted(f"layers.{i}.{expect[t]}" for i in (0, 1) for t in targets)
    want = peft_logits(model, input_ids)
    assert (merged_logits(base, loaded.deltas, input_ids) - want).abs().max() <= TOL


@pytest.mark.parametrize("targets, feedforward, needle", [
    (["k_proj", "gate_proj"], [], "gate_proj"),
    (["k_proj", "o_proj"], [], "o_proj"),
    (["k_proj", "up_proj"], ["up_proj"], "up_proj"),  # feedforward up_proj scales the hidden state
])
def test_peft_ia3_unsupported_targets_refused(tmp_path, base, targets, feedforward, needle):
    _peft_ia3(base, targets, feedforward).save_pretrained(tmp_path / "peft", safe_serialization=True)
    with pytest.raises(ArtifactError, match=needle):
        load_adapter(tmp_path / "peft")


# ----------------------------------------------------------------------------------------------------------------
# validation


def write_raw(out, tensors: dict[str, torch.Tensor], manifest: dict):
    """A format-1 directory written by hand (no validation on the way)."""
    out.mkdir()
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "adapter.json").write_text(json.dumps({"format": 1, "name": "raw", "method": "test", **manifest}))
    return out


def in_memory(deltas: AdapterDeltas) -> LoadedAdapter:
    return LoadedAdapter({}, deltas, "multiplex")


def lowrank(a_shape, b_shape, scale=1.0, name="layers.0.q_proj") -> AdapterDeltas:
    return AdapterDeltas(lowrank={name: LowRank(torch.randn(a_shape), torch.randn(b_shape), scale)})


@pytest.mark.parametrize("deltas, needle", [
    (lowrank((4, 64), (32, 4)), r"layers\.0\.q_proj: wrong shape"),
    (lowrank((4, 64), (64, 4), name="layers.0.k_proj"), r"layers\.0\.k_proj: wrong shape"),
    (lowrank((4, 64), (64, 4), name="layers.0.foo_proj"), "unknown target module 'layers.0.foo_proj'"),
    (lowrank((4, 64), (64, 4), name="layers.2.q_proj"), "layer 2 does not exist"),
    (lowrank((0, 64), (64, 0)), "rank must be >= 1"),
    (lowrank((4, 64), (64, 4), scale=math.inf), "non-finite scale"),
    (AdapterDeltas(scale={"layers.0.k": torch.ones(64)}), r"layers\.0\.k_scale: wrong shape \(64,\)"),
    (AdapterDeltas(scale={"layers.0.o": torch.ones(64)}), "unknown scale target 'layers.0.o'"),
    (AdapterDeltas(para={0: ParaLayer("max", torch.ones(2, 64), torch.ones(224, 2), torch.ones(64))}), "pool 'max'"),
    (AdapterDeltas(para={0: ParaLayer("mean", torch.ones(2, 64), torch.ones(223, 2))}), r"para\.layers\.0\.up"),
    (AdapterDeltas(para={0: ParaLayer("attention", torch.ones(2, 64), torch.ones(224, 2))}), "query"),
])
def test_validate_rejects(spec, deltas, needle):
    with pytest.raises(ArtifactError, match=needle):
        validate(in_memory(deltas), spec)


def test_validate_rank_too_large(spec):
    validate(in_memory(lowrank((4, 64), (64, 4))), spec, max_rank=4)
    with pytest.raises(ArtifactError, match=r"layers\.0\.q_proj: rank 4 exceeds the server's max_rank 2"):
        validate(in_memory(lowrank((4, 64), (64, 4))), spec, max_rank=2)


def test_non_finite_in_file(tmp_path, spec):
    a = torch.randn(2, 64)
    a[1, 3] = math.nan
    out = write_raw(tmp_path / "a", {"layers.0.q_proj.A": a, "layers.0.q_proj.B": torch.randn(64, 2)},
                    {"ranks": {"layers.0.q_proj": 2}, "scale": {"layers.0.q_proj": 1.0}})
    with pytest.raises(ArtifactError, match=r"layers\.0\.q_proj\.A: 1 non-finite"):
        load_adapter(out, spec)


@pytest.mark.parametrize("rows, cols, needle", [
    ([1, 0], [0, 0], "not sorted"),
    ([0, 0], [5, 5], "duplicate"),
    ([0, 64], [0, 0], r"rows: index out of range \[0, 64\)"),
    ([0, 1], [0, -1], "cols: index out of range"),
])
def test_sparse_rejects(spec, rows, cols, needle):
    sp = Sparse(torch.tensor(rows, dtype=torch.int32), torch.tensor(cols, dtype=torch.int32), torch.ones(2), (64, 64))
    with pytest.raises(ArtifactError, match=needle):
        validate(in_memory(AdapterDeltas(sparse={"layers.0.o_proj": sp})), spec)


def test_sparse_indices_must_be_int32(spec):
    sp = Sparse(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2), (64, 64))
    with pytest.raises(ArtifactError, match="int32"):
        validate(in_memory(AdapterDeltas(sparse={"layers.0.o_proj": sp})), spec)


def test_sparse_lengths_differ(spec):
    sp = Sparse(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), torch.ones(2), (64, 64))
    with pytest.raises(ArtifactError, match="lengths differ"):
        validate(in_memory(AdapterDeltas(sparse={"layers.0.o_proj": sp})), spec)


def test_save_refuses_invalid(tmp_path, spec):
    with pytest.raises(ArtifactError, match="wrong shape"):
        save_artifact(tmp_path / "a", lowrank((4, 64), (32, 4)), method="lora", spec=spec)


def test_fingerprint_mismatch(tmp_path, spec):
    out = save_artifact(tmp_path / "a", random_deltas({"scale"}), method="ia3", spec=spec)
    other = {**spec, "vocab_size": 256}
    with pytest.raises(ArtifactError, match="fingerprint mismatch"):
        load_adapter(out, other)


def test_unexpected_file(tmp_path, spec):
    out = save_artifact(tmp_path / "a", random_deltas({"scale"}), method="ia3", spec=spec)
    (out / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match=r"unexpected files \['notes.txt'\]"):
        load_adapter(out)
    (out / "notes.txt").unlink()
    (out / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match="pickle"):
        load_adapter(out)


def test_sha_mismatch(tmp_path, spec):
    out = save_artifact(tmp_path / "a", random_deltas({"scale"}), method="ia3", spec=spec)
    save_file({"layers.0.k_scale": torch.ones(32)}, str(out / "adapter.safetensors"))  # swapped after the manifest
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_adapter(out)


def test_pickle_only_dir_refused(tmp_path):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (peft_dir / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(ArtifactError, match="pickle files are refused.*safetensors"):
        load_adapter(peft_dir)
    other = tmp_path / "pt"
    other.mkdir()
    (other / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match="pickle"):
        load_adapter(other)


def test_unknown_tensor_and_incomplete_module(tmp_path):
    out = write_raw(tmp_path / "a", {"layers.0.lm_head.A": torch.ones(2, 64), "layers.0.lm_head.B": torch.ones(64, 2)},
                    {"ranks": {}, "scale": {}})
    with pytest.raises(ArtifactError, match="unknown target module 'layers.0.lm_head'"):
        load_adapter(out)
    out = write_raw(tmp_path / "b", {"layers.0.q_proj.A": torch.ones(2, 64)}, {"ranks": {}, "scale": {}})
    with pytest.raises(ArtifactError, match=r"layers\.0\.q_proj: incomplete tensors \['A'\]"):
        load_adapter(out)
    out = write_raw(tmp_path / "c", {"embed.weight": torch.ones(2)}, {})
    with pytest.raises(ArtifactError, match="unknown tensor name 'embed.weight'"):
        load_adapter(out)


def test_not_an_adapter(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="no adapter found"):
        load_adapter(tmp_path / "x")
