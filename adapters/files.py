"""An adapter's files: their names, and the bounded parsing of their bytes, which come from anyone with the admin token.

Every parser here refuses (ArtifactError) before it spends more than the input's size in time or memory:

| input              | checked before it is parsed                                                                |
| a JSON file        | at most MAX_JSON_BYTES; nesting at most MAX_JSON_DEPTH, counted on the bytes (`json_depth`) |
|                    | before `json.loads` recurses; then: no NaN / Infinity / 1e999 / ints beyond int64, no       |
|                    | duplicate keys                                                                              |
| a safetensors file | the header (length, JSON, at most MAX_TENSORS entries, names, dtypes, shapes, offsets)      |
|                    | before safetensors reads a tensor; dtypes F32 / F16 / BF16 (weights), I32 / I64 (indices)   |
| a JSON value kept  | `check_bounded`: strings at most MAX_STRING_CHARS, lists and objects at most `max_items`    |
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from adapters.errors import ArtifactError

MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
README_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LAYER_PATTERN = r"(0|[1-9][0-9]*)"  # a layer index in our own (fixed, linear-time) tensor-name regexes

MAX_JSON_BYTES = 1 << 20  # adapter.json, adapter_config.json
MAX_JSON_DEPTH = 32
MAX_STRING_CHARS = 4096  # any one string (or object key) in a JSON file
MAX_HEADER_BYTES = 4 << 20  # a safetensors header: ~100 bytes per tensor
MAX_TENSORS = 8192
MAX_TENSOR_NAME_CHARS = 256
MAX_TENSOR_NDIM = 4
# safetensors dtype code -> (bytes per element, role); every other code (F64, F8_*, I8, U8, BOOL, ...) is refused.
SAFETENSORS_DTYPES = {"F32": (4, "weight"), "F16": (2, "weight"), "BF16": (2, "weight"),
                      "I32": (4, "index"), "I64": (8, "index")}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


# ---------------------------------------------------------------------------------------------------------------
# JSON


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, counted without parsing it (all in C: replace, split,
    translate, accumulate). Escaped backslashes, then escaped quotes, are blanked; what lies between quotes is
    string content; the brackets outside strings are summed as +1 / -1. Exact for valid JSON; for invalid JSON, at
    least the depth a parser reaches before it meets the error (up to there the text is valid)."""
    text = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    outside = b"".join(text.split(b'"')[::2])  # (even pieces: outside strings)
    steps = outside.translate(None, _NOT_BRACKET).translate(_BRACKET_STEP)
    if steps.count(1) <= 1:
        return steps.count(1)
    return max(0, max(itertools.accumulate(memoryview(steps).cast("b"))))


def parse_json(data: bytes, fname: str, *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from untrusted bytes; ArtifactError for anything over the limits or not a JSON object."""
    if len(data) > max_bytes:
        raise ArtifactError(f"{fname}: {len(data)} bytes; at most {max_bytes} bytes of JSON are accepted")
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ArtifactError(f"{fname}: JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} levels are accepted")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_int64, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, ours, int digits
        raise ArtifactError(f"{fname}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{fname}: expected a JSON object, got {type(value).__name__}")
    bad = lone_surrogate(value)
    if bad is not None:  # stored, the manifest would make every answer listing the adapter fail
        raise ArtifactError(f"{fname}: a string holds a lone UTF-16 surrogate ({bad[:40]!r}), which is not text")
    return value


def lone_surrogate(value: Any) -> str | None:
    """The first key or string of a parsed JSON value that holds a lone UTF-16 surrogate (`"\\ud800"` is valid JSON
    but no text: nothing holding it can be written out as UTF-8), None when there is none."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _int64(text: str) -> int:
    """Integers beyond int64 mean nothing in an adapter (and overflow float conversions): refused."""
    value = int(text) if len(text) <= 20 else None
    if value is None or not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"integer {text[:40]} is out of the int64 range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {short(dup)}")
    return out


