"""Hostile adapter files below the HTTP layer (issue 12), and the import direction of `adapters/` (issue 13).

- JSON: the byte-level depth scan equals the parser's depth; deep, non-finite, duplicate-key JSON is refused.
- PEFT patterns, matched without a regex engine, select what PEFT's regexes select for the patterns accepted.
- validate: the dtype, rank and values (in the serving dtype) of every part of every kind.
- Property-based fuzzers over safetensors files (their header JSON and offsets; their tensors' dtypes, shapes, names
  and values), adapter.json fields and adapter_config.json fields: a load
  accepts or raises ArtifactError with a message; never another exception.
"""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.artifact import load_adapter_files, save_artifact
from adapters.delta import PROJECTIONS, AdapterDeltas, LowRank, ParaLayer, Sparse
from adapters.errors import ArtifactError
from adapters.files import json_depth, parse_json
from adapters.manifest import LoadedAdapter
from adapters.peft_io import export_peft_lora
from adapters.peft_patterns import compile_pattern, layer_index
from adapters.validate import validate
from tests.archives import SPEC

PARA_UP_ROWS = 64 + 32 + 128
MODULES = [f"layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
PEFT_KEYS = [f"{prefix}layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}"
             for prefix in ("model.", "") for i in range(2) for p in PROJECTIONS]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def all_kinds() -> AdapterDeltas:
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)
    return AdapterDeltas(
        lowrank={"layers.0.q_proj": LowRank(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 0.5)},
        sparse={"layers.1.o_proj": Sparse(rows, cols, torch.randn(2, generator=g), (64, 64))},
        scale={"layers.0.k": 1 + 0.1 * torch.randn(32, generator=g)},
        para={1: ParaLayer("attention", torch.randn(3, 64, generator=g), torch.randn(PARA_UP_ROWS, 3, generator=g),
                           torch.randn(64, generator=g), "silu")})


