"""Adapter archives for the upload tests (tests/server/test_upload*.py, tests/e2e/test_admin.py, the registry
tests): real tar, tar.gz and zip files of real safetensors, in format 1 and PEFT LoRA/IA3, for a tiny backbone."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from adapters.artifact import save_artifact
from adapters.delta import AdapterDeltas, LowRank
from adapters.peft_io import export_peft_lora

# The tiny backbone's shape class, small: every check runs in milliseconds.
SPEC = {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}
KV_DIM = 32
LIMITS = dict(max_bytes=4 << 20, max_unpacked_bytes=1 << 20, max_rank=16)


def lora_deltas(rank: int = 4, seed: int = 0) -> AdapterDeltas:
    g = torch.Generator().manual_seed(seed)
    return AdapterDeltas(lowrank={
        "layers.0.q_proj": LowRank(torch.randn(rank, 64, generator=g), torch.randn(64, rank, generator=g), 0.5),
        "layers.1.down_proj": LowRank(torch.randn(rank, 128, generator=g), torch.randn(64, rank, generator=g), 2.0),
    })


def format1_files(tmp_path: Path, deltas: AdapterDeltas | None = None, spec: dict = SPEC, name: str = "f1") -> dict:
    out = save_artifact(tmp_path / name, deltas or lora_deltas(), method="lora", spec=spec)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def peft_lora_files(tmp_path: Path, rank: int = 4) -> dict:
    out = export_peft_lora(lora_deltas(rank), tmp_path / "peft-lora", SPEC, base_model_name_or_path="tiny")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def peft_ia3_files() -> dict:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}.ia3_l"
            tensors[key] = 1 + torch.randn(KV_DIM, 1, generator=g)
        tensors[f"base_model.model.model.layers.{i}.mlp.down_proj.ia3_l"] = 1 + torch.randn(1, 128, generator=g)
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
              "feedforward_modules": ["down_proj"], "base_model_name_or_path": "tiny"}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": st_save(tensors)}


def raw_format1(tensors: dict[str, torch.Tensor], **manifest) -> dict:
    """A format-1 file set written by hand (no validation on the way)."""
    body = {"format": 1, "name": "raw", "method": "test", **manifest}
    return {"adapter.json": json.dumps(body).encode(), "adapter.safetensors": st_save(tensors)}


def make_tar(files: dict[str, bytes], folder: str | None = None, *, gz: bool = False,
             extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        if folder:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def make_zip(files: dict[str, bytes], folder: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}" if folder else name, data)
    return buf.getvalue()


def make_archive(kind: str, files: dict[str, bytes], folder: str | None = None) -> tuple[str, bytes]:
    """-> (file name, bytes) for kind 'tar' | 'tar.gz' | 'zip'."""
    data = make_zip(files, folder) if kind == "zip" else make_tar(files, folder, gz=kind == "tar.gz")
    return f"{folder or 'adapter'}.{kind}", data


def assert_same_deltas(a: AdapterDeltas, b: AdapterDeltas) -> None:
    assert sorted(a.lowrank) == sorted(b.lowrank) and sorted(a.scale) == sorted(b.scale)
    for name, lr in a.lowrank.items():
        assert torch.equal(lr.A, b.lowrank[name].A) and torch.equal(lr.B, b.lowrank[name].B)
        assert lr.scale == b.lowrank[name].scale
    for name, vec in a.scale.items():
        assert torch.equal(vec, b.scale[name])
