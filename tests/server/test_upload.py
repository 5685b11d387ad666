"""Upload validation: real archives (tar, tar.gz, zip) of real safetensors files, every refusal with its status and
message, and acceptance of format-1, PEFT LoRA and PEFT IA3 archives."""
from __future__ import annotations

import gzip
import io
import json
import math
import stat
import tarfile
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

from adapters.artifact import load_adapter
from server.api.upload import UploadError, parse_upload
from tests.archives import (
    KV_DIM,
    LIMITS,
    SPEC,
    assert_same_deltas,
    format1_files,
    lora_deltas,
    make_archive,
    make_tar,
    make_zip,
    peft_ia3_files,
    peft_lora_files,
    raw_format1,
)

def refused(filename: str, data: bytes, status: int, needle: str, **limits) -> UploadError:
    with pytest.raises(UploadError) as info:
        parse_upload(filename, data, SPEC, **(LIMITS | limits))
    assert info.value.status_code == status, info.value.message
    assert needle in info.value.message, info.value.message
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# acceptance


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
@pytest.mark.parametrize("source", ["format1", "peft-lora", "peft-ia3"])
def test_accepts_every_format_in_every_archive_type(tmp_path, kind, source):
    files = {"format1": lambda: format1_files(tmp_path), "peft-lora": lambda: peft_lora_files(tmp_path),
             "peft-ia3": peft_ia3_files}[source]()
    for folder in (None, "my-adapter"):  # at the archive root, and inside one top-level folder
        filename, data = make_archive(kind, files, folder)
        loaded = parse_upload(filename, data, SPEC, **LIMITS)
        assert loaded.source_format == {"format1": "multiplex"}.get(source, source)
        reference = tmp_path / f"ref-{folder}"
        reference.mkdir()
        for name, content in files.items():
            (reference / name).write_bytes(content)
        assert_same_deltas(load_adapter(reference, SPEC).deltas, loaded.deltas)
        if source != "format1":  # a PEFT adapter is named by its folder, else by the archive's name
            assert loaded.manifest["name"] == (folder or "adapter")


def test_accepts_dot_slash_paths_and_readme(tmp_path):
    files = format1_files(tmp_path) | {"README.md": b"# notes"}
    data = make_tar({f"./{n}": d for n, d in files.items()}, gz=True)
    assert parse_upload("x.tgz", data, SPEC, **LIMITS).manifest["method"] == "lora"


# ---------------------------------------------------------------------------------------------------------------
# archive structure and sizes


def _entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_refuses_parent_path(tmp_path):
    data = make_tar(format1_files(tmp_path) | {"../adapter.json": b"{}"})
    refused("a.tar", data, 400, "goes up ('..')")
    refused("a.zip", make_zip({"x/../../evil.json": b"{}"}), 400, "goes up ('..')")


def test_refuses_absolute_path(tmp_path):
    refused("a.tar", make_tar({"/etc/adapter.json": b"{}"}), 400, "absolute path '/etc/adapter.json'")
    refused("a.zip", make_zip({"/tmp/adapter.json": b"{}"}), 400, "absolute path")


def test_refuses_links_and_devices(tmp_path):
    files = format1_files(tmp_path)
    refused("a.tar", make_tar(files, extra=[_entry("README.md", tarfile.SYMTYPE, "/etc/passwd")]), 400,
            "'README.md' is a link (to '/etc/passwd')")
    refused("a.tar", make_tar(files, extra=[_entry("README.md", tarfile.LNKTYPE, "adapter.json")]), 400, "is a link")
    refused("a.tar", make_tar(files, extra=[_entry("README.md", tarfile.CHRTYPE)]), 400, "device")
    refused("a.tar", make_tar(files, extra=[_entry("README.md", tarfile.FIFOTYPE)]), 400, "device, fifo")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("README.md")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    refused("a.zip", buf.getvalue(), 400, "'README.md' is a symbolic link")


def test_refuses_upload_over_max_bytes(tmp_path):
    _, data = make_archive("zip", format1_files(tmp_path))
    refused("a.zip", data, 413, f"{len(data)} bytes is over the server's limit of 1000 bytes", max_bytes=1000)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_refuses_bomb_from_headers(tmp_path, kind):
    """A highly compressible file over the unpacked limit: a few KiB uploaded, 4 MiB declared."""
    _, data = make_archive(kind, format1_files(tmp_path) | {"README.md": bytes(4 << 20)})
    assert len(data) < 64 << 10
    refused(f"bomb.{kind}", data, 413, "unpacks to more than 1048576 bytes")


def test_refuses_bomb_while_decompressing(tmp_path):
    """A pax header (not a file: no size to check up front) that inflates to 8 MiB stops at the limit."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("adapter.json")
        info.pax_headers = {"comment": "x" * (8 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    assert len(buf.getvalue()) < 64 << 10
    refused("bomb.tgz", buf.getvalue(), 413, "unpacks to more than", max_unpacked_bytes=64 << 10)


def test_refuses_zip_whose_data_exceeds_its_header(tmp_path):
    """Sizes in a zip's headers are patched smaller than the data: never more than declared is read."""
    data = bytearray(make_zip({"README.md": bytes(200_000), **format1_files(tmp_path)}))
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = data.find(sig)
        data[at + size_at:at + size_at + 4] = (1000).to_bytes(4, "little")  # uncompressed size
    with pytest.raises(UploadError) as info:
        parse_upload("a.zip", bytes(data), SPEC, **LIMITS)
    assert info.value.status_code == 400 and "not a readable zip" in info.value.message