@pytest.fixture(scope="module")
def format1(tmp_path_factory) -> dict[str, bytes]:
    out = save_artifact(tmp_path_factory.mktemp("f1") / "a", all_kinds(), method="test", spec=SPEC)
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory) -> list[dict[str, bytes]]:
    """A PEFT LoRA (a regex target_modules, rank and alpha patterns) and a PEFT IA3 directory's files."""
    g = torch.Generator().manual_seed(1)
    lowrank = {"layers.0.q_proj": LowRank(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 0.5),
               "layers.1.down_proj": LowRank(torch.randn(3, 128, generator=g), torch.randn(64, 3, generator=g), 2.0)}
    out = export_peft_lora(AdapterDeltas(lowrank=lowrank), tmp_path_factory.mktemp("peft"), SPEC)
    lora = {p.name: p.read_bytes() for p in out.iterdir()}
    tensors = {f"base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l": torch.ones(32, 1) for i in range(2)}
    tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] = torch.ones(1, 128)
    config = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    ia3 = {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": st_save(tensors)}
    return [lora, ia3]


def load(files: dict[str, bytes], **kwargs) -> LoadedAdapter:
    return load_adapter_files(files, SPEC, name="fuzz", where="fuzz", max_rank=16, **kwargs)


def test_a_peft_type_peft_itself_refuses_is_refused(peft_files):
    """PEFT's PeftConfig.from_pretrained fails on "lora" (KeyError): such a directory is no PEFT checkpoint."""
    lora, ia3 = peft_files
    for files, wrong, hint in ((lora, "lora", "PEFT spells it 'LORA'"), (lora, "Lora", "PEFT spells it 'LORA'"),
                               (ia3, "ia3", "PEFT spells it 'IA3'"), (lora, "ADALORA", "supported: LORA, IA3")):
        load(files, dtype=torch.float32)  # as written: PEFT's spelling
        config = json.loads(files["adapter_config.json"]) | {"peft_type": wrong}
        with pytest.raises(ArtifactError, match=f"peft_type '{wrong}' is not supported.*{hint}"):
            load(files | {"adapter_config.json": json.dumps(config).encode()}, dtype=torch.float32)


def accepts_or_refuses(files: dict[str, bytes]) -> None:
    """The documented outcomes of a load: a LoadedAdapter, or an ArtifactError that says something."""
    try:
        load(files, dtype=torch.float32)
    except ArtifactError as e:
        assert str(e).strip()


# ---------------------------------------------------------------------------------------------------------------
# JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(['\\"', '"\\', "\\\\", "[{", "}]"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(value=json_values, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_json_depth_equals_the_parsers(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert json_depth(text) == depth_of(value)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.text(alphabet='[]{}",:\\ 0a', max_size=300).map(str.encode))
def test_parse_json_of_any_bytes(data):
    try:
        assert isinstance(parse_json(data, "x.json"), dict)
    except ArtifactError as e:
        assert str(e).startswith("x.json: ")


@pytest.mark.parametrize("data, needle", [
    (b"[" * 100_000, "nested 100000 levels deep"),  # unterminated: json.loads would recurse before failing
    (b'{"a": "' + b"\\\\" * 50 + b'", "b": ' + b"[" * 33 + b"]" * 33 + b"}", "nested 34 levels"),
    (b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[["}', None),  # brackets in a string
    (b'{"scale": NaN}', "NaN is not a JSON number"),
    (b'{"scale": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"scale": 1e999}', "number 1e999 is out of range"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'[1]', "expected a JSON object, got list"),
    (b'{"a": "\xff"}', "not valid JSON"),
    (b'{"a": ' + b"9" * 5000 + b"}", "integer 9999999999"),
    (b'{"a": -9223372036854775809}', "out of the int64 range"),
    (b'{"a": "' + b"x" * (1 << 20) + b'"}', "bytes; at most 1048576 bytes of JSON are accepted"),
])
def test_parse_json_refusals(data, needle):
    if needle is None:
        assert parse_json(data, "x.json")["a"].startswith("[[[")
        return
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        parse_json(data, "x.json")


# ---------------------------------------------------------------------------------------------------------------
# PEFT patterns: no regex engine on uploads, PEFT's selection on what is accepted

alternatives = st.lists(st.sampled_from(list(PROJECTIONS) + ["q", "mlp.up_proj", "layers.0.self_attn.q_proj",
                                                            "model.layers.1.mlp.down_proj", "self_attn.v_proj"]),
                        min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(alts=alternatives, prefix=st.sampled_from(["", ".*", ".*\\.", ".*?", "(.*\\.)?", "^"]), escape=st.booleans(),
       suffix=st.sampled_from(["", "$"]))
def test_target_modules_patterns_select_what_peft_selects(alts, prefix, escape, suffix):
    body = "|".join(re.escape(a) if escape else a for a in alts)
    text = f"{prefix}({body}){suffix}" if len(alts) > 1 or escape else f"{prefix}{body}{suffix}"
    pattern = compile_pattern(text, "target_modules")
    key_pattern = compile_pattern(text, "rank_pattern key", anchor="dot")
    for key in PEFT_KEYS:
        theirs = re.fullmatch(text, key) is not None  # PEFT: target_modules as a string
        theirs_key = re.match(rf"(.*\.)?({text})$", key) is not None  # PEFT: get_pattern_key
        # "." is a dot here, any character for PEFT: never more selected, and equal once dots are escaped
        assert pattern.matches(key) <= theirs and key_pattern.matches(key) <= theirs_key
        if escape:
            assert pattern.matches(key) == theirs and key_pattern.matches(key) == theirs_key


@pytest.mark.parametrize("text", ["(", "(a|(b))", r"\w+_proj", "q_proj+", "[qk]_proj", "(?=q)", "a{2}", r"(\w*\.?)*X",
                                  "q_proj|v_proj)", "(.*)*x", r"\1", "a" * 5000, "(a|b)" * 13])
def test_patterns_outside_the_subset_are_refused(text):
    with pytest.raises(ArtifactError, match="target_modules: .*accepted: a list of module names|expected a string"):
        compile_pattern(text, "target_modules")


@pytest.mark.parametrize("patterns", [[], ["layers"], ["h"], ["layers", "blocks"]])
def test_layer_index_is_peft_s(patterns):
    for key in PEFT_KEYS + ["a.b.3.c.4.d", "layers.7", "x.layers.12.y.1.z", "1.2.3.4"]:
        if patterns:
            regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
        else:
            regexes = [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (re.match(r, key) for r in regexes) if m), None)
        assert layer_index(key, patterns) == (int(match["idx"]) if match else None), key


# ---------------------------------------------------------------------------------------------------------------
# validate: every part of every kind


def _one(kind: str, dtype: torch.dtype = torch.float32, rank: int = 2, fill: float | None = None) -> AdapterDeltas:
    def t(*shape):
        x = torch.randn(*shape, dtype=torch.float64)
        if fill is not None:
            x.view(-1)[0] = fill
        return x.to(dtype)

    if kind == "lowrank":
        return AdapterDeltas(lowrank={"layers.0.q_proj": LowRank(t(rank, 64), t(64, rank), 1.0)})
    if kind == "sparse":
        rows, cols = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
        return AdapterDeltas(sparse={"layers.0.o_proj": Sparse(rows, cols, t(2), (64, 64))})
    if kind == "scale":
        return AdapterDeltas(scale={"layers.0.k": t(32)})
    return AdapterDeltas(para={0: ParaLayer("attention", t(rank, 64), t(PARA_UP_ROWS, rank), t(64), "silu")})


def _validate(deltas: AdapterDeltas, **kwargs) -> None:
    validate(LoadedAdapter({}, deltas, "multiplex"), SPEC, **kwargs)


KINDS = ["lowrank", "sparse", "scale", "para"]
FIRST_PART = {"lowrank": "layers.0.q_proj.A", "sparse": "layers.0.o_proj.values", "scale": "layers.0.k_scale",
              "para": "para.layers.0.down"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.uint8])
def test_weight_dtypes_refused_by_name(kind, dtype):
    with pytest.raises(ArtifactError, match=re.escape(f"{FIRST_PART[kind]}: expected a floating-point tensor of "
                                                      f"float32, float16 or bfloat16, got {dtype}")):
        _validate(_one(kind, dtype))


@pytest.mark.parametrize("kind", ["lowrank", "para"])
def test_rank_of_every_part(kind):
    _validate(_one(kind, rank=16), max_rank=16)
    name = "layers.0.q_proj" if kind == "lowrank" else "para.layers.0"
    with pytest.raises(ArtifactError, match=f"{name}: rank 17 exceeds the server's max_rank 16"):
        _validate(_one(kind, rank=17), max_rank=16)


@pytest.mark.parametrize("kind", KINDS)
def test_values_finite_in_the_serving_dtype(kind):
    near_max = _one(kind, fill=3.4e38)  # finite in float32, inf in bfloat16
    with pytest.raises(ArtifactError, match=re.escape("beyond the server's limit 1e+06")):
        _validate(near_max, dtype=torch.float32)  # finite, but beyond any trained adapter's size (below)
    with pytest.raises(ArtifactError, match=re.escape(f"{FIRST_PART[kind]}: 1 values overflow bfloat16")):
        _validate(near_max, dtype="bfloat16")
    with pytest.raises(ArtifactError, match="overflow float16"):
        _validate(_one(kind, fill=7e4), dtype=torch.float16)
    with pytest.raises(ArtifactError, match=re.escape(f"{FIRST_PART[kind]}: 1 non-finite values")):
        _validate(_one(kind, fill=math.nan), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown serving dtype"):
        _validate(near_max, dtype="float8")


def test_deltas_beyond_any_trained_adapters_size_are_refused():
    """Finite values that would overflow only at run time are refused by name and size: the second probe's
    lora_alpha 1e30, IA3 vectors of 3e38, sparse values of 1e7, and the third probe's two ways past a bound on the
    product alone: factors that cancel (B @ A = 0 exactly, 1e39 on the way in float32) and a scale of 1e10 with A of
    1e-37 (a tiny product, but B * scale, as the server folds it, is 1e40). A LoRA at the limit is taken."""
    e = torch.eye(64)
    v, w = e[:1] * 1e19, e[:, :1] * 1e20
    cases = {
        "layers.0.q_proj: |scale| |B| |A| (a bound on the delta's norm) is 4e+28": AdapterDeltas(lowrank={
            "layers.0.q_proj": LowRank(e[:2] * 0.2, e[:, :2] * 0.2, 1e30 / 2)}),
        "layers.0.q_proj: |scale| |B| |A| (a bound on the delta's norm) is 2e+39": AdapterDeltas(lowrank={
            "layers.0.q_proj": LowRank(torch.cat([v, v]), torch.cat([w, -w], dim=1), 1.0)}),  # B @ A == 0
        "layers.0.q_proj: the norm of a factor with the scale folded in is 1.41e+40": AdapterDeltas(lowrank={
            "layers.0.q_proj": LowRank(e[:2] * 1e-37, e[:, :2] * 1e30, 1e10)}),
        "layers.0.k_scale: its largest entry is 3e+38": AdapterDeltas(scale={"layers.0.k": torch.full((32,), 3e38)}),
        "layers.0.o_proj: the norm of its values is 1.41e+07": AdapterDeltas(sparse={"layers.0.o_proj": Sparse(
            torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), torch.full((2,), 1e7),
            (64, 64))}),
        "para.layers.0.query: its norm is 1e+30": AdapterDeltas(para={0: ParaLayer(  # the third probe's query
            "attention", e[:2], torch.ones(PARA_UP_ROWS, 2) * 0.1, e[0] * 1e30, "silu")}),
        "para.layers.0: |up| |down| (a bound on how the generator scales a pooled hidden state) is 1.5e+06":
            AdapterDeltas(para={0: ParaLayer("mean", e[:2] * 5e5, torch.ones(PARA_UP_ROWS, 2) * 0.1, None, "silu")}),
    }
    for needle, deltas in cases.items():
        with pytest.raises(ArtifactError, match=re.escape(needle + ", beyond the server's limit 1e+06")):
            _validate(deltas)
    cancelling = next(d for k, d in cases.items() if "2e+39" in k).lowrank["layers.0.q_proj"]
    assert torch.equal(cancelling.B.double() @ cancelling.A.double(), torch.zeros(64, 64, dtype=torch.float64))
    a, b = e[:2] * 1e3, e[:, :2] * 1e3 / 2**0.5  # |A| 1414, |B| 1000
    _validate(AdapterDeltas(lowrank={"layers.0.q_proj": LowRank(a, b, 0.7)}))  # 9.9e5
    with pytest.raises(ArtifactError, match=re.escape("is 1.02e+06")):
        _validate(AdapterDeltas(lowrank={"layers.0.q_proj": LowRank(a, b, 0.72)}))
    _validate(AdapterDeltas(scale={"layers.0.k": torch.full((32,), -1e6)}))  # the limit itself is taken


def test_lowrank_scale_in_float32():
    deltas = AdapterDeltas(lowrank={"layers.0.q_proj": LowRank(torch.ones(2, 64), torch.ones(64, 2), 1e300)})
    with pytest.raises(ArtifactError, match=r"layers\.0\.q_proj: scale 1e\+300 overflows float32"):
        _validate(deltas)


@pytest.mark.parametrize("pool, act, needle", [
    ("mean", "swish", "activation 'swish' is not one the server implements"),
    ("mean", ["silu"], "activation ['silu'] is not one"),
    ("max", "silu", "pool 'max' is not one of"),
])
def test_para_names_the_server_implements(pool, act, needle):
    deltas = AdapterDeltas(para={0: ParaLayer(pool, torch.ones(2, 64), torch.ones(PARA_UP_ROWS, 2), None, act)})
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        _validate(deltas)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: safetensors headers, manifest fields, PEFT config fields

DTYPE_CODES = ["F32", "F16", "BF16", "I32", "I64", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL", "C64", "x"]
TENSOR_NAMES = ["layers.0.q_proj.A", "layers.0.q_proj.B", "layers.9.q_proj.A", "layers.01.q_proj.A",
                "layers.1.o_proj.rows", "layers.1.o_proj.values", "layers.0.k_scale", "layers.0.o_scale",
                "para.layers.1.up", "para.layers.5.down", "para.layers.1.query", "__metadata__"]
sizes = st.integers(-3, 300) | st.sampled_from([2**31, 2**62, 2**64 + 1]) | st.booleans()
plausible = {"dtype": st.sampled_from(DTYPE_CODES), "shape": st.lists(sizes, max_size=5),
             "data_offsets": st.lists(sizes | st.integers(0, 6000), min_size=0, max_size=3)}


@st.composite
def mutated_safetensors(draw, data: bytes) -> bytes:
    """The header's JSON mutated (entries' dtype, shape, offsets; names; metadata), sometimes its length or the data."""
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field"] * 4 + ["drop", "rename", "metadata", "body"]))
        name = draw(st.sampled_from(names))
        if kind == "field" and name in header:
            field = draw(st.sampled_from(sorted(plausible)))
            header[name][field] = draw(plausible[field] if draw(st.integers(0, 3)) else json_values)
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "rename" and name in header:
            header[draw(st.sampled_from(TENSOR_NAMES) | st.text(max_size=20))] = header.pop(name)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values | st.dictionaries(st.text(max_size=8), st.text(max_size=8)))
        elif kind == "body":
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=64))
    text = json.dumps(header).encode()
    length = len(text) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return length.to_bytes(8, "little") + text + body


CASTS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.float8_e4m3fn,
         torch.uint8, torch.bool]


