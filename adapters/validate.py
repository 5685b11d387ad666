"""What the server refuses. An adapter is servable on a backbone only if, for every delta of every kind:

| check  | LowRank (A, B, scale)     | Sparse (rows, cols, values) | Scale vector | ParaLayer (down, up, query)  |
| module | exists in the backbone    | exists                      | layer exists | layer exists; pool and act   |
|        |                           |                             |              | among those the server runs  |
| dtype  | weights float32 / float16 / bfloat16; Sparse indices int32 (float8, float64, ... refused)   |
| shape  | A (r, d_in), B (d_out, r) | the module's (d_out, d_in)  | (d,)         | down (r, h), up (q+kv+ff, r) |
| rank   | 1 <= r <= max_rank        |                             |              | 1 <= r <= max_rank           |
| values | finite once cast to the server's dtype (`dtype`: float32 on CPU, bfloat16 on GPU); the scale |
|        | finite in float32                                                                           |
| size   | |s||B||A|, |A|, |B|, |sA|, |sB| <= 1e6 | norm(values) <= 1e6 | |v_i| <= 1e6 | each part, |up||down| <= 1e6 |
| sparse |                           | indices in range, sorted by (row, col), unique             |

and the base fingerprint (when the manifest states one) is the backbone's. `validate` raises `ArtifactError` naming
the module or tensor. The manifest's own fields are checked before this, when it is parsed (`adapters.manifest`).
"""
from __future__ import annotations

import math

import torch

from adapters.delta import (PARA_ACTIVATIONS, PARA_POOLS, AdapterDeltas, LowRank, ParaLayer, Sparse, parse_module_name,
                            parse_scale_name)
from adapters.errors import ArtifactError
from adapters.files import WEIGHT_DTYPES, parse_name, short
from adapters.manifest import FLOAT32_MAX, LoadedAdapter, check_digests
from adapters.spec import fingerprint, module_shapes, para_up_rows, scale_lengths

# The largest delta the server takes: no trained adapter comes near (a base weight's norm is tens to hundreds, a
# fine-tune's change a fraction of that); a larger one computes, but drives its own requests' activations past the
# dtype's range (lora_alpha 1e30: a residual stream that RMSNorm's sum of squares turns into zeros), i.e. noise.
MAX_DELTA_NORM = 1e6

