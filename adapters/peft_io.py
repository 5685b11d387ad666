"""PEFT interop: import PEFT LoRA and IA3 directories into the delta vocabulary, export LowRank deltas as PEFT LoRA.

Import reads `adapter_config.json` + `adapter_model.safetensors` (never a pickle `.bin`). The config is checked
first (`check_peft_config`: each field PEFT's selection and scaling use has its type checked, every string and list
is bounded, and the whole is small enough to store as the adapter's `trainer` record), then PEFT's own rules for
which modules a config targets (`target_modules`, `exclude_modules`, `layers_to_transform`) and which rank / alpha
each one gets (`rank_pattern`, `alpha_pattern`, `use_rslora`) are reproduced, with the config's regexes matched by
`adapters.peft_patterns` (no regex engine runs on an upload). Any feature the vocabulary cannot express exactly
(DoRA, biases, modules_to_save, embeddings, base-rewriting inits, ...) is refused by name.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from adapters.delta import PROJECTIONS, AdapterDeltas, LowRank, module_name, parse_module_name, scale_name
from adapters.errors import ArtifactError
from adapters.files import (
    LAYER_PATTERN,
    MAX_STRING_CHARS,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    check_bounded,
    describe,
    is_int,
    parse_json,
    parse_tensors,
    sha256_hex,
    short,
    write_atomic,
)
from adapters.manifest import (
    MAX_MODULES,
    MIN_LIST_ITEMS,
    LoadedAdapter,
    check_record_size,
    kinds_of,
    manifest_of,
)
from adapters.peft_patterns import Pattern, compile_pattern, layer_index, plain_name
from adapters.validate import validate_deltas

logger = logging.getLogger(__name__)

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# ---------------------------------------------------------------------------------------------------------------
# PEFT import

# e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...q_proj.lora_A.default.weight, ...ia3_l
# (our own pattern, anchored, no nested quantifiers: linear in the tensor name, whose length the header bounds)
_PEFT_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?P<key>(?:model\.)?layers\.(?P<layer>{LAYER_PATTERN})\.(?P<block>self_attn|mlp)"
    r"\.(?P<proj>[a-z_]+))\.(?P<part>lora_A|lora_B|ia3_l)(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$")
# LoraConfig fields whose non-default values change the forward in ways the delta vocabulary cannot express.
_LORA_REFUSED = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                 "layer_replication", "alora_invocation_tokens", "use_qalora", "velora_config", "monteclora_config",
                 "use_bdlora", "arrow_config", "kasa_config")
# init_lora_weights values that rewrite the base weights (the adapter is relative to a residual model).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class _Selection:
    """A config's module selection and per-module rank / alpha, compiled once (`adapters.peft_patterns`)."""

    targets: Pattern | None  # None: every module (PEFT resolved "all-linear" / the defaults when it saved)
    exclude: Pattern | None
    layers: list[int] | None  # layers_to_transform (PEFT applies it to a list of target_modules only)
    layers_patterns: list[str]
    feedforward: Pattern | None  # IA3
    rank_pattern: list[tuple[Pattern, int]]
    alpha_pattern: list[tuple[Pattern, float]]

    def targets_key(self, key: str) -> bool:
        """PEFT's check_target_module_exists (tuners_utils.py) for a module key like 'model.layers.0.mlp.up_proj'."""
        if self.exclude is not None and self.exclude.matches(key):
            return False
        if self.targets is None or not self.targets.matches(key):
            return self.targets is None
        if self.layers is None:
            return True
        idx = layer_index(key, self.layers_patterns)
        return idx is not None and idx in self.layers