@st.composite
def mutated_tensors(draw, data: bytes) -> bytes:
    """Well-formed safetensors of mutated tensors: dtypes, shapes, names, values (nan, inf, near the float32 max)."""
    tensors = dict(st_load(data))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tensors) or ["layers.0.q_proj.A"]))
        t = tensors.pop(name, torch.ones(2, 64))
        kind = draw(st.sampled_from(["cast", "shape", "rename", "drop", "value", "add"]))
        if kind == "cast":
            t = t.to(draw(st.sampled_from(CASTS)))
        elif kind == "shape":
            shapes = [t.reshape(-1), t.reshape(1, -1)]
            shapes += [t[: max(t.shape[0] - 1, 0)], torch.cat([t, t])] if t.ndim else []
            shapes += [t.T.contiguous()] if t.ndim == 2 else []
            t = draw(st.sampled_from(shapes))
        elif kind == "rename":
            name = draw(st.sampled_from(TENSOR_NAMES[:-1]) | st.text(max_size=20))
        elif kind == "value" and t.is_floating_point() and t.numel():
            t = t.clone()
            at = draw(st.integers(0, t.numel() - 1))
            t.view(-1)[at] = draw(st.sampled_from([math.nan, math.inf, 3.4e38, -7e4]))
        elif kind == "add":
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            tensors[draw(st.sampled_from(TENSOR_NAMES[:-1]))] = torch.ones(shape)
        if kind != "drop":
            tensors[name] = t
    return st_save({k: v.contiguous() for k, v in tensors.items()})


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(format1, peft_files, data):
    files = data.draw(st.sampled_from([format1] + peft_files))
    weights = "adapter.safetensors" if "adapter.safetensors" in files else "adapter_model.safetensors"
    manifest = {k: v for k, v in json.loads(files.get("adapter.json", b"{}")).items() if k != "sha256"}
    mutate = data.draw(st.sampled_from([mutated_safetensors, mutated_tensors]))
    mutated = files | {weights: data.draw(mutate(files[weights]))}
    if "adapter.json" in files:
        mutated["adapter.json"] = json.dumps(manifest).encode()
    accepts_or_refuses(mutated)


