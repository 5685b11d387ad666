"""The next token of each row of logits on an x86-64 CPU by our own kernel (kernels/cpu_sampler.c): greedy, or
temperature, top-k, top-p and an inverse CDF at the row's uniform draw, a few passes over each row where PyTorch's
batched sampler runs a chain of some thirty ops (server/engine/sampler.py), each a pass over memory and a dispatch:
on a CPU those ops, not the arithmetic, were most of the host time between two decode steps.

Semantics: `sample_ref` below (PyTorch: the whole row sorted, one float64 cumsum), up to an exp within 2 ulp, the
order of the softmax's sum, and probabilities below e^-87.33 x the maximum's counting 0; the tokens the two choose
differ only where a draw falls within such rounding of a boundary between two tokens.
    sample(logits, temps, top_ks, top_ps, u): (n, V) fp32 -> (n,) int64 token ids
        temps[r] == 0: greedy (the first maximum, the first NaN when there is one: torch.argmax)
        top_ks[r] <= 0 or >= V and top_ps[r] >= 1: no order needed (plain temperature)
        a row whose maximum is not finite after its temperature (NaN, +-inf) takes its first maximum
    sample_checked(...): the same and the rows whose logits' maximum is not finite (a NaN, +inf, all -inf), found
        on the kernel's own pass over each row

Where it runs: `enabled()`, `MULTIPLEX_CPU_SAMPLER=auto|ours|torch` read once at import (`auto`: ours wherever the
kernel builds, kernels/cpu_build.py), for fp32 CPU logits with unit stride along the vocabulary (the caller's check).
A call releases the GIL and splits many rows of a large vocabulary over the calling thread's OpenMP team.
"""
from __future__ import annotations

import ctypes
from array import array
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_suffix(".c")
CHOICE = cpu_build.choice("MULTIPLEX_CPU_SAMPLER", "torch")
_enabled: bool | None = None  # decided at the first call: it may compile the kernel


def enabled() -> bool:
    """Whether fp32 sampling on a CPU runs this kernel (MULTIPLEX_CPU_SAMPLER and this machine)."""
    global _enabled
    if _enabled is None:
        _enabled = cpu_build.decide("MULTIPLEX_CPU_SAMPLER", CHOICE, "torch", available)
    return _enabled


def available() -> bool:
    """Whether this machine runs the kernel: an x86-64 CPU with AVX2 and FMA, and the source compiles (once)."""
    return cpu_build.loads(_library, "our CPU sampler")


def sample(logits: torch.Tensor, temps: list[float], top_ks: list[int], top_ps: list[float],
           u: list[float]) -> torch.Tensor:
    """(n, V) fp32 CPU logits, unit stride along V; per row its temperature, top-k, top-p and uniform draw in
    [0, 1) (any value for a greedy row) -> (n,) int64 token ids (see the module docstring)."""
    return sample_checked(logits, temps, top_ks, top_ps, u)[0]


def sample_checked(logits: torch.Tensor, temps: list[float], top_ks: list[int], top_ps: list[float],
                   u: list[float]) -> tuple[torch.Tensor, list[int]]:
    """sample(...) and the rows whose logits are not finite (their maximum NaN, +inf or -inf), ascending."""
    n, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or (n and logits.stride(1) != 1):
        raise ValueError("sample needs fp32 CPU logits with unit stride along the vocabulary")
    if not len(temps) == len(top_ks) == len(top_ps) == len(u) == n:
        raise ValueError(f"expected {n} temperatures, top-ks, top-ps and draws")
    settings = array("d", [*temps, *top_ks, *top_ps, *u])  # (4, n): torch.tensor of the lists took ~40 us at n=64
    out = torch.empty(n, dtype=torch.int64)
    bad = bytearray(n)
    num_bad = _library().multiplex_sample(n, vocab, logits.data_ptr(), logits.stride(0), settings.buffer_info()[0],
                                          out.data_ptr(), (ctypes.c_uint8 * n).from_buffer(bad) if n else None,
                                          torch.get_num_threads())
    if num_bad < 0:
        raise MemoryError(f"our CPU sampler could not allocate its scratch for a {vocab}-token vocabulary")
    return out, [row for row, b in enumerate(bad) if b] if num_bad else []


def sample_ref(logits: torch.Tensor, temps: list[float], top_ks: list[int], top_ps: list[float],
               u: list[float]) -> torch.Tensor:
    """What `sample` computes, the plain PyTorch way: every row sorted whole (stable, descending), top-k and top-p
    on its float32 cumsum, one float64 cumsum for the inverse CDF."""
    n, vocab = logits.shape
    temps_t = torch.tensor(temps, dtype=torch.float32)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks])
    top_p = torch.tensor(top_ps, dtype=torch.float32)
    greedy = temps_t == 0
    scale = torch.where(greedy, 1.0, temps_t)[:, None]
    top = logits.amax(-1, keepdim=True)
    degenerate = greedy | ~(top.isfinite() & (top / scale).isfinite())[:, 0]
    probs = torch.softmax(logits / scale, dim=-1)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    cols = torch.arange(vocab)[None, :]
    keep = (cols < ks[:, None]) & (ranked.cumsum(-1) - ranked < top_p[:, None])
    keep &= keep.cumprod(-1).bool()  # what they keep is a prefix
    plain = ((ks >= vocab) & (top_p >= 1))[:, None]  # no order needed: the row as it is
    ranked, order = torch.where(plain, probs, ranked * keep), torch.where(plain, cols, order)
    cdf = ranked.double().cumsum(-1)
    target = torch.tensor(u, dtype=torch.float64)[:, None] * cdf[:, -1:]
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last column that adds some probability
    idx = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
    return torch.where(degenerate, logits.argmax(-1), order.gather(1, idx)[:, 0])


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.multiplex_sample.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.multiplex_sample.restype = ctypes.c_int


def _library() -> ctypes.CDLL:
    """The compiled kernel (its AVX2 form on every CPU that runs it), built on first use; OSError if it cannot be."""
    return cpu_build.load(SOURCE, "avx2", _declare)
