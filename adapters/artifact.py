"""The adapter artifact, format 1: write it, read it (or a PEFT directory) from a directory or an archive's files,
and convert it to and from the form the registry stores.

Format 1 is a directory holding exactly `adapter.json` (the manifest) and `adapter.safetensors` (optionally
`README.md`). Tensors are named by module, in the delta vocabulary of `adapters.delta`:

| tensor                                   | shape                  | delta                                  |
| layers.{i}.{proj}.A / .B                 | (r, d_in) / (d_out, r) | LowRank, scale in manifest["scale"]    |
| layers.{i}.{proj}.rows / .cols / .values | (nnz,) int32, int32, f | Sparse, sorted by (row, col), unique   |
| layers.{i}.{q|k|v|up|ffn}_scale          | (d,)                   | Scale (ffn = the input of down_proj)   |
| para.layers.{i}.down / .up / .query      | (r, h) / (q+kv+ff, r) / (h,) | ParaLayer, manifest["para"] = {pool, act} |

The data path: upload dir (or an archive unpacked in memory) -> `load_adapter` / `load_adapter_files`: the JSON
file first (bounded parse, `adapters.files`; schema, `adapters.manifest` or `adapters.peft_io`), then the weights
(header checked, then parsed by safetensors; never pickle) -> `LoadedAdapter` (CPU tensors, the file's dtypes) ->
`validate` against the backbone's spec, `max_rank` and serving dtype (`adapters.validate`) -> `adapter_to_bytes`
(the normalised format-1 manifest + weights the registry stores) -> `adapter_from_bytes` on every replica -> the
server's adapter cache.

The package imports one way: delta, errors -> spec, files -> manifest -> validate -> peft_patterns, peft_io ->
artifact (this module, on top).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from adapters.delta import AdapterDeltas, LowRank, ParaLayer, Sparse, parse_module_name, parse_scale_name
from adapters.errors import ArtifactError
from adapters.files import (
    LAYER_PATTERN,
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    PICKLE_SUFFIXES,
    README_FILE,
    WEIGHTS_FILE,
    parse_json,
    parse_name,
    parse_tensors,
    sha256_hex,
    short,
    write_atomic,
)
from adapters.manifest import (
    MAX_MODULES,
    LoadedAdapter,
    check_digests,
    check_manifest,
    kinds_of,
    manifest_of,
    targets_of,
)
from adapters.peft_io import load_peft
from adapters.spec import fingerprint, module_shapes, num_modules
from adapters.validate import validate, validate_deltas

_INT32 = torch.iinfo(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Format 1: write


def save_artifact(out_dir: str | os.PathLike, deltas: AdapterDeltas, *, method: str, spec: dict,
                  name: str | None = None, trainer: dict | None = None, extra: dict | None = None) -> Path:
    """Validate `deltas` against `spec`, then write adapter.safetensors and adapter.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST_FILE, WEIGHTS_FILE, README_FILE))
    if stray:
        raise ArtifactError(f"{out}: refusing to write an artifact into a directory that holds {stray}")
    if not method:
        raise ArtifactError("save_artifact: method must be a non-empty string")
    validate_deltas(deltas, spec)
    data = st_save(tensors_of(deltas))
    manifest = manifest_of(deltas, method=method, name=name or out.name, trainer=trainer or {})
    manifest["base"] = {"architecture": spec["architecture"], "fingerprint": fingerprint(spec)}
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["sha256"] = {WEIGHTS_FILE: sha256_hex(data)}
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ArtifactError(f"save_artifact: extra key {key!r} would overwrite a manifest field")
        manifest[key] = value
    manifest = check_manifest(manifest, max_modules=num_modules(spec))  # what an upload of it will accept
    write_atomic(out / WEIGHTS_FILE, data)
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return out


