"""adapter.json, the format-1 manifest: its schema (`check_manifest`), the summary it records of an adapter's deltas
(`manifest_of`), and `LoadedAdapter`, the manifest and deltas as loaded.

`check_manifest` runs on the parsed JSON before the weights are read. Each known field has its type and size
checked, so that later code can index it without a try; unknown fields are kept (`save_artifact(extra=...)`) only
while small. The registry stores the normalised manifest it returns, so a listing or a replica's reload never meets
a large or mistyped field:

| field         | type                                              | bound                                   |
| format        | 1                                                 |                                         |
| name, method  | non-empty string                                  | MAX_NAME_CHARS                          |
| created       | string                                            | MAX_NAME_CHARS                          |
| source_format | one of SOURCE_FORMATS                             |                                         |
| base          | {architecture, fingerprint, name_or_path}: strings | MAX_STRING_CHARS each                  |
| targets       | [module name]                                     | the backbone's number of modules        |
| kinds         | [one of KINDS]                                    | 4                                       |
| ranks         | {module name: int >= 0}                           | number of modules                       |
| scale         | {module name: number finite in float32}           | number of modules                       |
| shapes        | {module name: [d_out, d_in]}                      | number of modules                       |
| para          | {pool: string, act: string}                       | (validate checks the names)             |
| trainer       | object                                            | MAX_RECORD_BYTES, strings, lists        |
| sha256        | {weights file name: hex digest}                   | 2 entries                               |
| anything else | any JSON                                          | MAX_RECORD_BYTES together               |
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.delta import (
    PROJECTIONS,
    SCALE_PROJECTION,
    AdapterDeltas,
    module_name,
    parse_module_name,
    parse_scale_name,
)
from adapters.errors import ArtifactError
from adapters.files import (
    MANIFEST_FILE,
    MAX_STRING_CHARS,
    PEFT_WEIGHTS_FILE,
    WEIGHTS_FILE,
    check_bounded,
    describe,
    is_int,
    short,
)

FORMAT_VERSION = 1
KINDS = ("lowrank", "para", "scale", "sparse")
SOURCE_FORMATS = ("multiplex", "peft-lora", "peft-ia3")
MAX_NAME_CHARS = 256
MAX_RECORD_BYTES = 64 << 10  # the trainer record; all unknown fields together
MAX_DIM = (1 << 31) - 1
MAX_MODULES = len(PROJECTIONS) * 1024  # without a backbone spec: 1024 layers
MIN_LIST_ITEMS = 256  # lists and objects in free-form fields may always have this many entries
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class LoadedAdapter:
    manifest: dict
    deltas: AdapterDeltas
    source_format: str  # "multiplex" | "peft-lora" | "peft-ia3"
    path: Path | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)  # digests of the files actually read


# ---------------------------------------------------------------------------------------------------------------
# The summary of the deltas


def kinds_of(deltas: AdapterDeltas) -> list[str]:
    return sorted(k for k in KINDS if getattr(deltas, k))


def targets_of(deltas: AdapterDeltas) -> list[str]:
    """Every projection module that the adapter changes (Scale and PARA name the projection they multiply)."""
    targets = set(deltas.lowrank) | set(deltas.sparse)
    for key in deltas.scale:
        layer, target = parse_scale_name(key)
        targets.add(module_name(layer, SCALE_PROJECTION[target]))
    for layer in deltas.para:
        targets |= {module_name(layer, p) for p in ("q_proj", "v_proj", "up_proj")}
    return sorted(targets)


def manifest_of(deltas: AdapterDeltas, *, method: str, name: str, trainer: dict) -> dict:
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION, "name": name, "method": method,
        "targets": targets_of(deltas), "kinds": kinds_of(deltas),
        "ranks": {m: lr.rank for m, lr in sorted(deltas.lowrank.items())},
        "scale": {m: float(lr.scale) for m, lr in sorted(deltas.lowrank.items())},
        "trainer": trainer,
    }
    if deltas.sparse:
        manifest["shapes"] = {m: list(sp.shape) for m, sp in sorted(deltas.sparse.items())}
    if deltas.para:
        pools = {(p.pool, p.act) for p in deltas.para.values()}
        if len(pools) != 1:
            raise ArtifactError(f"PARA layers disagree on (pool, act): {sorted(pools)}; format 1 stores one pair")
        pool, act = pools.pop()
        manifest["para"] = {"pool": pool, "act": act}
    return manifest


def check_digests(loaded: LoadedAdapter) -> None:
    """Every digest the manifest states must match the bytes actually read."""
    stated = loaded.manifest.get("sha256") or {}
    if not isinstance(stated, dict):
        raise ArtifactError(f"{MANIFEST_FILE}: 'sha256' must be an object of file name -> digest")
    for fname, digest in stated.items():
        actual = loaded.file_sha256.get(fname)
        if actual is None:
            raise ArtifactError(f"{MANIFEST_FILE}: sha256 lists {short(fname)}, which was not read")
        if str(digest).removeprefix("sha256:") != actual:
            raise ArtifactError(f"{fname}: sha256 mismatch (manifest {short(digest, 80)}, file {actual}); the file is "
                                "corrupt or was changed after the manifest was written")


# ---------------------------------------------------------------------------------------------------------------
# The schema


def check_manifest(manifest: dict, *, max_modules: int = MAX_MODULES) -> dict:
    """adapter.json's fields checked for type and size -> the normalised manifest (a new dict); ArtifactError
    names the field. `max_modules`: the backbone's number of modules (bounds every per-module field)."""
    out: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in manifest.items():
        check = _FIELDS.get(key)
        if check is None:
            unknown[key] = value
        else:
            out[key] = check(value, f"{MANIFEST_FILE}: {key!r}", max_modules)
    if out.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{MANIFEST_FILE}: unsupported format {short(manifest.get('format'))} (expected 1)")
    if "method" not in out:
        raise ArtifactError(f"{MANIFEST_FILE}: 'method' must be a string")
    if unknown:
        check_bounded(unknown, MANIFEST_FILE, max_items=max(max_modules, MIN_LIST_ITEMS))
        check_record_size(unknown, f"{MANIFEST_FILE}: the fields {sorted(unknown)[:8]} beyond the format's")
        out.update(unknown)
    return out


