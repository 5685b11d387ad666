"""The adapter artifact: read, write and validate format 1; import PEFT LoRA and IA3; export PEFT LoRA.

Format 1 is a directory holding exactly `adapter.json` (the manifest), `adapter.safetensors` and optionally
`README.md`. Tensors are named by module, in the delta vocabulary of `adapters.delta`:

| tensor                                   | shape                  | delta                                  |
| layers.{i}.{proj}.A / .B                 | (r, d_in) / (d_out, r) | LowRank, scale in manifest["scale"]    |
| layers.{i}.{proj}.rows / .cols / .values | (nnz,) int32, int32, f | Sparse, sorted by (row, col), unique   |
| layers.{i}.{q|k|v|up|ffn}_scale          | (d,)                   | Scale (ffn = the input of down_proj)   |
| para.layers.{i}.down / .up / .query      | (r, h) / (q+kv+ff, r) / (h,) | ParaLayer, manifest["para"] = {pool, act} |

The data path: upload dir -> `load_adapter` (bytes hashed, then parsed by safetensors; never pickle) ->
`LoadedAdapter` (CPU tensors, the file's dtypes) -> `validate` against the backbone's `backbone_spec` -> the server's
adapter cache. PEFT directories (`adapter_config.json` + `adapter_model.safetensors`) are converted on load; any
feature the vocabulary cannot express exactly (DoRA, biases, modules_to_save, embeddings, ...) is refused by name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
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
    scale_name,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
README_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHITECTURES = ("llama", "mistral", "qwen2")
PARA_POOLS = ("attention", "mean", "last")
SPEC_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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


def _para_up_rows(spec: dict) -> int:
    lengths = scale_lengths(spec)
    return lengths["q"] + lengths["v"] + lengths["up"]  # [l_q; l_v; l_u]


def _sha256(data: bytes) -> str:
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
    _validate_deltas(deltas, spec)
    data = st_save(_tensors_of(deltas))
    manifest = _manifest_of(deltas, method=method, name=name or out.name, trainer=trainer or {})
    manifest["base"] = {"architecture": spec["architecture"], "fingerprint": fingerprint(spec)}
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["sha256"] = {WEIGHTS_FILE: _sha256(data)}
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ArtifactError(f"save_artifact: extra key {key!r} would overwrite a manifest field")
        manifest[key] = value
    _write_atomic(out / WEIGHTS_FILE, data)
    _write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tensors_of(deltas: AdapterDeltas) -> dict[str, torch.Tensor]:
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


def _kinds_of(deltas: AdapterDeltas) -> list[str]:
    return sorted(k for k in ("lowrank", "sparse", "scale", "para") if getattr(deltas, k))


def _targets_of(deltas: AdapterDeltas) -> list[str]:
    """Every projection module that the adapter changes (Scale and PARA name the projection they multiply)."""
    targets = set(deltas.lowrank) | set(deltas.sparse)
    for key in deltas.scale:
        layer, target = parse_scale_name(key)
        targets.add(module_name(layer, SCALE_PROJECTION[target]))
    for layer in deltas.para:
        targets |= {module_name(layer, p) for p in ("q_proj", "v_proj", "up_proj")}
    return sorted(targets)


def _manifest_of(deltas: AdapterDeltas, *, method: str, name: str, trainer: dict) -> dict:
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION, "name": name, "method": method,
        "targets": _targets_of(deltas), "kinds": _kinds_of(deltas),
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
    names = {p.name for p in root.iterdir()}
    if MANIFEST_FILE in names and WEIGHTS_FILE in names:
        loaded = _load_format1(root, names, spec)
    elif PEFT_CONFIG_FILE in names and PEFT_WEIGHTS_FILE in names:
        loaded = _load_peft(root)
    elif any(n.endswith(PICKLE_SUFFIXES) for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        raise ArtifactError(f"{root}: only pickle weights {pickles}; pickle files are refused (they can run code). "
                            "Convert them to safetensors (e.g. PEFT save_pretrained(safe_serialization=True)).")
    else:
        raise ArtifactError(f"{root}: no adapter found: expected {MANIFEST_FILE} + {WEIGHTS_FILE} (format 1) "
                            f"or {PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (PEFT)")
    if spec is not None:
        validate(loaded, spec)
    return loaded


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path.name}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path.name}: expected a JSON object")
    return value


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    data = path.read_bytes()
    try:
        return st_load(data), _sha256(data)
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{path.name}: not a valid safetensors file ({e})") from None


def _load_format1(root: Path, names: set[str], spec: dict | None) -> LoadedAdapter:
    stray = sorted(names - {MANIFEST_FILE, WEIGHTS_FILE, README_FILE})
    if stray:
        why = " (pickle files are refused)" if any(n.endswith(PICKLE_SUFFIXES) for n in stray) else ""
        raise ArtifactError(f"{root}: unexpected files {stray} in a format-1 artifact{why}; "
                            f"allowed: {MANIFEST_FILE}, {WEIGHTS_FILE}, {README_FILE}")
    manifest = _read_json(root / MANIFEST_FILE)
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{MANIFEST_FILE}: unsupported format {manifest.get('format')!r} (expected 1)")
    if not isinstance(manifest.get("method"), str):
        raise ArtifactError(f"{MANIFEST_FILE}: 'method' must be a string")
    tensors, digest = _read_tensors(root / WEIGHTS_FILE)
    loaded = LoadedAdapter(manifest, _deltas_from_format1(tensors, manifest, spec), "multiplex", root,
                           {WEIGHTS_FILE: digest})
    _check_digests(loaded)
    _check_manifest_summary(loaded)
    return loaded


_LAYER = r"(0|[1-9][0-9]*)"
_MODULE_TENSOR = re.compile(rf"^(layers\.{_LAYER}\.[a-z_]+)\.(A|B|rows|cols|values)$")
_SCALE_TENSOR = re.compile(rf"^(layers\.{_LAYER}\.[a-z]+)_scale$")
_PARA_TENSOR = re.compile(rf"^para\.layers\.{_LAYER}\.(down|up|query)$")


def _group_format1(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Tensor names -> {module: {part: t}}, {scale key: t}, {layer: {part: t}}; unknown names raise."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    scales: dict[str, torch.Tensor] = {}
    para: dict[int, dict[str, torch.Tensor]] = {}
    for tname, t in tensors.items():
        if m := _MODULE_TENSOR.match(tname):
            _parse(parse_module_name, m.group(1), tname)
            modules.setdefault(m.group(1), {})[m.group(3)] = t
        elif m := _SCALE_TENSOR.match(tname):
            _parse(parse_scale_name, m.group(1), tname)
            scales[m.group(1)] = t
        elif m := _PARA_TENSOR.match(tname):
            para.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            raise ArtifactError(f"{WEIGHTS_FILE}: unknown tensor name {tname!r}")
    return modules, scales, para


def _parse(parser, name: str, tname: str):
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
    for key, actual in (("targets", _targets_of(loaded.deltas)), ("kinds", _kinds_of(loaded.deltas))):
        stated = loaded.manifest.get(key)
        if stated is not None and sorted(stated) != actual:
            raise ArtifactError(f"{MANIFEST_FILE}: '{key}' {sorted(stated)} does not match the tensors ({actual})")


def _check_digests(loaded: LoadedAdapter) -> None:
    stated = loaded.manifest.get("sha256") or {}
    for fname, digest in stated.items():
        actual = loaded.file_sha256.get(fname)
        if actual is None:
            raise ArtifactError(f"{MANIFEST_FILE}: sha256 lists {fname!r}, which was not read")
        if str(digest).removeprefix("sha256:") != actual:
            raise ArtifactError(f"{fname}: sha256 mismatch (manifest {digest}, file {actual}); the file is corrupt "
                                "or was changed after the manifest was written")


# ---------------------------------------------------------------------------------------------------------------
# PEFT import

# e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...q_proj.lora_A.default.weight, ...ia3_l
_PEFT_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?P<key>(?:model\.)?layers\.(?P<layer>{_LAYER})\.(?P<block>self_attn|mlp)"
    r"\.(?P<proj>[a-z_]+))\.(?P<part>lora_A|lora_B|ia3_l)(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$")
# LoraConfig fields whose non-default values change the forward in ways the delta vocabulary cannot express.
_LORA_REFUSED = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                 "layer_replication", "alora_invocation_tokens", "use_qalora", "velora_config", "monteclora_config",
                 "use_bdlora", "arrow_config", "kasa_config")
# init_lora_weights values that rewrite the base weights (the adapter is relative to a residual model).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _load_peft(root: Path) -> LoadedAdapter:
    config = _read_json(root / PEFT_CONFIG_FILE)
    tensors, digest = _read_tensors(root / PEFT_WEIGHTS_FILE)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        deltas, fmt, method = _peft_lora_deltas(config, tensors), "peft-lora", "lora"
    elif peft_type == "IA3":
        deltas, fmt, method = _peft_ia3_deltas(config, tensors), "peft-ia3", "ia3"
    else:
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported "
                            "(supported: LORA, IA3)")
    manifest = _manifest_of(deltas, method=method, name=root.name, trainer={"peft": config})
    manifest["base"] = {"name_or_path": config.get("base_model_name_or_path")}
    manifest["sha256"] = {PEFT_WEIGHTS_FILE: digest}
    return LoadedAdapter(manifest, deltas, fmt, root, {PEFT_WEIGHTS_FILE: digest})


def _peft_tensors(tensors: dict[str, torch.Tensor], config: dict) -> dict[tuple[str, str], torch.Tensor]:
    """{(PEFT module key, part): tensor}; any tensor that is not a supported projection's adapter raises."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    unknown, adapters = [], set()
    for tname, t in tensors.items():
        m = _PEFT_KEY.match(tname)
        if m is None or m["proj"] not in PROJECTIONS:
            unknown.append(tname)
            continue
        if (m["block"] == "self_attn") != (m["proj"] in ATTENTION_PROJECTIONS):
            unknown.append(tname)
            continue
        if not _peft_targets(config, m["key"]):
            raise ArtifactError(f"{tname}: module {m['key']} is not selected by the config's target_modules "
                                f"{config.get('target_modules')!r}")
        adapters.add(m["adapter"])
        out[(m["key"], m["part"])] = t
    if unknown:
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: unsupported tensors {sorted(unknown)[:8]}"
                            f"{' ...' if len(unknown) > 8 else ''}; only q/k/v/o/gate/up/down projections "
                            "of the decoder layers can be served")
    if len(adapters) > 1:
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: holds several adapters {sorted(a or '' for a in adapters)}")
    return out