def load_peft(config_data: bytes, weights_data: bytes, *, name: str, max_modules: int = MAX_MODULES) -> LoadedAdapter:
    """A PEFT LoRA or IA3 adapter from the bytes of adapter_config.json and adapter_model.safetensors."""
    config = check_peft_config(parse_json(config_data, PEFT_CONFIG_FILE), max_modules=max_modules)
    selection = _selection(config)
    tensors, digest = parse_tensors(weights_data, PEFT_WEIGHTS_FILE), sha256_hex(weights_data)
    if config["peft_type"] == "LORA":
        deltas, fmt, method = _peft_lora_deltas(config, selection, tensors), "peft-lora", "lora"
    else:
        deltas, fmt, method = _peft_ia3_deltas(config, selection, tensors), "peft-ia3", "ia3"
    manifest = manifest_of(deltas, method=method, name=name, trainer={"peft": config})
    manifest["base"] = {"name_or_path": config.get("base_model_name_or_path")}
    manifest["sha256"] = {PEFT_WEIGHTS_FILE: digest}
    return LoadedAdapter(manifest, deltas, fmt, None, {PEFT_WEIGHTS_FILE: digest})


def check_peft_config(config: dict, *, max_modules: int = MAX_MODULES) -> dict:
    """adapter_config.json's fields checked for type and size (the config is stored as the `trainer` record) ->
    the config; ArtifactError names the field. `peft_type` is PEFT's own spelling or refused, as PEFT refuses it
    (a lower-case "lora" is a KeyError in PeftConfig.from_pretrained: such a file is no PEFT checkpoint)."""
    check_bounded(config, PEFT_CONFIG_FILE, max_items=max(max_modules, MIN_LIST_ITEMS))
    check_record_size({"peft": config}, PEFT_CONFIG_FILE)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in ("LORA", "IA3"):
        hint = f" (PEFT spells it {peft_type.upper()!r})" if isinstance(peft_type, str) and \
            peft_type.upper() in ("LORA", "IA3") else ""
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: peft_type {short(peft_type)} is not supported{hint} "
                            "(supported: LORA, IA3)")
    for key, allowed in _CONFIG_TYPES.items():
        if config.get(key) is not None and not _has_type(config[key], allowed):
            raise ArtifactError(f"{PEFT_CONFIG_FILE}: {key!r} must be {_TYPE_NAMES[allowed]}, got "
                                f"{describe(config[key])}")
    if config.get("r") is not None and config["r"] < 1:
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: 'r' must be >= 1, got {config['r']}")
    for key, value_type in (("rank_pattern", "int"), ("alpha_pattern", "number")):
        for p, v in (config.get(key) or {}).items():
            if not _has_type(v, value_type) or (value_type == "int" and v < 1):
                raise ArtifactError(f"{PEFT_CONFIG_FILE}: {key}[{short(p)}] must be {_TYPE_NAMES[value_type]}"
                                    f"{' >= 1' if value_type == 'int' else ''}, got {describe(v)}")
    return config


# field -> accepted JSON type ("names": a string or a list of strings)
_CONFIG_TYPES = {
    "r": "int", "lora_alpha": "number", "use_rslora": "bool", "bias": "str", "init_lora_weights": "bool|str",
    "base_model_name_or_path": "str", "target_modules": "names", "exclude_modules": "names",
    "feedforward_modules": "names", "layers_pattern": "names", "layers_to_transform": "int|ints",
    "rank_pattern": "object", "alpha_pattern": "object",
}
_TYPE_NAMES = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
               "bool|str": "true, false or a string", "names": "a string or a list of strings",
               "int|ints": "an integer or a list of integers", "object": "an object"}


def _has_type(value: Any, allowed: str) -> bool:
    if allowed == "names":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if allowed == "int|ints":
        return is_int(value) or (isinstance(value, list) and all(is_int(v) for v in value))
    return any(_SCALAR_CHECKS[a](value) for a in allowed.split("|"))


_SCALAR_CHECKS = {"int": is_int, "number": lambda v: is_int(v) or isinstance(v, float),
                  "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
                  "object": lambda v: isinstance(v, dict)}


