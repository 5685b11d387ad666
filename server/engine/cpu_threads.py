"""How many intra-op threads the CPU forward uses, and which thread uses them.

Which: only the thread that runs the forward (`enter_forward_thread`: the engine's stepping thread, through
`LLMEngine.run_forwards_here`, where nothing overlaps the forward, as on a CPU by default; else `LLMEngine`'s
forward executor, which is then the only one started); every other thread of the process computes on one. OpenMP (libgomp, which torch's CPU ops, oneDNN and MKL run on) gives every thread that
starts a parallel region a team of its own, and once the process holds more of those threads than it has cores,
every team stops spinning between regions and sleeps on a futex instead (libgomp's throttled spin count), so each
of the forward's ~1500 small ops pays a wake-up. One other thread that had run a parallel op (the model load on
the main thread, an adapter parsed in an executor thread) was enough. Measured 2026-12-02 on the 2-core development
machine, smollm2 fp32, the forward of a 1024-token prefill with 2 threads: 0.76-0.78 s on a thread alone, 1.2-1.4 s
on the same thread once another thread had used a team of its own (1 thread: 1.40 s); copies and indexing ran 5-18x
slower. So the process-wide count is one (`use_cpu_threads`), and only the forward's thread raises its own OpenMP
and MKL counts (both thread-local settings) to the forward's.

How many: every core on a machine of up to 4 cores, every core but one above that (left to the event loop, the
tokenizer and Redis, as vLLM's CPU backend reserves a core for its scheduler). On the 2-core development machine,
once only the forward's thread had a team (2026-12-02, smollm2 fp32, 8 rank-16 LoRAs, `python -m benchmarks.serving
--systems multiplex --rates 1,2,4 --num-requests 40`, two runs each, interleaved), 2 threads against 1 gave TPOT p50
39-52 / 46-73 / 80-143 ms against 51-56 / 90-98 / 185-204 ms at 1 / 2 / 4 req/s, TTFT p50 143-203 / 150-224 /
214-397 ms against 197-202 / 250-258 / 510-563 ms; one of the 2-thread runs had a TTFT p99 of 7.2 s at 1 req/s
(the others 0.2-0.5 s). Above 4 cores the choice is not measured. `MULTIPLEX_CPU_THREADS` overrides it.
"""
from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

PROCESS_THREADS = torch.get_num_threads()  # torch's own choice (or OMP_NUM_THREADS), before any engine changed it
SMALL_MACHINE_CORES = 4  # up to this many, the forward takes every core
_OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")


def cpu_threads(setting: int | None = None) -> int:
    """The forward's intra-op thread count for `setting` (None or 0: all of torch's threads on a machine of up to 4,
    else all but one)."""
    return setting or (PROCESS_THREADS if PROCESS_THREADS <= SMALL_MACHINE_CORES else PROCESS_THREADS - 1)


def use_cpu_threads(setting: int | None = None) -> int:
    """Set every thread of the process to one intra-op thread (process-wide) and return the count the forward's
    thread takes with `enter_forward_thread`."""
    torch.set_num_threads(1)
    return cpu_threads(setting)


def enter_forward_thread(threads: int) -> None:
    """In the forward's thread, once: its own OpenMP and MKL thread counts to `threads`, the rest of the process
    left at one. Where the OpenMP runtime cannot be found or called, the count is set process-wide instead (and
    logged): never raises, since a failing executor initializer would fail every step."""
    torch.get_num_threads()  # torch's per-thread initialisation first: it sets this thread's count to the process's
    try:
        openmp = _loaded_library(_OPENMP_LIBRARIES)
        if openmp is None or not hasattr(openmp, "omp_set_num_threads"):
            raise OSError("no OpenMP runtime among the loaded libraries")
        openmp.omp_set_num_threads(threads)
        torch_cpu = _loaded_library(("libtorch_cpu",))
        if torch_cpu is not None and hasattr(torch_cpu, "MKL_Set_Num_Threads_Local"):
            torch_cpu.MKL_Set_Num_Threads_Local(threads)  # MKL (batched matmuls) keeps its own count
    except OSError as exc:
        log.warning("%s; %d intra-op threads set process-wide instead", exc, threads)
        torch.set_num_threads(threads)


def _loaded_library(prefixes: tuple[str, ...]) -> ctypes.CDLL | None:
    """The shared library already mapped into this process whose file name starts with one of `prefixes` (the copy
    torch loaded, not another one on the library path)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(prefixes):
            return ctypes.CDLL(path)
    return None