def _module_of_peft_key(key: str) -> str:
    m = _PEFT_KEY.match(key + ".lora_A")
    return module_name(int(m["layer"]), m["proj"])


def _peft_targets(config: dict, key: str) -> bool:
    """PEFT's check_target_module_exists (tuners_utils.py) for a module key like 'model.layers.0.mlp.up_proj'."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        found = True  # PEFT resolved the defaults when it created the adapter; the tensors say what was chosen
    elif isinstance(targets, str):
        found = re.fullmatch(targets, key) is not None
    else:
        found = key in targets or any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if not found or layers is None or layers == []:
        return found
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        if m := re.match(regex, key):
            idx = int(m["idx"])
            return idx == layers if isinstance(layers, int) else idx in layers
    return False


def _pattern_value(patterns: dict, key: str, default: Any) -> Any:
    """PEFT's get_pattern_key (utils/other.py): the first pattern p with re.match(rf'(.*\\.)?({p})$', key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def _check_lora_config(config: dict) -> None:
    problems = [f"{f}={config[f]!r}" for f in _LORA_REFUSED if config.get(f)]
    if config.get("bias") not in (None, "none"):
        problems.append(f"bias={config['bias']!r} (trained biases)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r} (weights relative to a rewritten base; save with PEFT's "
                        "path_initial_model_for_weight_conversion to get a plain LoRA)")
    if problems:
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: unsupported PEFT LoRA features: {'; '.join(problems)}")


