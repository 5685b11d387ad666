"""Hostile uploads (issue 12) over real HTTP and a real Redis: each row of the issue's table is refused with a 4xx
whose message names the reason, and nothing reaches the registry. Then a property-based fuzzer over archives
(mutated valid zips and tars, random bytes): `parse_upload` accepts or raises UploadError, never anything else."""
from __future__ import annotations

import json
import struct
import tarfile
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from adapters.artifact import adapter_to_bytes
from server.api.admin import AdminSettings
from server.registry.embedded import start_embedded_redis
from server.api.upload import UploadError, parse_upload
from tests.admin_server import AdminServer, admin_app, serve
from tests.helpers import assert_error
from tests.archives import (
    LIMITS,
    SPEC,
    format1_files,
    make_archive,
    make_tar,
    make_zip,
    peft_ia3_files,
    peft_lora_files,
    raw_format1,
)

MAX_RANK = 128  # the server's default, as in the issue
MAX_ADAPTER_BYTES = 64 << 20  # large enough that only the check under test refuses
PARA_UP_ROWS = 64 + 32 + 128  # [l_q; l_v; l_u] of the test backbone


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[AdminServer]:
    import httpx

    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as embedded:
        settings = AdminSettings(max_adapter_bytes=MAX_ADAPTER_BYTES, max_rank=MAX_RANK, base_model_name="tiny")
        app, auth = admin_app(embedded.url, settings)
        with serve(app) as url, httpx.Client(base_url=url, timeout=60,
                                             headers={"Authorization": f"Bearer {auth.token}"}) as client:
            yield AdminServer(url, embedded.url, auth.token, client)


@pytest.fixture
def admin(server) -> AdminServer:
    import redis

    redis.Redis.from_url(server.redis_url).flushall()
    return server


def refused(admin: AdminServer, filename: str, data: bytes, status: int, needle: str) -> None:
    """Upload; expect `status` with `needle` in the message, and nothing stored."""
    assert_error(admin.upload(filename, data, adapter_id="hostile"), status, needle)
    assert admin.redis_keys() == []


def para_files(rank: int = 2, act: str = "silu", dtype: torch.dtype = torch.float32, fill: float | None = None,
               **manifest) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    down = 0.02 * torch.randn(rank, 64, generator=g, dtype=torch.float64)  # (r, hidden)
    up = 0.02 * torch.randn(PARA_UP_ROWS, rank, generator=g, dtype=torch.float64)  # (q + kv + ff, r)
    if fill is not None:
        down[0, :4] = fill
    tensors = {"para.layers.0.down": down.to(dtype), "para.layers.0.up": up.to(dtype)}
    return raw_format1(tensors, **({"para": {"pool": "mean", "act": act}} | manifest))


def lowrank_files(**manifest) -> dict[str, bytes]:
    tensors = {"layers.0.q_proj.A": torch.randn(2, 64), "layers.0.q_proj.B": torch.randn(64, 2)}
    return raw_format1(tensors, **({"ranks": {"layers.0.q_proj": 2}, "scale": {"layers.0.q_proj": 1.0}} | manifest))


# ---------------------------------------------------------------------------------------------------------------
# The table, one test per row


def test_para_unknown_activation(admin):
    refused(admin, "para.zip", make_zip(para_files(act="swish")), 422,
            "para.layers.0: activation 'swish' is not one the server implements (gelu, identity, relu, silu, tanh)")
    refused(admin, "para.zip", make_zip(para_files(act="silu", para={"pool": "max", "act": "silu"})), 422,
            "pool 'max'")
    assert admin.upload("para.zip", make_zip(para_files()), adapter_id="ok").status_code == 201  # the control