def _selection(config: dict) -> _Selection:
    """The config's regexes and name lists compiled (ArtifactError for a regex outside the accepted subset)."""
    def names(key: str, list_anchor: str) -> Pattern | None:
        value = config.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return compile_pattern(value, f"{PEFT_CONFIG_FILE}: {key}")
        return Pattern(list_anchor, frozenset(value))  # a list: the key itself, or a suffix (after a dot)

    targets = None if config.get("target_modules") == "all-linear" else names("target_modules", "dot")
    layers = config.get("layers_to_transform")
    use_layers = layers not in (None, []) and isinstance(config.get("target_modules"), list)
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    return _Selection(
        targets=targets, exclude=names("exclude_modules", "dot"),
        layers=([layers] if is_int(layers) else list(layers)) if use_layers else None,
        layers_patterns=[plain_name(p, f"{PEFT_CONFIG_FILE}: layers_pattern") for p in patterns if p],
        feedforward=names("feedforward_modules", "any"),
        rank_pattern=[(compile_pattern(p, f"{PEFT_CONFIG_FILE}: rank_pattern key", anchor="dot"), v)
                      for p, v in (config.get("rank_pattern") or {}).items()],
        alpha_pattern=[(compile_pattern(p, f"{PEFT_CONFIG_FILE}: alpha_pattern key", anchor="dot"), v)
                       for p, v in (config.get("alpha_pattern") or {}).items()])


def _peft_tensors(tensors: dict[str, torch.Tensor], selection: _Selection,
                  config: dict) -> dict[tuple[str, str], torch.Tensor]:
    """{(PEFT module key, part): tensor}; any tensor that is not a supported projection's adapter raises."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    unknown, adapters = [], set()
    first: dict[tuple, str] = {}  # (layer, projection, part, adapter name) -> the tensor that gave it
    for tname, t in tensors.items():
        m = _PEFT_KEY.match(tname)
        if m is None or m["proj"] not in PROJECTIONS:
            unknown.append(tname)
            continue
        if (m["block"] == "self_attn") != (m["proj"] in ATTENTION_PROJECTIONS):
            unknown.append(tname)
            continue
        if not selection.targets_key(m["key"]):
            raise ArtifactError(f"{tname}: module {m['key']} is not selected by the config's target_modules "
                                f"{short(config.get('target_modules'), 200)}")
        adapters.add(m["adapter"])
        module = (int(m["layer"]), m["proj"], m["part"], m["adapter"])  # one module whichever prefix its key has
        if module in first:
            raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: {first[module]!r} and {tname!r} are both the {m['part']} of "
                                f"layer {module[0]}'s {m['proj']}; one tensor per module")
        first[module] = tname
        out[(m["key"], m["part"])] = t
    if unknown:
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: unsupported tensors {sorted(unknown)[:8]}"
                            f"{' ...' if len(unknown) > 8 else ''}; only q/k/v/o/gate/up/down projections "
                            "of the decoder layers can be served")
    if len(adapters) > 1:
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: holds several adapters {sorted(a or '' for a in adapters)[:8]}")
    return out


def _module_of_peft_key(key: str) -> str:
    m = _PEFT_KEY.match(key + ".lora_A")
    return module_name(int(m["layer"]), m["proj"])


def _pattern_value(patterns: list[tuple[Pattern, Any]], key: str, default: Any) -> Any:
    """PEFT's get_pattern_key (utils/other.py): the first pattern p with re.match(rf'(.*\\.)?({p})$', key)."""
    for pattern, value in patterns:
        if pattern.matches(key):
            return value
        if pattern.matches_any_char(key):  # PEFT's '.' matches any character: it would give this module `value`
            raise ArtifactError(f"{PEFT_CONFIG_FILE}: a rank_pattern / alpha_pattern key matches {key} only where "
                                "its unescaped '.' stands for another character, as PEFT's regex lets it; write "
                                "the module's name, or '\\.' for a dot")
    return default


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_lora_config(config: dict) -> None:
    problems = [f"{f}={short(config[f])}" for f in _LORA_REFUSED if config.get(f)]
    if config.get("bias") not in (None, "none"):
        problems.append(f"bias={short(config['bias'])} (trained biases)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={short(init)} (weights relative to a rewritten base; save with PEFT's "
                        "path_initial_model_for_weight_conversion to get a plain LoRA)")
    if problems:
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: unsupported PEFT LoRA features: {'; '.join(problems)}")