def _peft_lora_deltas(config: dict, tensors: dict[str, torch.Tensor]) -> AdapterDeltas:
    _check_lora_config(config)
    parts = _peft_tensors(tensors, config)
    if any(part == "ia3_l" for _, part in parts):
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: IA3 tensors in a LORA adapter")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    deltas = AdapterDeltas()
    for key in sorted({k for k, _ in parts}):
        A, B = parts.get((key, "lora_A")), parts.get((key, "lora_B"))
        if A is None or B is None:
            raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: module {key} has only one of lora_A / lora_B")
        r = int(_pattern_value(rank_pattern, key, config.get("r", 8)))
        alpha = float(_pattern_value(alpha_pattern, key, config.get("lora_alpha", 8)))
        if A.ndim != 2 or A.shape[0] != r or B.ndim != 2 or B.shape[1] != r:
            raise ArtifactError(f"{key}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not have the rank "
                                f"{r} that the config (r, rank_pattern) gives")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas.lowrank[_module_of_peft_key(key)] = LowRank(A, B, scale)
    return deltas


def _peft_ia3_deltas(config: dict, tensors: dict[str, torch.Tensor]) -> AdapterDeltas:
    if config.get("modules_to_save"):
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: unsupported PEFT IA3 feature modules_to_save="
                            f"{config['modules_to_save']!r}")
    feedforward = config.get("feedforward_modules") or []
    deltas = AdapterDeltas()
    for (key, part), t in sorted(_peft_tensors(tensors, config).items()):
        if part != "ia3_l":
            raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: {part} tensor for {key} in an IA3 adapter")
        # PEFT's IA3Model._check_target_module_feedforward: regex full match, or a plain suffix (no dot).
        is_ff = (re.fullmatch(feedforward, key) is not None if isinstance(feedforward, str)
                 else any(key.endswith(f) for f in feedforward))
        layer, proj = parse_module_name(_module_of_peft_key(key))
        if is_ff and proj == "down_proj":
            target, want = "ffn", (1, t.numel())
        elif not is_ff and proj in ("q_proj", "k_proj", "v_proj", "up_proj"):
            target, want = proj.removesuffix("_proj"), (t.numel(), 1)
        else:
            where = "input (feedforward)" if is_ff else "output"
            raise ArtifactError(f"{key}: IA3 scaling of the {where} of {proj} is not supported; servable IA3 "
                                "targets: k/v/q/up_proj outputs and the down_proj input (feedforward)")
        if tuple(t.shape) != want:
            raise ArtifactError(f"{key}: ia3_l has shape {tuple(t.shape)}, expected {want}")
        deltas.scale[scale_name(layer, target)] = t.reshape(-1)
    return deltas