def _format(value: Any, where: str, max_modules: int) -> int:
    if not is_int(value) or value != FORMAT_VERSION:
        raise ArtifactError(f"{MANIFEST_FILE}: unsupported format {short(value)} (expected 1)")
    return value


def _name(value: Any, where: str, max_modules: int) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise ArtifactError(f"{where} must be a non-empty string of at most {MAX_NAME_CHARS} characters, "
                            f"got {describe(value)}")
    return value


def _created(value: Any, where: str, max_modules: int) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise ArtifactError(f"{where} must be a string of at most {MAX_NAME_CHARS} characters, got {describe(value)}")
    return value


def _source_format(value: Any, where: str, max_modules: int) -> str:
    if value not in SOURCE_FORMATS:
        raise ArtifactError(f"{where} must be one of {SOURCE_FORMATS}, got {short(value)}")
    return value


def _base(value: Any, where: str, max_modules: int) -> dict:
    known = ("architecture", "fingerprint", "name_or_path")
    if not isinstance(value, dict) or not set(value) <= set(known):
        raise ArtifactError(f"{where} must be an object with keys among {known}, got {describe(value)}")
    for key, v in value.items():
        if not (v is None or isinstance(v, str)) or (isinstance(v, str) and len(v) > MAX_STRING_CHARS):
            raise ArtifactError(f"{where}[{key!r}] must be a string of at most {MAX_STRING_CHARS} characters, "
                                f"got {describe(v)}")
    return dict(value)


def _targets(value: Any, where: str, max_modules: int) -> list[str]:
    if not isinstance(value, list) or len(value) > max_modules:
        raise ArtifactError(f"{where} must be a list of at most {max_modules} module names, got {describe(value)}")
    for name in value:
        _module(name, where)
    return list(value)