def test_para_rank_over_max_and_values_the_server_cannot_compute(admin, tmp_path):
    refused(admin, "rank.zip", make_zip(para_files(rank=2048)), 422,
            "para.layers.0: rank 2048 exceeds the server's max_rank 128")
    # the probe as reported: rank 2048, float64 weights finite there but not in float32
    refused(admin, "f64.zip", make_zip(para_files(rank=2048, dtype=torch.float64, fill=1e300)), 422,
            "tensor 'para.layers.0.down': dtype 'F64' is not accepted")
    refused(admin, "scale.zip", make_zip(lowrank_files(scale={"layers.0.q_proj": 1e300})), 422,
            "'scale'['layers.0.q_proj'] = 1e+300 overflows float32")
    # float32 values finite in float32 but not in the GPU's bfloat16 (the serving dtype is passed in)
    near_max = make_zip(para_files(fill=3.4e38))
    with pytest.raises(UploadError, match="beyond the server's limit"):  # finite, but no trained adapter's size
        parse_upload("a.zip", near_max, SPEC, **LIMITS, dtype=torch.float32)
    with pytest.raises(UploadError) as info:
        parse_upload("a.zip", near_max, SPEC, **LIMITS, dtype=torch.bfloat16)
    assert info.value.status_code == 422
    assert "para.layers.0.down: 4 values overflow bfloat16, the server's dtype" in info.value.message
    with pytest.raises(UploadError, match="overflow float16"):
        parse_upload("a.zip", make_zip(para_files(fill=7e4)), SPEC, **LIMITS, dtype="float16")


def test_serving_dtype_reaches_the_upload_check(server):
    """The admin router checks values in the dtype it is given (the server passes its own)."""
    import httpx

    settings = AdminSettings(admin_token="t", max_adapter_bytes=MAX_ADAPTER_BYTES, dtype="bfloat16")
    app, _ = admin_app(server.redis_url, settings)
    with serve(app) as url, httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}) as client:
        response = client.post("/admin/adapters", files={"file": ("a.zip", make_zip(para_files(fill=3.4e38)))},
                               data={"adapter_id": "bf16"})
        assert assert_error(response, 422, "values overflow bfloat16")["type"] == "invalid_adapter"
    assert server.redis_keys() == []


def _deep(depth: int) -> bytes:
    return b'{"format": 1, "method": "x", "trainer": ' + b"[" * depth + b"]" * depth + b"}"


def _peft_with(tmp_path, **config) -> dict[str, bytes]:
    files = peft_lora_files(tmp_path)
    return files | {"adapter_config.json": json.dumps(json.loads(files["adapter_config.json"]) | config).encode()}


MISTYPED = {  # field: (value, what the message says)
    "shapes": ([["layers.0.o_proj", 64]], "'shapes' must be an object of at most 14 entries module -> [d_out, d_in]"),
    "ranks": ({"layers.0.q_proj": "2"}, "'ranks'['layers.0.q_proj'] must be a non-negative integer, got str '2'"),
    "sha256": ({"adapter.safetensors": 5}, "'sha256' must be an object of adapter.safetensors or"),
    "targets": (7, "'targets' must be a list of at most 14 module names, got int 7"),
    "scale": ({"layers.0.q_proj": "x"}, "'scale'['layers.0.q_proj'] must be a number, got str 'x'"),
    "base": ("llama", "'base' must be an object with keys among"),
}


@pytest.mark.parametrize("field", sorted(MISTYPED))
def test_mistyped_manifest_field(admin, field):
    value, needle = MISTYPED[field]
    refused(admin, "a.zip", make_zip(lowrank_files(**{field: value})), 422, f"adapter.json: {needle}")


def test_an_adapter_that_would_overflow_only_at_run_time(admin, tmp_path):
    """The second probe's lora_alpha 1e30 (every value finite, the scale finite in float32): refused by its size,
    nothing stored; the same adapter with its own alpha is the control."""
    refused(admin, "alpha.zip", make_zip(_peft_with(tmp_path, lora_alpha=1e30)), 422,
            "|scale| |B| |A| (a bound on the delta's norm) is")
    assert admin.upload("ok.zip", make_zip(peft_lora_files(tmp_path)), adapter_id="ok").status_code == 201


def test_float8_tensors(admin):
    tensors = {"layers.0.q_proj.A": torch.randn(2, 64).to(torch.float8_e4m3fn),
               "layers.0.q_proj.B": torch.randn(64, 2).to(torch.float8_e4m3fn)}
    files = raw_format1(tensors, ranks={"layers.0.q_proj": 2}, scale={"layers.0.q_proj": 1.0})
    refused(admin, "f8.zip", make_zip(files), 422, "dtype 'F8_E4M3' is not accepted; weights must be F32, F16 or BF16")