# ---------------------------------------------------------------------------------------------------------------
# PEFT export


def export_peft_lora(adapter: LoadedAdapter | AdapterDeltas, out_dir: str | os.PathLike, spec: dict, *,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA directory (task CAUSAL_LM) from LowRank deltas; alphas chosen so alpha / r == scale."""
    deltas = adapter.deltas if isinstance(adapter, LoadedAdapter) else adapter
    other = [k for k in _kinds_of(deltas) if k != "lowrank"]
    if other or not deltas.lowrank:
        raise ArtifactError("export_peft_lora: PEFT LoRA holds LowRank deltas only; "
                            f"this adapter has {other or 'no LowRank deltas'}")
    _validate_deltas(deltas, spec)
    ranks = {m: lr.rank for m, lr in deltas.lowrank.items()}
    alphas = {m: _exact_alpha(lr.scale, lr.rank) for m, lr in deltas.lowrank.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    key = {m: _peft_module_key(m) for m in deltas.lowrank}  # pattern keys, e.g. layers.3.self_attn.q_proj
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "target_modules": _peft_target_modules(set(deltas.lowrank), spec),
        "rank_pattern": {key[m]: v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {key[m]: v for m, v in sorted(alphas.items()) if v != alpha},
        "bias": "none", "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    tensors = {}
    for m, lr in deltas.lowrank.items():
        tensors[f"base_model.model.model.{key[m]}.lora_A.weight"] = lr.A
        tensors[f"base_model.model.model.{key[m]}.lora_B.weight"] = lr.B
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = st_save({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()})
    _write_atomic(out / PEFT_WEIGHTS_FILE, data)
    _write_atomic(out / PEFT_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _peft_module_key(name: str) -> str:
    layer, proj = parse_module_name(name)
    return f"layers.{layer}.{'self_attn' if proj in ATTENTION_PROJECTIONS else 'mlp'}.{proj}"


def _peft_target_modules(modules: set[str], spec: dict) -> list[str] | str:
    """Short names when each projection is adapted in every layer, else a regex that selects exactly `modules`."""
    projs = sorted({parse_module_name(m)[1] for m in modules})
    every = {module_name(i, p) for i in range(spec["num_hidden_layers"]) for p in projs}
    if every == modules:
        return projs
    keys = "|".join(re.escape(_peft_module_key(m)) for m in sorted(modules))
    return rf"(.*\.)?({keys})"


def _exact_alpha(scale: float, r: int) -> float | int:
    """An alpha with alpha / r == scale in float64 (what PEFT computes), an int when one exists.

    fl(alpha / r) can step over `scale` (about 1 pair in 12 for random scales); then the closest alpha is used,
    1 ulp off in float64, far below the fp32 rounding of PEFT's `lora_B(lora_A(x)) * scaling`.
    """
    scale = float(scale)
    alpha = scale * r
    if alpha.is_integer() and int(alpha) / r == scale:
        return int(alpha)
    candidates = [alpha]
    for direction in (math.inf, -math.inf):
        a = alpha
        for _ in range(4):
            a = math.nextafter(a, direction)
            candidates.append(a)
    best = min(candidates, key=lambda a: abs(a / r - scale))
    if best / r != scale:
        logger.debug("no lora_alpha gives scale %r exactly at rank %d; %r is 1 ulp off", scale, r, best)
    return best


# ---------------------------------------------------------------------------------------------------------------
# Validation


def validate(loaded: LoadedAdapter, spec: dict, *, max_rank: int | None = None) -> None:
    """Raise ArtifactError unless `loaded` can be served on the backbone described by `spec`."""
    base = loaded.manifest.get("base") or {}
    if base.get("architecture") not in (None, spec["architecture"]):
        raise ArtifactError(f"base architecture mismatch: adapter made for {base['architecture']!r}, "
                            f"backbone is {spec['architecture']!r}")
    if base.get("fingerprint") not in (None, fingerprint(spec)):
        raise ArtifactError(f"base fingerprint mismatch: adapter made for {base['fingerprint']}, backbone is "
                            f"{fingerprint(spec)} (another backbone's shapes)")
    _check_digests(loaded)
    _validate_deltas(loaded.deltas, spec, max_rank=max_rank)


def _validate_deltas(deltas: AdapterDeltas, spec: dict, *, max_rank: int | None = None) -> None:
    shapes = module_shapes(spec)
    for name, lr in deltas.lowrank.items():
        d_out, d_in = _shape_of(name, shapes)
        _check_float(f"{name}.A", lr.A, None)
        _check_float(f"{name}.B", lr.B, None)
        r = lr.A.shape[0] if lr.A.ndim == 2 else -1
        if r < 1:
            raise ArtifactError(f"{name}: rank must be >= 1, A has shape {tuple(lr.A.shape)}")
        if max_rank is not None and r > max_rank:
            raise ArtifactError(f"{name}: rank {r} exceeds the server's max_rank {max_rank}")
        if tuple(lr.A.shape) != (r, d_in) or tuple(lr.B.shape) != (d_out, r):
            raise ArtifactError(f"{name}: wrong shape: A {tuple(lr.A.shape)}, B {tuple(lr.B.shape)}; "
                                f"expected A (r, {d_in}), B ({d_out}, r)")
        if not math.isfinite(lr.scale):
            raise ArtifactError(f"{name}: non-finite scale {lr.scale}")
    for name, sp in deltas.sparse.items():
        _check_sparse(name, sp, _shape_of(name, shapes))
    lengths = scale_lengths(spec)
    for key, vec in deltas.scale.items():
        layer, target = _parse(parse_scale_name, key, f"{key}_scale")
        _check_layer(key, layer, spec)
        _check_float(f"{key}_scale", vec, (lengths[target],))
    for layer, p in deltas.para.items():
        _check_para(layer, p, spec)


def _shape_of(name: str, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    layer, _ = _parse(parse_module_name, name, name)
    if name not in shapes:
        raise ArtifactError(f"{name}: layer {layer} does not exist (the backbone has {len(shapes) // 7} layers)")
    return shapes[name]


def _check_layer(name: str, layer: int, spec: dict) -> None:
    if not 0 <= layer < spec["num_hidden_layers"]:
        raise ArtifactError(f"{name}: layer {layer} does not exist (the backbone has {spec['num_hidden_layers']})")


def _check_float(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ArtifactError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if shape is not None and tuple(t.shape) != shape:
        raise ArtifactError(f"{name}: wrong shape {tuple(t.shape)}, expected {shape}")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ArtifactError(f"{name}: {bad} non-finite values (nan/inf)")


def _check_sparse(name: str, sp: Sparse, shape: tuple[int, int]) -> None:
    if tuple(sp.shape) != shape:
        raise ArtifactError(f"{name}: Sparse shape {tuple(sp.shape)}, the module is {shape}")
    for part, t in (("rows", sp.rows), ("cols", sp.cols)):
        if t.dtype != torch.int32 or t.ndim != 1:
            raise ArtifactError(f"{name}.{part}: expected a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    nnz = sp.rows.numel()
    if sp.cols.numel() != nnz or sp.values.ndim != 1 or sp.values.numel() != nnz:
        raise ArtifactError(f"{name}: rows, cols, values lengths differ "
                            f"({nnz}, {sp.cols.numel()}, {tuple(sp.values.shape)})")
    _check_float(f"{name}.values", sp.values, (nnz,))
    rows, cols = sp.rows.long(), sp.cols.long()
    for part, t, limit in (("rows", rows, shape[0]), ("cols", cols, shape[1])):
        if nnz and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ArtifactError(f"{name}.{part}: index out of range [0, {limit}) (min {int(t.min())}, "
                                f"max {int(t.max())})")
    step = (rows * shape[1] + cols).diff()  # (nnz - 1,) row-major position increments
    if bool((step < 0).any()):
        raise ArtifactError(f"{name}: entries are not sorted by (row, col) at index {int((step < 0).nonzero()[0])}")
    if bool((step == 0).any()):
        raise ArtifactError(f"{name}: duplicate (row, col) entry at index {int((step == 0).nonzero()[0])}")


def _check_para(layer: int, p: ParaLayer, spec: dict) -> None:
    name = f"para.layers.{layer}"
    _check_layer(name, layer, spec)
    if p.pool not in PARA_POOLS:
        raise ArtifactError(f"{name}: pool {p.pool!r} is not one of {PARA_POOLS}")
    if not isinstance(p.act, str) or not p.act:
        raise ArtifactError(f"{name}: act must be a non-empty string, got {p.act!r}")
    hidden = spec["hidden_size"]
    r = p.w_down.shape[0] if p.w_down.ndim == 2 else 0
    if r < 1:
        raise ArtifactError(f"{name}.down: expected shape (r, {hidden}) with r >= 1, got {tuple(p.w_down.shape)}")
    _check_float(f"{name}.down", p.w_down, (r, hidden))
    _check_float(f"{name}.up", p.w_up, (_para_up_rows(spec), r))
    if p.pool_query is not None:
        _check_float(f"{name}.query", p.pool_query, (hidden,))
    elif p.pool == "attention":
        raise ArtifactError(f"{name}: attention pooling needs the query vector ({name}.query)")