def test_refuses_pickle(tmp_path):
    files = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.bin": b"\x80\x04 never unpickled"}
    err = refused("peft.tar", make_tar(files), 415, "['adapter_model.bin']: pickle files can run code")
    assert "only safetensors" in err.message
    refused("adapter.bin", b"\x80\x04", 415, "only safetensors")
    refused("a.zip", make_zip(format1_files(tmp_path) | {"extra.pt": b"\x80\x04"}), 415, "only safetensors")


def test_refuses_unknown_archive_type(tmp_path):
    refused("adapter.safetensors", format1_files(tmp_path)["adapter.safetensors"], 415, "unknown archive type")
    refused("a.rar", b"Rar!\x1a\x07\x00" + bytes(600), 415, "upload a .tar, .tar.gz (.tgz) or .zip")
    refused("a.tgz", gzip.compress(b"just some text, not a tar"), 400, "not a readable tar archive")
    refused("a.zip", b"PK\x03\x04" + bytes(100), 400, "not a readable zip archive")


def test_refuses_unexpected_names_and_layouts(tmp_path):
    files = format1_files(tmp_path)
    refused("a.tar", make_tar(files | {"notes.txt": b"hi"}), 400, "unexpected files ['notes.txt']")
    refused("a.zip", make_zip({"a/adapter.json": files["adapter.json"], "b/adapter.safetensors": b""}), 400,
            "at the archive root or inside one top-level folder")
    refused("a.zip", make_zip({f"x/y/{n}": d for n, d in files.items()}), 400, "one top-level folder")
    refused("a.zip", make_zip({"README.md": b"# nothing else"}), 400, "no adapter found")
    both = files | peft_lora_files(tmp_path)
    refused("a.zip", make_zip(both), 400, "both a format-1 artifact and a PEFT adapter")


# ---------------------------------------------------------------------------------------------------------------
# what validation refuses (422)


def test_refuses_wrong_shapes():
    files = raw_format1({"layers.0.q_proj.A": torch.randn(2, 64), "layers.0.q_proj.B": torch.randn(32, 2)},
                        ranks={"layers.0.q_proj": 2}, scale={"layers.0.q_proj": 1.0})
    refused("a.zip", make_zip(files), 422, "layers.0.q_proj: wrong shape: A (2, 64), B (32, 2)")


def test_refuses_unknown_modules(tmp_path):
    files = raw_format1({"layers.0.lm_head.A": torch.ones(2, 64), "layers.0.lm_head.B": torch.ones(64, 2)},
                        ranks={}, scale={})
    refused("a.zip", make_zip(files), 422, "unknown target module 'layers.0.lm_head'")
    peft = peft_lora_files(tmp_path)
    tensors = {"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(4, 128)}
    refused("p.zip", make_zip(peft | {"adapter_model.safetensors": st_save(tensors)}), 422,
            "unsupported tensors ['base_model.model.model.embed_tokens.lora_A.weight']")
    layer9 = raw_format1({"layers.9.q_proj.A": torch.ones(2, 64), "layers.9.q_proj.B": torch.ones(64, 2)},
                         ranks={"layers.9.q_proj": 2}, scale={"layers.9.q_proj": 1.0})
    refused("a.zip", make_zip(layer9), 422, "layers.9.q_proj: layer 9 does not exist")


def test_refuses_rank_over_max(tmp_path):
    refused("a.tar", make_tar(format1_files(tmp_path, lora_deltas(rank=8))), 422,
            "rank 8 exceeds the server's max_rank 4", max_rank=4)
    refused("p.tar", make_tar(peft_lora_files(tmp_path, rank=8)), 422, "max_rank 4", max_rank=4)


def test_refuses_non_finite_values():
    a = torch.randn(2, 64)
    a[1, 5] = math.nan
    files = raw_format1({"layers.0.q_proj.A": a, "layers.0.q_proj.B": torch.randn(64, 2)},
                        ranks={"layers.0.q_proj": 2}, scale={"layers.0.q_proj": 1.0})
    refused("a.zip", make_zip(files), 422, "layers.0.q_proj.A: 1 non-finite values")
    ia3 = peft_ia3_files()
    tensors = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.full((KV_DIM, 1), math.inf)}
    refused("i.zip", make_zip(ia3 | {"adapter_model.safetensors": st_save(tensors)}), 422, "non-finite")


def test_refuses_fingerprint_mismatch(tmp_path):
    other = SPEC | {"vocab_size": 256}  # same module shapes, another backbone
    refused("a.zip", make_zip(format1_files(tmp_path, spec=other)), 422, "base fingerprint mismatch")


def test_refuses_sha_mismatch_and_malformed_files(tmp_path):
    files = format1_files(tmp_path)
    swapped = st_save({k: v + 1 for k, v in lora_tensors(files).items()})
    refused("a.zip", make_zip(files | {"adapter.safetensors": swapped}), 422, "sha256 mismatch")
    refused("a.zip", make_zip(files | {"adapter.json": b"{not json"}), 422, "adapter.json: not valid JSON")
    refused("a.zip", make_zip(files | {"adapter.safetensors": b"garbage"}), 422, "not a valid safetensors file")


def lora_tensors(files: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(files["adapter.safetensors"])
