"""How many intra-op threads a CPU forward step uses: all cores for a large step, one core fewer for a small one.

A decode step of a few requests is a chain of ~1500 small ops; with every core in each op's OpenMP team, an op
waits at its barrier whenever another thread of the process (the event loop streaming the previous token, the
Redis supervisor) or another process (a client on the same machine) holds one of the cores, and such steps got
slower, not faster, with the last core added. Measured on the 2-core development machine (smollm2 fp32, one
streamed request over HTTP): time per output token 28 ms with 2 threads, 21 ms with 1; with 16 concurrent
requests 2 threads win (212 vs 162 tok/s). So a step of at most `small_step_tokens` tokens leaves one core to the
rest of the process. `torch.set_num_threads` is called only when the count changes (it costs microseconds).
"""
from __future__ import annotations

import torch

SMALL_STEP_TOKENS = 4
PROCESS_THREADS = torch.get_num_threads()  # before any step changed it: torch's default (or OMP_NUM_THREADS)


class CpuThreads:
    def __init__(self, total: int | None = None, small_step_tokens: int = SMALL_STEP_TOKENS) -> None:
        self.total = total or PROCESS_THREADS
        self.small = max(1, self.total - 1)
        self.small_step_tokens = small_step_tokens
        self.current = torch.get_num_threads()

    def threads_for(self, num_tokens: int) -> int:
        return self.small if num_tokens <= self.small_step_tokens else self.total

    def set_for_step(self, num_tokens: int) -> None:
        want = self.threads_for(num_tokens)
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want