def test_deeply_nested_json(admin, tmp_path):
    refused(admin, "deep.zip", make_zip(lowrank_files() | {"adapter.json": _deep(100_000)}), 422,
            "adapter.json: JSON nested 100001 levels deep; at most 32 levels are accepted")
    deep_config = b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(admin, "deep.zip", make_zip(peft_lora_files(tmp_path) | {"adapter_config.json": deep_config}), 422,
            "adapter_config.json: JSON nested 100001 levels deep")


def test_an_adapter_with_no_weights_is_refused(admin, tmp_path):
    """It would serve the base model under the adapter's name (PEFT refuses such a config: no target found)."""
    refused(admin, "empty.zip", make_zip(raw_format1({})), 422, "holds no weights for any module of this model")
    peft = peft_lora_files(tmp_path)
    refused(admin, "empty.zip", make_zip(peft | {"adapter_model.safetensors": st_save({})}), 422,
            "holds no weights")


def test_ia3_feedforward_modules_outside_the_targets(admin):
    files = peft_ia3_files()
    config = json.loads(files["adapter_config.json"]) | {"feedforward_modules": ["down_proj", "up_proj"]}
    refused(admin, "ia3.zip", make_zip(files | {"adapter_config.json": json.dumps(config).encode()}), 422,
            "feedforward_modules ['down_proj', 'up_proj'] is not within target_modules")


def test_lone_surrogates_in_manifests(admin, tmp_path):
    """Valid JSON but no text: refused by name, nothing stored (stored, it made every listing of adapters fail)."""
    needle = "a string holds a lone UTF-16 surrogate"
    refused(admin, "s.zip", make_zip(lowrank_files(method="lo\ud800ra")), 422, f"adapter.json: {needle}")
    refused(admin, "s.zip", make_zip(lowrank_files(trainer={"\udfff": "x"})), 422, f"adapter.json: {needle}")
    peft = peft_lora_files(tmp_path)
    config = json.loads(peft["adapter_config.json"]) | {"base_model_name_or_path": "\ud800"}
    refused(admin, "s.zip", make_zip(peft | {"adapter_config.json": json.dumps(config).encode()}), 422,
            f"adapter_config.json: {needle}")
    assert admin.client.get("/admin/adapters").status_code == 200


@pytest.mark.parametrize("key, pattern, needle", [
    ("target_modules", "(", "target_modules: the regular expression '(' uses an unclosed '('"),
    ("target_modules", r"(\w*\.?)*X", "target_modules: the regular expression '(\\\\w*\\\\.?)*X' uses an escape"),
    ("target_modules", r".*(q_proj|v_proj)+", "uses '+'"),
    ("rank_pattern", {r"(\w*\.?)*X": 3}, "rank_pattern key: the regular expression"),
    ("exclude_modules", "[q]_proj", "exclude_modules: the regular expression '[q]_proj' uses '['"),
])
def test_peft_regexes_are_never_run(admin, tmp_path, key, pattern, needle):
    """Invalid and catastrophically backtracking patterns: refused without running a regex engine."""
    refused(admin, "peft.zip", make_zip(_peft_with(tmp_path, **{key: pattern})), 422, needle)


def test_large_manifest_fields(admin, tmp_path):
    huge = lowrank_files(notes="x" * 40_000_000)
    refused(admin, "big.zip", make_zip(huge), 422,
            f"adapter.json: {len(huge['adapter.json'])} bytes; at most 1048576 bytes of JSON are accepted")
    refused(admin, "big.zip", make_zip(lowrank_files(notes="x" * 100_000)), 422,
            "adapter.json['notes']: a string of 100000 characters; at most 4096 are accepted")
    many = {f"field{i}": "y" * 4000 for i in range(40)}
    refused(admin, "big.zip", make_zip(lowrank_files(**many)), 422,
            f"{_json_size(many)} bytes of JSON; at most 65536 are stored")
    trainer = {"log": ["z" * 4000] * 20}
    refused(admin, "big.zip", make_zip(lowrank_files(trainer=trainer)), 422,
            f"adapter.json: 'trainer': {_json_size(trainer)} bytes of JSON; at most 65536 are stored")
    # what is stored is the normalised manifest: small and typed, and so is the listing
    ok = admin.upload("a.zip", make_zip(format1_files(tmp_path)), adapter_id="small")
    assert ok.status_code == 201, ok.text
    assert set(ok.json()["manifest"]) == {"format", "name", "method", "base", "targets", "kinds", "ranks", "scale",
                                          "trainer", "created", "sha256", "source_format"}
    assert len(admin.client.get("/admin/adapters").content) < 8192


