"""ForwardBatch: the device tensors for one engine step; the model's only input besides its weights."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from kernels.attention import AttentionMeta
from kernels.segments import Segments


@dataclass(frozen=True)
class ParaPrefill:
    """A PARA request whose whole prompt is in this step: its vectors are computed from these tokens."""

    token_start: int  # first row of the request in the flat batch
    num_prompt_tokens: int
    row: int  # its row in the pool's PARA vector buffer
    slot: int


@dataclass(frozen=True)
class AdapterKinds:
    """Which delta kinds this step's tokens use, so the model skips what nobody needs."""

    lowrank: bool = False
    sparse: bool = False
    scale: bool = False


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64: prefill chunks and decode tokens, request after request
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: KV cache row (block * block_size + offset) of each token
    attn: AttentionMeta  # one sequence per request, in the same order as the tokens
    segments: Segments  # one segment per request, with its adapter slot (-1 = base)
    logits_indices: torch.Tensor  # (B,) int64: rows whose next-token logits are needed
    adapter_kinds: AdapterKinds = AdapterKinds()
    scale_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # IA3 target -> (T,) int32 slot or -1
    para_rows: torch.Tensor | None = None  # (T,) int32 row of the request's PARA vectors, or -1
    para_prefills: tuple[ParaPrefill, ...] = ()

    def to(self, device) -> "ForwardBatch":
        """A copy with every tensor on `device` (always new tensors: CUDA graphs keep them as static inputs)."""
        return _map_tensors(self, lambda t: t.to(device, copy=True))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, in a fixed order (that of `to`)."""
        out: list[torch.Tensor] = []
        _map_tensors(self, lambda t: out.append(t) or t)
        return out


class PackedInputs:
    """A ForwardBatch whose tensors are views into one device buffer, refilled from a host batch of the same
    structure with a single host-to-device copy (a CUDA graph's static inputs: one transfer per replay, from pinned
    memory on a GPU, instead of one synchronous transfer per tensor)."""

    ALIGN = 16  # bytes: every tensor starts at a multiple, so any dtype can view its slice

    def __init__(self, template: ForwardBatch, device) -> None:
        tensors = template.tensors()
        self.slices: list[tuple[int, int]] = []  # (byte offset, byte length) per tensor, in tensors() order
        size = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            self.slices.append((size, nbytes))
            size += -(-nbytes // self.ALIGN) * self.ALIGN
        on_gpu = torch.device(device).type == "cuda"
        self.device_buf = torch.empty(max(size, self.ALIGN), dtype=torch.uint8, device=device)
        self.host_buf = torch.empty(max(size, self.ALIGN), dtype=torch.uint8, pin_memory=on_gpu)
        self._specs = [(t.shape, t.dtype) for t in tensors]
        views = iter([self.device_buf[off : off + n].view(t.dtype).view(t.shape)
                      for (off, n), t in zip(self.slices, tensors)])
        self.batch: ForwardBatch = _map_tensors(template, lambda t: next(views))
        self._copied = torch.cuda.Event() if on_gpu else None  # the last transfer out of host_buf
        self.load(template)

    def load(self, fb: ForwardBatch) -> None:
        """Write `fb`'s values (host tensors, same structure and shapes) into self.batch."""
        src = fb.tensors()
        if [(t.shape, t.dtype) for t in src] != self._specs:
            raise ValueError("batch structure differs from the captured one")
        if self._copied is not None:
            self._copied.synchronize()  # host_buf may still be read by the previous step's transfer
        for (off, n), t in zip(self.slices, src):
            self.host_buf[off : off + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        self.device_buf.copy_(self.host_buf, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.batch.segments.forget_host_views()  # the CPU paths' host views of the old segment values


def _map_tensors(obj, fn):
    """obj with fn applied to each tensor inside it (dataclasses, dicts, tuples of those), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(obj[k], fn) for k in sorted(obj)}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields(obj)}
        return replace(obj, **{k: v for k, v in changes.items() if v is not getattr(obj, k)})
    return obj


@dataclass(frozen=True)
class KVCache:
    k: torch.Tensor  # (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