MANIFEST_FIELDS = ["format", "name", "method", "created", "source_format", "base", "targets", "kinds", "ranks",
                   "scale", "shapes", "para", "trainer", "sha256", "notes"]
per_module = st.dictionaries(st.sampled_from(MODULES + ["layers.9.q_proj", "layers.0.lm_head", "x"]),
                             json_values | st.integers(-1, 2**40) | st.lists(st.integers(-1, 200), max_size=3),
                             max_size=4)
manifest_values = (json_values | per_module | st.lists(st.sampled_from(MODULES + ["lowrank", "para", 7]), max_size=4)
                   | st.sampled_from([1, True, 1.0, "multiplex", {"pool": "mean", "act": "tanh"}, {"pool": "last"},
                                      {"architecture": 7}, {"adapter.safetensors": 5}, "x" * 5000, 1e300,
                                      10**400, {"layers.0.q_proj": 10**400}]))


def _with_fields(config: dict, changes: list[tuple[str, object]]) -> bytes:
    """`config` with each (field, value) set, or removed where the value is KeyError, as JSON bytes."""
    config = dict(config)
    for field, value in changes:
        if value is KeyError:
            config.pop(field, None)
        else:
            config[field] = value
    return json.dumps(config).encode()


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(MANIFEST_FIELDS), manifest_values | st.just(KeyError)),
                        min_size=1, max_size=3))
