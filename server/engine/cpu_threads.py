"""How many intra-op threads each CPU forward step uses: every core but one for a decode step, every core for a
large (prefill) step.

A decode step is a chain of ~1500 small ops; with every core in each op's OpenMP team, an op waits at its barrier
whenever another thread or process holds one of the cores, and under load one always does (the event loop
streaming tokens, tokenising prompts, talking to Redis; a client on the same machine). A prefill step of many
tokens is compute-bound with large ops, where the last core pays. Measured on the 2-core development machine,
2026-12-01, smollm2 fp32, 8 rank-16 LoRAs:
- `python -m benchmarks.serving --systems multiplex --rates 2 --num-requests 60` (Poisson arrivals over HTTP):
  TTFT p50 / TPOT p50 356 / 161 ms with 2 threads for every step, 145 / 44 ms with 1, 118 / 41 ms with this policy;
- `python -m benchmarks.peers --peers multiplex` (16 concurrent requests, 64 + 32 tokens; base / 8 adapters tok/s):
  215 / 108 with 2 threads, 190 / 156 with 1, 234 / 181 with this policy.
`MULTIPLEX_CPU_THREADS=N` runs every step on N threads instead.
"""
from __future__ import annotations

import torch

PROCESS_THREADS = torch.get_num_threads()  # torch's own choice (or OMP_NUM_THREADS), before any engine changed it
LARGE_STEP_TOKENS = 64  # a step with at least this many tokens (a prefill) runs on every core


class StepThreads:
    def __init__(self, setting: int | None = None) -> None:
        """`setting`: every step on that many threads (None: the policy of the module docstring)."""
        self.small = setting or max(1, PROCESS_THREADS - 1)
        self.large = setting or PROCESS_THREADS
        self.current: int | None = None

    def threads_for(self, num_tokens: int) -> int:
        return self.large if num_tokens >= LARGE_STEP_TOKENS else self.small

    def set_for_step(self, num_tokens: int) -> None:
        want = self.threads_for(num_tokens)
        if want != self.current:  # torch.set_num_threads costs microseconds; called only on a change
            torch.set_num_threads(want)
            self.current = want