def tensors_of(deltas: AdapterDeltas) -> dict[str, torch.Tensor]:
    """Tensor name -> contiguous CPU tensor (cloned: safetensors refuses tensors that share storage)."""
    out: dict[str, torch.Tensor] = {}
    for name, lr in deltas.lowrank.items():
        out[f"{name}.A"], out[f"{name}.B"] = lr.A, lr.B
    for name, sp in deltas.sparse.items():
        out[f"{name}.rows"], out[f"{name}.cols"], out[f"{name}.values"] = sp.rows, sp.cols, sp.values
    for name, vec in deltas.scale.items():
        out[f"{name}_scale"] = vec
    for layer, p in deltas.para.items():
        out[f"para.layers.{layer}.down"], out[f"para.layers.{layer}.up"] = p.w_down, p.w_up
        if p.pool_query is not None:
            out[f"para.layers.{layer}.query"] = p.pool_query
    return {k: t.detach().to("cpu").contiguous().clone() for k, t in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Loading: detection and format 1


def load_adapter(path: str | os.PathLike, spec: dict | None = None) -> LoadedAdapter:
    """Load a format-1 or PEFT (LoRA, IA3) directory; `validate` against `spec` when one is given."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (unpack an archive first)")
    loaded = load_adapter_files(_DirFiles(root), spec, name=root.name, where=str(root))
    loaded.path = root
    return loaded


def load_adapter_files(files: Mapping[str, bytes], spec: dict | None = None, *, name: str, where: str,
                       max_rank: int | None = None, dtype: torch.dtype | str | None = None) -> LoadedAdapter:
    """An adapter from its files, name -> bytes (a directory, or an archive unpacked in memory).

    `name` names a PEFT adapter (whose config has no name); `where` prefixes the messages about the file set.
    Validated against `spec` (with `max_rank` and the serving `dtype`) when a spec is given.
    """
    max_modules = num_modules(spec) if spec is not None else MAX_MODULES
    names = set(files)
    if MANIFEST_FILE in names and WEIGHTS_FILE in names:
        loaded = _load_format1(files, spec, where, max_modules)
    elif PEFT_CONFIG_FILE in names and PEFT_WEIGHTS_FILE in names:
        loaded = load_peft(files[PEFT_CONFIG_FILE], files[PEFT_WEIGHTS_FILE], name=name, max_modules=max_modules)
    elif any(n.endswith(PICKLE_SUFFIXES) for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        raise ArtifactError(f"{where}: only pickle weights {pickles}; pickle files are refused (they can run code). "
                            "Convert them to safetensors (e.g. PEFT save_pretrained(safe_serialization=True)).")
    else:
        raise ArtifactError(f"{where}: no adapter found: expected {MANIFEST_FILE} + {WEIGHTS_FILE} (format 1) "
                            f"or {PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (PEFT)")
    if spec is not None:
        validate(loaded, spec, max_rank=max_rank, dtype=dtype)
    return loaded


class _DirFiles(Mapping):
    """A directory's entries as a name -> bytes mapping, read on access (only the files a format needs)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names = sorted(p.name for p in root.iterdir())

    def __getitem__(self, name: str) -> bytes:
        if name not in self.names:
            raise KeyError(name)
        try:
            return (self.root / name).read_bytes()
        except OSError as e:
            raise ArtifactError(f"{name}: cannot be read ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _load_format1(files: Mapping[str, bytes], spec: dict | None, where: str, max_modules: int) -> LoadedAdapter:
    stray = sorted(set(files) - {MANIFEST_FILE, WEIGHTS_FILE, README_FILE})
    if stray:
        why = " (pickle files are refused)" if any(n.endswith(PICKLE_SUFFIXES) for n in stray) else ""
        raise ArtifactError(f"{where}: unexpected files {stray} in a format-1 artifact{why}; "
                            f"allowed: {MANIFEST_FILE}, {WEIGHTS_FILE}, {README_FILE}")
    manifest = check_manifest(parse_json(files[MANIFEST_FILE], MANIFEST_FILE), max_modules=max_modules)
    return _format1_from_bytes(manifest, files[WEIGHTS_FILE], spec)


def _format1_from_bytes(manifest: dict, data: bytes, spec: dict | None) -> LoadedAdapter:
    """`manifest`: already through `check_manifest`."""
    tensors = parse_tensors(data, WEIGHTS_FILE)
    loaded = LoadedAdapter(manifest, _deltas_from_format1(tensors, manifest, spec), "multiplex", None,
                           {WEIGHTS_FILE: sha256_hex(data)})
    check_digests(loaded)
    _check_manifest_summary(loaded)
    return loaded


# our own patterns: anchored, no nested quantifiers, so linear in a tensor name (whose length the header bounds)
_MODULE_TENSOR = re.compile(rf"^(layers\.{LAYER_PATTERN}\.[a-z_]+)\.(A|B|rows|cols|values)$")
_SCALE_TENSOR = re.compile(rf"^(layers\.{LAYER_PATTERN}\.[a-z]+)_scale$")
_PARA_TENSOR = re.compile(rf"^para\.layers\.{LAYER_PATTERN}\.(down|up|query)$")


def _group_format1(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Tensor names -> {module: {part: t}}, {scale key: t}, {layer: {part: t}}; unknown names raise."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    scales: dict[str, torch.Tensor] = {}
    para: dict[int, dict[str, torch.Tensor]] = {}
    for tname, t in tensors.items():
        if m := _MODULE_TENSOR.match(tname):
            parse_name(parse_module_name, m.group(1), tname)
            modules.setdefault(m.group(1), {})[m.group(3)] = t
        elif m := _SCALE_TENSOR.match(tname):
            parse_name(parse_scale_name, m.group(1), tname)
            scales[m.group(1)] = t
        elif m := _PARA_TENSOR.match(tname):
            para.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            raise ArtifactError(f"{WEIGHTS_FILE}: unknown tensor name {short(tname)}")
    return modules, scales, para


def _deltas_from_format1(tensors: dict[str, torch.Tensor], manifest: dict, spec: dict | None) -> AdapterDeltas:
    modules, scales, para = _group_format1(tensors)
    deltas = AdapterDeltas(scale=scales)
    ranks, scale_of = manifest.get("ranks") or {}, manifest.get("scale") or {}
    # Sparse shapes: the manifest's (validate then compares them with the backbone), else the spec's.
    shapes = dict(module_shapes(spec)) if spec is not None else {}
    shapes.update({m: tuple(s) for m, s in (manifest.get("shapes") or {}).items()})
    for name, parts in sorted(modules.items()):
        if set(parts) == {"A", "B"}:
            if parts["A"].ndim != 2 or parts["B"].ndim != 2:
                raise ArtifactError(f"{name}: A and B must be matrices, got A {tuple(parts['A'].shape)}, "
                                    f"B {tuple(parts['B'].shape)}")
            if name not in scale_of or name not in ranks:
                raise ArtifactError(f"{MANIFEST_FILE}: LowRank module {name} lacks its 'ranks' or 'scale' entry")
            deltas.lowrank[name] = LowRank(parts["A"], parts["B"], float(scale_of[name]))
            if ranks[name] != deltas.lowrank[name].rank:
                raise ArtifactError(f"{name}: manifest rank {ranks[name]} but A has {deltas.lowrank[name].rank} rows")
        elif set(parts) == {"rows", "cols", "values"}:
            if name not in shapes:
                raise ArtifactError(f"{name}: Sparse module needs its shape (manifest 'shapes' or a backbone spec)")
            rows, cols = (_indices32(parts[p], f"{name}.{p}") for p in ("rows", "cols"))
            deltas.sparse[name] = Sparse(rows, cols, parts["values"], tuple(shapes[name]))
        else:
            raise ArtifactError(f"{name}: incomplete tensors {sorted(parts)} "
                                "(LowRank needs A and B; Sparse needs rows, cols and values)")
    extra = sorted(set(ranks) - set(deltas.lowrank))
    if extra:
        raise ArtifactError(f"{MANIFEST_FILE}: 'ranks' names modules without A/B tensors: {extra[:8]}")
    cfg = manifest.get("para")
    if para and cfg is None:
        raise ArtifactError(f"{MANIFEST_FILE}: PARA tensors present but no 'para' {{pool, act}} entry")
    for layer, parts in sorted(para.items()):
        if "down" not in parts or "up" not in parts:
            raise ArtifactError(f"para.layers.{layer}: needs both down and up, got {sorted(parts)}")
        deltas.para[layer] = ParaLayer(cfg["pool"], parts["down"], parts["up"], parts.get("query"), cfg["act"])
    return deltas


def _indices32(t: torch.Tensor, tname: str) -> torch.Tensor:
    """Sparse indices as int32 (the kernels' type); int64 in the file is narrowed when every index fits."""
    if t.dtype != torch.int64:
        return t  # validate refuses anything but int32
    if t.numel() and (int(t.min()) < _INT32.min or int(t.max()) > _INT32.max):
        raise ArtifactError(f"{tname}: int64 indices beyond the int32 range")
    return t.to(torch.int32)


def _check_manifest_summary(loaded: LoadedAdapter) -> None:
    """targets / kinds, when present, must describe the tensors actually stored."""
    for key, actual in (("targets", targets_of(loaded.deltas)), ("kinds", kinds_of(loaded.deltas))):
        stated = loaded.manifest.get(key)
        if stated is not None and sorted(stated) != actual:
            raise ArtifactError(f"{MANIFEST_FILE}: '{key}' {short(sorted(stated), 200)} does not match the tensors "
                                f"({short(actual, 200)})")


# ---------------------------------------------------------------------------------------------------------------
# The registry's form: one normalised format-1 manifest + the adapter.safetensors bytes


def adapter_to_bytes(loaded: LoadedAdapter) -> tuple[dict, bytes]:
    """-> (format-1 manifest, adapter.safetensors bytes), whatever format `loaded` came from.

    The manifest keeps the original's fields (name, method, base, trainer, created, ...), has its summary
    (targets, kinds, ranks, scale, shapes, para) recomputed from the deltas, records `source_format`, states
    the sha256 of the bytes returned, and passes `check_manifest` (so what the registry stores is small and typed).
    `adapter_from_bytes(*adapter_to_bytes(x))` has x's deltas, bit for bit.
    """
    data = st_save(tensors_of(loaded.deltas))
    derived = manifest_of(loaded.deltas, method=str(loaded.manifest.get("method") or loaded.source_format),
                          name=str(loaded.manifest.get("name") or "adapter"),
                          trainer=loaded.manifest.get("trainer") or {})
    manifest = {k: v for k, v in loaded.manifest.items() if k not in ("shapes", "para")}
    manifest.update(derived)
    manifest.setdefault("source_format", loaded.source_format)
    manifest["sha256"] = {WEIGHTS_FILE: sha256_hex(data)}
    return check_manifest(manifest), data


def adapter_from_bytes(manifest: dict, blob: bytes, spec: dict | None = None) -> LoadedAdapter:
    """The inverse of `adapter_to_bytes`: checks the manifest's schema and the blob's sha256 against it, then parses
    and (given a spec) validates. Raises ArtifactError on any mismatch."""
    manifest = check_manifest(manifest, max_modules=num_modules(spec) if spec is not None else MAX_MODULES)
    if WEIGHTS_FILE not in (manifest.get("sha256") or {}):
        raise ArtifactError(f"{MANIFEST_FILE}: no sha256 for {WEIGHTS_FILE}; cannot check the weights")
    loaded = _format1_from_bytes(manifest, blob, spec)
    if spec is not None:
        validate(loaded, spec)
    return loaded