def test_fuzz_manifest_fields(format1, changes):
    manifest = json.loads(format1["adapter.json"])
    accepts_or_refuses(format1 | {"adapter.json": _with_fields(manifest, changes)})


PEFT_FIELDS = ["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "feedforward_modules",
               "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
               "init_lora_weights", "use_dora", "modules_to_save", "base_model_name_or_path", "other"]
regexish = st.text(alphabet="()|.*?\\^$[]+{}qkvo_projdwnmlayers01 -", max_size=40)
peft_values = (json_values | regexish | st.lists(regexish | st.sampled_from(PEFT_KEYS + list(PROJECTIONS)), max_size=4)
               | st.dictionaries(regexish | st.sampled_from(PEFT_KEYS), st.integers(-2, 2**40) | json_values,
                                 max_size=3)
               | st.sampled_from(["LORA", "ia3", "all-linear", 0, 3, 2**63 - 1, 10**400, 1e308, -1, [0, 1], [5],
                                  "layers"]))


@FUZZ
@given(which=st.integers(0, 1), changes=st.lists(st.tuples(st.sampled_from(PEFT_FIELDS),
                                                           peft_values | st.just(KeyError)), min_size=1, max_size=3))
def test_fuzz_peft_config_fields(peft_files, which, changes):
    files = peft_files[which]
    config = json.loads(files["adapter_config.json"])
    accepts_or_refuses(files | {"adapter_config.json": _with_fields(config, changes)})