def _json_size(value) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def _zip_claiming(entries: int, directory_bytes: int | None = None, *, zip64: bool) -> bytes:
    """A real small adapter zip whose end records claim `entries` entries (and a central directory of
    `directory_bytes`): the 10-million-entry directory of the issue, described by 98 bytes."""
    data = make_zip(lowrank_files())
    sig, _, _, n, _, size, offset, comment = struct.unpack("<4s4H2LH", data[-22:])
    assert sig == b"PK\x05\x06" and comment == 0 and n == 2
    size = directory_bytes or size
    if not zip64:
        return data[:-22] + struct.pack("<4s4H2LH", sig, 0, 0, entries, entries, size, offset, 0)
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(data) - 22, 1)
    end = struct.pack("<4s4H2LH", sig, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:-22] + end64 + locator + end


def test_zip_directory_of_ten_million_entries(admin):
    refused(admin, "ten-million.zip", _zip_claiming(10_000_000, zip64=True), 400,
            "10000000 entries in its central directory; more than 64 is not an adapter archive")
    refused(admin, "classic.zip", _zip_claiming(65_535, zip64=False), 400, "65535 entries in its central directory")
    refused(admin, "directory.zip", _zip_claiming(2, 470_000_000, zip64=True), 400,
            "a central directory of 470000000 bytes")


def test_tar_entry_limits_while_streaming(admin):
    many = make_tar({f"README-{i}.md": b"" for i in range(10_000)})
    refused(admin, "many.tar", many, 400, "more than 64 entries; not an adapter archive")
    chain = bytearray()  # GNU long-name headers, each naming the next: tarfile follows them recursively
    for _ in range(5000):
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, 13
        chain += info.tobuf(format=tarfile.GNU_FORMAT) + b"adapter.json\0".ljust(512, b"\0")
    refused(admin, "chain.tar", bytes(chain) + bytes(1024), 400, "too many chained extended")


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the archive parser


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[tuple[str, bytes]]:
    """Valid archives of every kind and format: what the mutations start from."""
    tmp = tmp_path_factory.mktemp("seeds")
    sources = [format1_files(tmp), peft_lora_files(tmp), peft_ia3_files(), para_files()]
    return [make_archive(kind, files, folder) for kind in ("zip", "tar", "tar.gz") for files in sources
            for folder in (None, "dir")]


@st.composite
def mutated(draw, seeds: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    name, data = draw(st.sampled_from(seeds))
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "tail", "truncate", "insert", "overwrite", "splice", "random"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "tail" and data:  # where a zip keeps its directory and end records
            at = max(len(data) - draw(st.integers(1, min(200, len(data)))), 0)
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))[1]
            data = data[:at] + other[draw(st.integers(0, len(other))):]
        else:
            magic = draw(st.sampled_from([b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b""]))
            data = bytearray(magic + draw(st.binary(max_size=2048)))
    return name, bytes(data)


def _parses_or_refuses(name: str, data: bytes) -> None:
    try:
        loaded = parse_upload(name, data, SPEC, **LIMITS, dtype=torch.float32)
    except UploadError as e:
        assert e.status_code in (400, 413, 415, 422) and e.message.strip(), (e.status_code, e.message)
    else:
        adapter_to_bytes(loaded)  # what would be stored passes the manifest schema


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_archives(seeds, data):
    _parses_or_refuses(*data.draw(mutated(seeds)))


@settings(max_examples=60, deadline=None)
@given(entries=st.integers(0, 2**64 - 1), size=st.integers(0, 2**64 - 1), zip64=st.booleans())
def test_fuzz_zip_end_records(entries, size, zip64):
    entries = entries if zip64 else entries % 65536
    size = size if zip64 else size % 2**32
    _parses_or_refuses("a.zip", _zip_claiming(entries, size or None, zip64=zip64))


def test_fuzz_seeds_are_accepted(seeds):
    """The fuzzer starts from adapters the parser accepts (else it would test little)."""
    for name, data in seeds:
        parse_upload(name, data, SPEC, **LIMITS, dtype=torch.float32)