SERVING_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def serving_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype the server computes in, from a torch dtype or its name; None: unknown (values checked as stored)."""
    if value is None or value in WEIGHT_DTYPES:
        return value
    if isinstance(value, str) and value.lower() in SERVING_DTYPES:
        return SERVING_DTYPES[value.lower()]
    raise ValueError(f"unknown serving dtype {value!r}; use float32, bfloat16 or float16")


def validate(loaded: LoadedAdapter, spec: dict, *, max_rank: int | None = None,
             dtype: torch.dtype | str | None = None) -> None:
    """Raise ArtifactError unless `loaded` can be served on the backbone described by `spec`, in `dtype`."""
    base = loaded.manifest.get("base") or {}
    if not isinstance(base, dict):
        raise ArtifactError(f"manifest 'base' must be an object, got {type(base).__name__}")
    if base.get("architecture") not in (None, spec["architecture"]):
        raise ArtifactError(f"base architecture mismatch: adapter made for {short(base['architecture'])}, "
                            f"backbone is {spec['architecture']!r}")
    if base.get("fingerprint") not in (None, fingerprint(spec)):
        raise ArtifactError(f"base fingerprint mismatch: adapter made for {short(base['fingerprint'], 80)}, backbone "
                            f"is {fingerprint(spec)} (another backbone's shapes)")
    check_digests(loaded)
    validate_deltas(loaded.deltas, spec, max_rank=max_rank, dtype=dtype)


def validate_deltas(deltas: AdapterDeltas, spec: dict, *, max_rank: int | None = None,
                    dtype: torch.dtype | str | None = None) -> None:
    """Raise ArtifactError unless every delta fits its module of `spec` (the table above)."""
    dtype = serving_dtype(dtype)
    shapes = module_shapes(spec)
    for name, lr in deltas.lowrank.items():
        _check_lowrank(name, lr, _shape_of(name, shapes), max_rank, dtype)
    for name, sp in deltas.sparse.items():
        _check_sparse(name, sp, _shape_of(name, shapes), dtype)
    lengths = scale_lengths(spec)
    for key, vec in deltas.scale.items():
        layer, target = parse_name(parse_scale_name, key, f"{key}_scale")
        _check_layer(key, layer, spec)
        _check_weight(f"{key}_scale", vec, (lengths[target],))
        _check_values(f"{key}_scale", vec, dtype)
        _check_size(f"{key}_scale", "its largest entry", float(vec.abs().max()) if vec.numel() else 0.0)
    for layer, p in deltas.para.items():
        _check_para(layer, p, spec, max_rank, dtype)


def _shape_of(name: str, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    layer, _ = parse_name(parse_module_name, name, name)
    if name not in shapes:
        raise ArtifactError(f"{name}: layer {layer} does not exist (the backbone has {len(shapes) // 7} layers)")
    return shapes[name]


def _check_layer(name: str, layer: int, spec: dict) -> None:
    if not isinstance(layer, int) or not 0 <= layer < spec["num_hidden_layers"]:
        raise ArtifactError(f"{name}: layer {layer} does not exist (the backbone has {spec['num_hidden_layers']})")


def _check_rank(name: str, r: int, max_rank: int | None) -> None:
    if max_rank is not None and r > max_rank:
        raise ArtifactError(f"{name}: rank {r} exceeds the server's max_rank {max_rank}")


def _check_weight(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    """A weight's dtype (refused by name before any arithmetic: torch has no isfinite for float8) and shape."""
    if not isinstance(t, torch.Tensor) or t.dtype not in WEIGHT_DTYPES:
        raise ArtifactError(f"{name}: expected a floating-point tensor of float32, float16 or bfloat16, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ArtifactError(f"{name}: wrong shape {tuple(t.shape)}, expected {shape}")


def _check_values(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Every value finite, and still finite once cast to the serving dtype (a cast never makes a value finite)."""
    cast = t if dtype is None or dtype == t.dtype else t.to(dtype)
    bad_cast = int((~torch.isfinite(cast)).sum())
    if not bad_cast:
        return
    bad = bad_cast if cast is t else int((~torch.isfinite(t)).sum())
    if bad:
        raise ArtifactError(f"{name}: {bad} non-finite values (nan/inf)")
    raise ArtifactError(f"{name}: {bad_cast} values overflow {str(dtype).removeprefix('torch.')}, the server's "
                        f"dtype (largest finite {torch.finfo(dtype).max:.4g}); they would compute as inf / nan")


def _check_lowrank(name: str, lr: LowRank, shape: tuple[int, int], max_rank: int | None,
                   dtype: torch.dtype | None) -> None:
    d_out, d_in = shape
    _check_weight(f"{name}.A", lr.A, None)
    _check_weight(f"{name}.B", lr.B, None)
    r = lr.A.shape[0] if lr.A.ndim == 2 else -1
    if r < 1:
        raise ArtifactError(f"{name}: rank must be >= 1, A has shape {tuple(lr.A.shape)}")
    _check_rank(name, r, max_rank)
    if tuple(lr.A.shape) != (r, d_in) or tuple(lr.B.shape) != (d_out, r):
        raise ArtifactError(f"{name}: wrong shape: A {tuple(lr.A.shape)}, B {tuple(lr.B.shape)}; "
                            f"expected A (r, {d_in}), B ({d_out}, r)")
    if isinstance(lr.scale, bool) or not isinstance(lr.scale, (int, float)) or not math.isfinite(lr.scale):
        raise ArtifactError(f"{name}: non-finite scale {short(lr.scale)}")
    if abs(lr.scale) > FLOAT32_MAX:
        raise ArtifactError(f"{name}: scale {lr.scale} overflows float32 (the server applies scales in float32)")
    _check_values(f"{name}.A", lr.A, dtype)
    _check_values(f"{name}.B", lr.B, dtype)
    # What float32 computes, not the product's norm (factors that cancel, 1e20 against -1e20, multiply to 0 and
    # still overflow on the way): x @ A^T, then its product with B^T, the scale folded into either factor.
    a, b, scale = _norm(lr.A), _norm(lr.B), abs(lr.scale)
    _check_size(name, "|scale| |B| |A| (a bound on the delta's norm)", scale * b * a)
    _check_size(name, "the norm of a factor with the scale folded in", max(a, b) * max(1.0, scale))


def _norm(t: torch.Tensor) -> float:
    """The Frobenius norm, summed in float64 a million values at a time (no float64 copy of a whole upload)."""
    chunks = t.reshape(-1).split(1 << 20)
    return math.sqrt(sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in chunks))


def _check_size(name: str, what: str, size: float) -> None:
    if not size <= MAX_DELTA_NORM:
        raise ArtifactError(f"{name}: {what} is {size:.3g}, beyond the server's limit {MAX_DELTA_NORM:.0e} (no "
                            f"trained adapter comes near it: base weights' norms are tens to hundreds); its requests' "
                            f"activations would overflow the model's range and answer noise")


def _check_sparse(name: str, sp: Sparse, shape: tuple[int, int], dtype: torch.dtype | None) -> None:
    if tuple(sp.shape) != shape:
        raise ArtifactError(f"{name}: Sparse shape {tuple(sp.shape)}, the module is {shape}")
    for part, t in (("rows", sp.rows), ("cols", sp.cols)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.ndim != 1:
            raise ArtifactError(f"{name}.{part}: expected a 1-D int32 tensor, got {getattr(t, 'dtype', t)} "
                                f"{tuple(getattr(t, 'shape', ()))}")
    nnz = sp.rows.numel()
    _check_weight(f"{name}.values", sp.values, None)
    if sp.cols.numel() != nnz or sp.values.ndim != 1 or sp.values.numel() != nnz:
        raise ArtifactError(f"{name}: rows, cols, values lengths differ "
                            f"({nnz}, {sp.cols.numel()}, {tuple(sp.values.shape)})")
    _check_values(f"{name}.values", sp.values, dtype)
    _check_size(name, "the norm of its values", _norm(sp.values))
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


def _check_para(layer: int, p: ParaLayer, spec: dict, max_rank: int | None, dtype: torch.dtype | None) -> None:
    name = f"para.layers.{layer}"
    _check_layer(name, layer, spec)
    if not isinstance(p.pool, str) or p.pool not in PARA_POOLS:
        raise ArtifactError(f"{name}: pool {short(p.pool)} is not one of {PARA_POOLS}")
    if not isinstance(p.act, str) or p.act not in PARA_ACTIVATIONS:
        raise ArtifactError(f"{name}: activation {short(p.act)} is not one the server implements "
                            f"({', '.join(sorted(PARA_ACTIVATIONS))})")
    hidden = spec["hidden_size"]
    _check_weight(f"{name}.down", p.w_down, None)
    r = p.w_down.shape[0] if p.w_down.ndim == 2 else 0
    if r < 1:
        raise ArtifactError(f"{name}.down: expected shape (r, {hidden}) with r >= 1, got {tuple(p.w_down.shape)}")
    _check_rank(name, r, max_rank)
    parts = {"down": (p.w_down, (r, hidden)), "up": (p.w_up, (para_up_rows(spec), r))}
    if p.pool_query is not None:
        parts["query"] = (p.pool_query, (hidden,))
    elif p.pool == "attention":
        raise ArtifactError(f"{name}: attention pooling needs the query vector ({name}.query)")
    for part, (t, shape) in parts.items():
        _check_weight(f"{name}.{part}", t, shape)
    for part, (t, _) in parts.items():
        _check_values(f"{name}.{part}", t, dtype)
    norms = {part: _norm(t) for part, (t, _) in parts.items()}
    for part, norm in norms.items():
        _check_size(f"{name}.{part}", "its norm", norm)
    _check_size(name, "|up| |down| (a bound on how the generator scales a pooled hidden state)",
                norms["up"] * norms["down"])