def test_fuzz_seeds_are_accepted(format1, peft_files):
    for files in [format1] + peft_files:
        load(files, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# issue 13: adapters/ imports one way

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
# each module may import only the ones listed before it (and adapters.methods, which imports only adapters.delta)
LAYERS = ["delta", "errors", "spec", "files", "manifest", "validate", "peft_patterns", "peft_io", "artifact"]


def _adapters_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported adapters module, whether the import is at module level) for every import in the tree."""
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n.removeprefix("adapters."), id(node) in top) for n in names if n.startswith("adapters.")]
    return out


@pytest.mark.parametrize("module", LAYERS)
def test_adapters_import_one_way(module):
    tree = ast.parse((ADAPTERS / f"{module}.py").read_text())
    for imported, at_top in _adapters_imports(tree):
        assert at_top, f"adapters.{module}: a function-local import of adapters.{imported} (a cycle dodged?)"
        if imported.split(".")[0] == "methods":
            assert module == "validate", f"adapters.{module} imports adapters.{imported}"
            continue
        assert LAYERS.index(imported) < LAYERS.index(module), f"adapters.{module} imports adapters.{imported}"
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)


def test_adapters_methods_import_only_the_vocabulary():
    for path in (ADAPTERS / "methods").glob("*.py"):
        for imported, _ in _adapters_imports(ast.parse(path.read_text())):
            assert imported == "delta" or imported.startswith("methods"), f"{path.name} imports adapters.{imported}"
