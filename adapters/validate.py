"""What the server refuses: an adapter is servable on a backbone only if every tensor has the module's shape, every
target module exists, every value is finite, ranks are within the server's limit, and the base fingerprint (when
the manifest states one) is the backbone's. `validate` raises `ArtifactError` naming the module or tensor.
"""
from __future__ import annotations

import math

import torch

from adapters.artifact import (
    ArtifactError,
    LoadedAdapter,
    check_digests,
    fingerprint,
    module_shapes,
    para_up_rows,
    parse_name,
    scale_lengths,
)
from adapters.delta import AdapterDeltas, ParaLayer, Sparse, parse_module_name, parse_scale_name

PARA_POOLS = ("attention", "mean", "last")


def validate(loaded: LoadedAdapter, spec: dict, *, max_rank: int | None = None) -> None:
    """Raise ArtifactError unless `loaded` can be served on the backbone described by `spec`."""
    base = loaded.manifest.get("base") or {}
    if base.get("architecture") not in (None, spec["architecture"]):
        raise ArtifactError(f"base architecture mismatch: adapter made for {base['architecture']!r}, "
                            f"backbone is {spec['architecture']!r}")
    if base.get("fingerprint") not in (None, fingerprint(spec)):
        raise ArtifactError(f"base fingerprint mismatch: adapter made for {base['fingerprint']}, backbone is "
                            f"{fingerprint(spec)} (another backbone's shapes)")
    check_digests(loaded)
    validate_deltas(loaded.deltas, spec, max_rank=max_rank)


def validate_deltas(deltas: AdapterDeltas, spec: dict, *, max_rank: int | None = None) -> None:
    """Raise ArtifactError unless every delta fits its module of `spec`: shapes, layers, finite values, ranks."""
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
        layer, target = parse_name(parse_scale_name, key, f"{key}_scale")
        _check_layer(key, layer, spec)
        _check_float(f"{key}_scale", vec, (lengths[target],))
    for layer, p in deltas.para.items():
        _check_para(layer, p, spec)


def _shape_of(name: str, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    layer, _ = parse_name(parse_module_name, name, name)
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
    _check_float(f"{name}.up", p.w_up, (para_up_rows(spec), r))
    if p.pool_query is not None:
        _check_float(f"{name}.query", p.pool_query, (hidden,))
    elif p.pool == "attention":
        raise ArtifactError(f"{name}: attention pooling needs the query vector ({name}.query)")