def check_bounded(value: Any, where: str, *, max_items: int, max_string: int = MAX_STRING_CHARS) -> None:
    """Every string (and key) in `value` at most `max_string` characters, every list / object at most `max_items`
    entries (depth is bounded already by `parse_json`)."""
    stack = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if len(v) > max_string:
                raise ArtifactError(f"{path}: a string of {len(v)} characters; at most {max_string} are accepted")
        elif isinstance(v, (list, dict)):
            if len(v) > max_items:
                kind = "list" if isinstance(v, list) else "object"
                raise ArtifactError(f"{path}: a {kind} of {len(v)} entries; at most {max_items} are accepted")
            items = enumerate(v) if isinstance(v, list) else v.items()
            for k, x in items:
                if isinstance(k, str) and len(k) > max_string:
                    raise ArtifactError(f"{path}: a key of {len(k)} characters; at most {max_string} are accepted")
                if isinstance(x, (str, list, dict)):
                    stack.append((f"{path}[{short(k)}]", x))


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (messages quote untrusted values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# safetensors


def parse_tensors(data: bytes, fname: str) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (never pickle), the header checked first (`check_safetensors_header`)."""
    check_safetensors_header(data, fname)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as e:
        raise ArtifactError(f"{fname}: not a valid safetensors file ({str(e)[:200]})") from None


def check_safetensors_header(data: bytes, fname: str) -> None:
    """The 8-byte header length, the header JSON, and every entry's name, dtype, shape and offsets."""
    if len(data) < 8:
        raise ArtifactError(f"{fname}: not a valid safetensors file ({len(data)} bytes, shorter than its header)")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise ArtifactError(f"{fname}: not a valid safetensors file (header of {size} bytes in a file of "
                            f"{len(data)}; at most {MAX_HEADER_BYTES} are accepted)")
    header = parse_json(data[8:8 + size], f"{fname} header", max_bytes=MAX_HEADER_BYTES)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise ArtifactError(f"{fname}: __metadata__ must be an object of strings")  # never stored: not bounded
    if len(header) > MAX_TENSORS:
        raise ArtifactError(f"{fname}: {len(header)} tensors; at most {MAX_TENSORS} are accepted")
    body = len(data) - 8 - size
    for name, entry in header.items():
        _check_entry(fname, name, entry, body)


def _check_entry(fname: str, name: str, entry: Any, body: int) -> None:
    where = f"{fname}: tensor {short(name)}"
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise ArtifactError(f"{where}: a name of {len(name)} characters; at most {MAX_TENSOR_NAME_CHARS}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ArtifactError(f"{where}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ArtifactError(f"{where}: dtype {short(dtype)} is not accepted; weights must be F32, F16 or BF16 and "
                            "sparse indices I32 or I64 (float8, float64, 8-bit and bool tensors are refused)")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_NDIM
            or not all(is_int(d) and d >= 0 for d in shape)):
        raise ArtifactError(f"{where}: shape {short(shape)} is not a list of at most {MAX_TENSOR_NDIM} sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body):
        raise ArtifactError(f"{where}: data_offsets {short(offsets)} are not within the {body} bytes of data")
    if math.prod(shape) * SAFETENSORS_DTYPES[dtype][0] != offsets[1] - offsets[0]:
        raise ArtifactError(f"{where}: shape {shape} of {dtype} does not fill its {offsets[1] - offsets[0]} bytes")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true / false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def describe(value: Any) -> str:
    """The type (and, when short, the value) of a mistyped field, for a message."""
    if isinstance(value, (dict, list, str)) and len(value) > 8:
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {short(value, 40)}"


# ---------------------------------------------------------------------------------------------------------------
# names, digests, writing


def parse_name(parser, name: str, tname: str):
    """`parser(name)` (e.g. `parse_module_name`), its ValueError as an ArtifactError naming the tensor."""
    try:
        return parser(name)
    except ValueError as e:
        raise ArtifactError(f"tensor {short(tname)}: {e}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