def _peft_lora_deltas(config: dict, selection: _Selection, tensors: dict[str, torch.Tensor]) -> AdapterDeltas:
    _check_lora_config(config)
    parts = _peft_tensors(tensors, selection, config)
    if any(part == "ia3_l" for _, part in parts):
        raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: IA3 tensors in a LORA adapter")
    deltas = AdapterDeltas()
    for key in sorted({k for k, _ in parts}):
        A, B = parts.get((key, "lora_A")), parts.get((key, "lora_B"))
        if A is None or B is None:
            raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: module {key} has only one of lora_A / lora_B")
        r = int(_pattern_value(selection.rank_pattern, key, config.get("r") or 8))  # PEFT's defaults: r 8, alpha 8
        alpha = float(_pattern_value(selection.alpha_pattern, key, _default(config.get("lora_alpha"), 8)))
        if A.ndim != 2 or A.shape[0] != r or B.ndim != 2 or B.shape[1] != r:
            raise ArtifactError(f"{key}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not have the rank "
                                f"{r} that the config (r, rank_pattern) gives")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas.lowrank[_module_of_peft_key(key)] = LowRank(A, B, scale)
    return deltas


def _peft_ia3_deltas(config: dict, selection: _Selection, tensors: dict[str, torch.Tensor]) -> AdapterDeltas:
    if config.get("modules_to_save"):
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: unsupported PEFT IA3 feature modules_to_save="
                            f"{short(config['modules_to_save'])}")
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        raise ArtifactError(f"{PEFT_CONFIG_FILE}: feedforward_modules {short(feedforward)} is not within "
                            f"target_modules {short(targets)} (PEFT's IA3Config refuses it too)")
    deltas = AdapterDeltas()
    for (key, part), t in sorted(_peft_tensors(tensors, selection, config).items()):
        if part != "ia3_l":
            raise ArtifactError(f"{PEFT_WEIGHTS_FILE}: {part} tensor for {key} in an IA3 adapter")
        # PEFT's IA3Model._check_target_module_feedforward: regex full match, or a plain suffix (no dot).
        is_ff = selection.feedforward is not None and selection.feedforward.matches(key)
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
# PEFT LoRA export


def export_peft_lora(adapter: LoadedAdapter | AdapterDeltas, out_dir: str | os.PathLike, spec: dict, *,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA directory (task CAUSAL_LM) from LowRank deltas; alphas chosen so alpha / r == scale."""
    deltas = adapter.deltas if isinstance(adapter, LoadedAdapter) else adapter
    other = [k for k in kinds_of(deltas) if k != "lowrank"]
    if other or not deltas.lowrank:
        raise ArtifactError("export_peft_lora: PEFT LoRA holds LowRank deltas only; "
                            f"this adapter has {other or 'no LowRank deltas'}")
    validate_deltas(deltas, spec)
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
    write_atomic(out / PEFT_WEIGHTS_FILE, data)
    write_atomic(out / PEFT_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _peft_module_key(name: str) -> str:
    layer, proj = parse_module_name(name)
    return f"layers.{layer}.{'self_attn' if proj in ATTENTION_PROJECTIONS else 'mlp'}.{proj}"


def _peft_target_modules(modules: set[str], spec: dict) -> list[str] | str:
    """Short names when each projection is adapted in every layer, else a regex that selects exactly `modules` (or,
    when that regex would be longer than an upload may hold, the list of their keys, which selects the same)."""
    projs = sorted({parse_module_name(m)[1] for m in modules})
    every = {module_name(i, p) for i in range(spec["num_hidden_layers"]) for p in projs}
    if every == modules:
        return projs
    keys = "|".join(re.escape(_peft_module_key(m)) for m in sorted(modules))
    regex = rf"(.*\.)?({keys})"
    return regex if len(regex) <= MAX_STRING_CHARS else [_peft_module_key(m) for m in sorted(modules)]


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