def _kinds(value: Any, where: str, max_modules: int) -> list[str]:
    if not isinstance(value, list) or len(value) > len(KINDS) or not all(k in KINDS for k in value):
        raise ArtifactError(f"{where} must be a list of kinds among {KINDS}, got {short(value)}")
    return list(value)


def _ranks(value: Any, where: str, max_modules: int) -> dict[str, int]:
    def rank(v: Any, at: str) -> int:
        if not is_int(v) or not 0 <= v <= MAX_DIM:
            raise ArtifactError(f"{at} must be a non-negative integer, got {describe(v)}")
        return v

    return _per_module(value, where, max_modules, "module -> rank", rank)


def _scale(value: Any, where: str, max_modules: int) -> dict[str, float]:
    def scale(v: Any, at: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ArtifactError(f"{at} must be a number, got {describe(v)}")
        if not math.isfinite(float(v)) or abs(float(v)) > FLOAT32_MAX:
            raise ArtifactError(f"{at} = {short(v)} overflows float32 (the server applies scales in float32)")
        return float(v)

    return _per_module(value, where, max_modules, "module -> number", scale)


def _shapes(value: Any, where: str, max_modules: int) -> dict[str, list[int]]:
    def shape(v: Any, at: str) -> list[int]:
        if not isinstance(v, list) or len(v) != 2 or not all(is_int(d) and 1 <= d <= MAX_DIM for d in v):
            raise ArtifactError(f"{at} must be [d_out, d_in] (two positive integers), got {short(v)}")
        return list(v)

    return _per_module(value, where, max_modules, "module -> [d_out, d_in]", shape)


def _para(value: Any, where: str, max_modules: int) -> dict[str, str]:
    if (not isinstance(value, dict) or set(value) != {"pool", "act"}
            or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in value.values())):
        raise ArtifactError(f"{where} must be {{\"pool\": name, \"act\": name}}, got {short(value)}")
    return dict(value)


def _trainer(value: Any, where: str, max_modules: int) -> dict:
    if not isinstance(value, dict):
        raise ArtifactError(f"{where} must be an object (the training hyper-parameters), got {describe(value)}")
    check_bounded(value, where, max_items=max(max_modules, MIN_LIST_ITEMS))
    check_record_size(value, where)
    return value


def _sha256(value: Any, where: str, max_modules: int) -> dict[str, str]:
    files = (WEIGHTS_FILE, PEFT_WEIGHTS_FILE)
    if (not isinstance(value, dict) or not set(value) <= set(files)
            or not all(isinstance(v, str) and len(v) <= 80 for v in value.values())):
        raise ArtifactError(f"{where} must be an object of {' or '.join(files)} -> hex digest, got {short(value)}")
    return dict(value)


_FIELDS: dict[str, Callable[[Any, str, int], Any]] = {
    "format": _format, "name": _name, "method": _name, "created": _created, "source_format": _source_format,
    "base": _base, "targets": _targets, "kinds": _kinds, "ranks": _ranks, "scale": _scale, "shapes": _shapes,
    "para": _para, "trainer": _trainer, "sha256": _sha256,
}


def _per_module(value: Any, where: str, max_modules: int, what: str, check: Callable[[Any, str], Any]) -> dict:
    if not isinstance(value, dict) or len(value) > max_modules:
        raise ArtifactError(f"{where} must be an object of at most {max_modules} entries {what}, "
                            f"got {describe(value)}")
    return {_module(name, where): check(v, f"{where}[{short(name)}]") for name, v in value.items()}


def _module(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ArtifactError(f"{where}: module names must be strings, got {describe(name)}")
    try:
        parse_module_name(name)
    except ValueError as e:
        raise ArtifactError(f"{where}: {str(e)[:300]}") from None
    return name


def check_record_size(value: Any, where: str) -> None:
    size = len(json.dumps(value, separators=(",", ":")))
    if size > MAX_RECORD_BYTES:
        raise ArtifactError(f"{where}: {size} bytes of JSON; at most {MAX_RECORD_BYTES} are stored")

