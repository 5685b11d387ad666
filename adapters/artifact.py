"""The adapter artifact, format 1: read and write it, and the backbone spec it is checked against.

Format 1 is a directory holding exactly `adapter.json` (the manifest), `adapter.safetensors` and optionally
`README.md`. Tensors are named by module, in the delta vocabulary of `adapters.delta`:

| tensor                                   | shape                  | delta                                  |
| layers.{i}.{proj}.A / .B                 | (r, d_in) / (d_out, r) | LowRank, scale in manifest["scale"]    |
| layers.{i}.{proj}.rows / .cols / .values | (nnz,) int32, int32, f | Sparse, sorted by (row, col), unique   |
| layers.{i}.{q|k|v|up|ffn}_scale          | (d,)                   | Scale (ffn = the input of down_proj)   |
| para.layers.{i}.down / .up / .query      | (r, h) / (q+kv+ff, r) / (h,) | ParaLayer, manifest["para"] = {pool, act} |

The data path: upload dir (or an archive unpacked in memory) -> `load_adapter` / `load_adapter_files` (bytes
hashed, then parsed by safetensors; never pickle) -> `LoadedAdapter` (CPU tensors, the file's dtypes) -> `validate`
against the backbone's `backbone_spec` -> `adapter_to_bytes` (the normalised format-1 manifest + weights the
registry stores) -> `adapter_from_bytes` on every replica -> the server's adapter cache.

Three files, one concept each: this one (format 1, the spec helpers, the shared types), `adapters.peft_io` (PEFT
LoRA / IA3 import, PEFT LoRA export) and `adapters.validate` (what the server refuses). Both build on this module,
so this module imports them inside the functions that need them, and re-exports their public names
(`validate`, `export_peft_lora`) through a module `__getattr__`: `from adapters.artifact import validate` works.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.delta import (
    PROJECTIONS,
    SCALE_PROJECTION,
    AdapterDeltas,
    LowRank,
    ParaLayer,
    Sparse,
    module_name,
    parse_module_name,
    parse_scale_name,
)

FORMAT_VERSION = 1
MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
README_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHITECTURES = ("llama", "mistral", "qwen2")
SPEC_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")


class ArtifactError(ValueError):
    """An adapter that cannot be served as is; the message names the file, module or tensor and the problem."""


@dataclass
class LoadedAdapter:
    manifest: dict
    deltas: AdapterDeltas
    source_format: str  # "multiplex" | "peft-lora" | "peft-ia3"
    path: Path | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)  # digests of the files actually read


# ---------------------------------------------------------------------------------------------------------------
# The backbone: spec, fingerprint, shapes


def backbone_spec(cfg: Any) -> dict:
    """The shape-defining fields of a HF config (a PretrainedConfig or a config.json dict)."""
    def get(key: str) -> Any:
        return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)

    arch = get("model_type")
    if arch not in ARCHITECTURES:
        raise ArtifactError(f"unsupported backbone model_type {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    spec: dict[str, Any] = {"architecture": arch}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if get(key) is None:
            raise ArtifactError(f"backbone config lacks {key!r}")
        spec[key] = int(get(key))
    spec["num_key_value_heads"] = int(get("num_key_value_heads") or spec["num_attention_heads"])
    head_dim = get("head_dim")
    if head_dim is None:
        if spec["hidden_size"] % spec["num_attention_heads"]:
            raise ArtifactError("backbone config: hidden_size is not a multiple of num_attention_heads")
        head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    spec["head_dim"] = int(head_dim)
    return spec


def fingerprint(spec: dict) -> str:
    """'sha256:' + hex digest of the canonical JSON (sorted keys, no spaces) of the spec's SPEC_KEYS."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ArtifactError(f"backbone spec lacks {missing}")
    canon = {k: (spec[k] if k == "architecture" else int(spec[k])) for k in SPEC_KEYS}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def module_shapes(spec: dict) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every `layers.{i}.{proj}`."""
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    q_dim = spec["num_attention_heads"] * spec["head_dim"]
    kv_dim = spec["num_key_value_heads"] * spec["head_dim"]
    per_proj = {"q_proj": (q_dim, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
                "o_proj": (hidden, q_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                "down_proj": (hidden, inter)}
    return {module_name(i, p): per_proj[p] for i in range(spec["num_hidden_layers"]) for p in PROJECTIONS}


def scale_lengths(spec: dict) -> dict[str, int]:
    """Length of a Scale vector per target: q (heads*hd), k/v (kv_heads*hd), up/ffn (intermediate)."""
    kv_dim = spec["num_key_value_heads"] * spec["head_dim"]
    return {"q": spec["num_attention_heads"] * spec["head_dim"], "k": kv_dim, "v": kv_dim,
            "up": spec["intermediate_size"], "ffn": spec["intermediate_size"]}


def para_up_rows(spec: dict) -> int:
    lengths = scale_lengths(spec)
    return lengths["q"] + lengths["v"] + lengths["up"]  # [l_q; l_v; l_u]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    from adapters.validate import validate_deltas  # adapters.validate builds on this module

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
    write_atomic(out / WEIGHTS_FILE, data)
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def kinds_of(deltas: AdapterDeltas) -> list[str]:
    return sorted(k for k in ("lowrank", "sparse", "scale", "para") if getattr(deltas, k))


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
                       max_rank: int | None = None) -> LoadedAdapter:
    """An adapter from its files, name -> bytes (a directory, or an archive unpacked in memory).

    `name` names a PEFT adapter (whose config has no name); `where` prefixes the messages about the file set.
    Validated against `spec` (and `max_rank`) when a spec is given.
    """
    names = set(files)
    if MANIFEST_FILE in names and WEIGHTS_FILE in names:
        loaded = _load_format1(files, spec, where)
    elif PEFT_CONFIG_FILE in names and PEFT_WEIGHTS_FILE in names:
        from adapters.peft_io import load_peft  # adapters.peft_io builds on this module

        loaded = load_peft(files[PEFT_CONFIG_FILE], files[PEFT_WEIGHTS_FILE], name=name)
    elif any(n.endswith(PICKLE_SUFFIXES) for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        raise ArtifactError(f"{where}: only pickle weights {pickles}; pickle files are refused (they can run code). "
                            "Convert them to safetensors (e.g. PEFT save_pretrained(safe_serialization=True)).")
    else:
        raise ArtifactError(f"{where}: no adapter found: expected {MANIFEST_FILE} + {WEIGHTS_FILE} (format 1) "
                            f"or {PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (PEFT)")
    if spec is not None:
        from adapters.validate import validate

        validate(loaded, spec, max_rank=max_rank)
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


def parse_json(data: bytes, fname: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{fname}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{fname}: expected a JSON object")
    return value


def parse_tensors(data: bytes, fname: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{fname}: not a valid safetensors file ({e})") from None


def _load_format1(files: Mapping[str, bytes], spec: dict | None, where: str) -> LoadedAdapter:
    stray = sorted(set(files) - {MANIFEST_FILE, WEIGHTS_FILE, README_FILE})
    if stray:
        why = " (pickle files are refused)" if any(n.endswith(PICKLE_SUFFIXES) for n in stray) else ""
        raise ArtifactError(f"{where}: unexpected files {stray} in a format-1 artifact{why}; "
                            f"allowed: {MANIFEST_FILE}, {WEIGHTS_FILE}, {README_FILE}")
    return _format1_from_bytes(parse_json(files[MANIFEST_FILE], MANIFEST_FILE), files[WEIGHTS_FILE], spec)


def _format1_from_bytes(manifest: dict, data: bytes, spec: dict | None) -> LoadedAdapter:
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{MANIFEST_FILE}: unsupported format {manifest.get('format')!r} (expected 1)")
    if not isinstance(manifest.get("method"), str):
        raise ArtifactError(f"{MANIFEST_FILE}: 'method' must be a string")
    tensors = parse_tensors(data, WEIGHTS_FILE)
    loaded = LoadedAdapter(manifest, _deltas_from_format1(tensors, manifest, spec), "multiplex", None,
                           {WEIGHTS_FILE: sha256_hex(data)})
    check_digests(loaded)
    _check_manifest_summary(loaded)
    return loaded


LAYER_PATTERN = r"(0|[1-9][0-9]*)"
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
            raise ArtifactError(f"{WEIGHTS_FILE}: unknown tensor name {tname!r}")
    return modules, scales, para


def parse_name(parser, name: str, tname: str):
    try:
        return parser(name)
    except ValueError as e:
        raise ArtifactError(f"tensor {tname!r}: {e}") from None


def _deltas_from_format1(tensors: dict[str, torch.Tensor], manifest: dict, spec: dict | None) -> AdapterDeltas:
    modules, scales, para = _group_format1(tensors)
    deltas = AdapterDeltas(scale=scales)
    ranks, scale_of = manifest.get("ranks") or {}, manifest.get("scale") or {}
    # Sparse shapes: the manifest's (validate then compares them with the backbone), else the spec's.
    shapes = dict(module_shapes(spec)) if spec is not None else {}
    shapes.update({m: tuple(s) for m, s in (manifest.get("shapes") or {}).items()})
    for name, parts in sorted(modules.items()):
        if set(parts) == {"A", "B"}:
            if name not in scale_of or name not in ranks:
                raise ArtifactError(f"{MANIFEST_FILE}: LowRank module {name} lacks its 'ranks' or 'scale' entry")
            deltas.lowrank[name] = LowRank(parts["A"], parts["B"], float(scale_of[name]))
            if ranks[name] != deltas.lowrank[name].rank:
                raise ArtifactError(f"{name}: manifest rank {ranks[name]} but A has {deltas.lowrank[name].rank} rows")
        elif set(parts) == {"rows", "cols", "values"}:
            if name not in shapes:
                raise ArtifactError(f"{name}: Sparse module needs its shape (manifest 'shapes' or a backbone spec)")
            deltas.sparse[name] = Sparse(parts["rows"], parts["cols"], parts["values"], tuple(shapes[name]))
        else:
            raise ArtifactError(f"{name}: incomplete tensors {sorted(parts)} "
                                "(LowRank needs A and B; Sparse needs rows, cols and values)")
    extra = sorted(set(ranks) - set(deltas.lowrank))
    if extra:
        raise ArtifactError(f"{MANIFEST_FILE}: 'ranks' names modules without A/B tensors: {extra}")
    for layer, parts in sorted(para.items()):
        if "down" not in parts or "up" not in parts:
            raise ArtifactError(f"para.layers.{layer}: needs both down and up, got {sorted(parts)}")
        cfg = manifest.get("para") or {}
        if not isinstance(cfg.get("pool"), str) or not isinstance(cfg.get("act"), str):
            raise ArtifactError(f"{MANIFEST_FILE}: PARA tensors present but 'para' lacks pool/act strings")
        deltas.para[layer] = ParaLayer(cfg["pool"], parts["down"], parts["up"], parts.get("query"), cfg["act"])
    return deltas


def _check_manifest_summary(loaded: LoadedAdapter) -> None:
    """targets / kinds, when present, must describe the tensors actually stored."""
    for key, actual in (("targets", targets_of(loaded.deltas)), ("kinds", kinds_of(loaded.deltas))):
        stated = loaded.manifest.get(key)
        if stated is not None and sorted(stated) != actual:
            raise ArtifactError(f"{MANIFEST_FILE}: '{key}' {sorted(stated)} does not match the tensors ({actual})")


def check_digests(loaded: LoadedAdapter) -> None:
    """Every digest the manifest states must match the bytes actually read."""
    stated = loaded.manifest.get("sha256") or {}
    for fname, digest in stated.items():
        actual = loaded.file_sha256.get(fname)
        if actual is None:
            raise ArtifactError(f"{MANIFEST_FILE}: sha256 lists {fname!r}, which was not read")
        if str(digest).removeprefix("sha256:") != actual:
            raise ArtifactError(f"{fname}: sha256 mismatch (manifest {digest}, file {actual}); the file is corrupt "
                                "or was changed after the manifest was written")


# ---------------------------------------------------------------------------------------------------------------
# The registry's form: one normalised format-1 manifest + the adapter.safetensors bytes


def adapter_to_bytes(loaded: LoadedAdapter) -> tuple[dict, bytes]:
    """-> (format-1 manifest, adapter.safetensors bytes), whatever format `loaded` came from.

    The manifest keeps the original's fields (name, method, base, trainer, created, ...), has its summary
    (targets, kinds, ranks, scale, shapes, para) recomputed from the deltas, records `source_format`, and states
    the sha256 of the bytes returned. `adapter_from_bytes(*adapter_to_bytes(x))` has x's deltas, bit for bit.
    """
    data = st_save(tensors_of(loaded.deltas))
    derived = manifest_of(loaded.deltas, method=str(loaded.manifest.get("method") or loaded.source_format),
                          name=str(loaded.manifest.get("name") or "adapter"),
                          trainer=loaded.manifest.get("trainer") or {})
    manifest = {k: v for k, v in loaded.manifest.items() if k not in ("shapes", "para")}
    manifest.update(derived)
    manifest.setdefault("source_format", loaded.source_format)
    manifest["sha256"] = {WEIGHTS_FILE: sha256_hex(data)}
    return manifest, data


def adapter_from_bytes(manifest: dict, blob: bytes, spec: dict | None = None) -> LoadedAdapter:
    """The inverse of `adapter_to_bytes`: checks the blob's sha256 against the manifest, then parses and (given a
    spec) validates. Raises ArtifactError on any mismatch."""
    stated = (manifest.get("sha256") or {}).get(WEIGHTS_FILE)
    if stated is None:
        raise ArtifactError(f"{MANIFEST_FILE}: no sha256 for {WEIGHTS_FILE}; cannot check the weights")
    loaded = _format1_from_bytes(manifest, blob, spec)
    if spec is not None:
        from adapters.validate import validate

        validate(loaded, spec)
    return loaded


# Public names of the modules that build on this one, importable from here as before the split.
_REEXPORTS = {"validate": "adapters.validate", "validate_deltas": "adapters.validate",
              "export_peft_lora": "adapters.peft_io", "load_peft": "adapters.peft_io",
              "_exact_alpha": "adapters.peft_io"}


def __getattr__(name: str) -> Any:
    if name in _REEXPORTS:
        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
