"""Open-loop load generator: Poisson arrivals, Zipf or uniform adapter popularity, streamed completions.

    python -m clients.loadgen --url http://127.0.0.1:8000 --num-adapters 8 --adapter-pattern lora-{i} \\
        --rate 2,4,8 --num-requests 200 --duration 60 --prompt-len uniform:16:64 --max-tokens 32 --out results.json
    multiplex loadgen ...   (the same options)

Requests are sent at their planned arrival times whether or not earlier ones have finished (open loop), each as a
streamed completion through `AsyncClient`, so that the time to the first token is seen as a user sees it. A run
stops issuing after `--num-requests` requests or `--duration` seconds, whichever comes first, then waits at most
`--drain-timeout` seconds for the requests in flight (those still running then count as `unfinished` errors).
Several `--rate` values make a sweep: one run per rate, one after the other, and a PNG of latency against load
(`--plot`, default `<out>.png`; skipped with a message when matplotlib is not installed).

How a request names its adapter: `--adapter-in adapter_id` (default) sends this server's `adapter_id` field (and
the `X-Adapter-Id` header); `--adapter-in model` sends OpenAI's `model` field instead, which this server reads the
same way and which other OpenAI-compatible servers (vLLM's `--lora-modules` names) need, so that one generator
drives both (benchmarks/serving.py). Base-model requests name nothing either way.

Definitions, per successful request (seconds): latency = last byte - send; TTFT = first non-empty text delta - send;
TPOT = (latency - TTFT) / (output_tokens - 1), only for requests with at least 2 output tokens; output_tokens is the
server's `usage.completion_tokens`.

The JSON written by `--out`:
    version                      1
    config                       url, adapter_ids, adapter_in, popularity, zipf_s, base_fraction, prompt_len,
                                 max_tokens (distribution specs), temperature, ignore_eos, num_requests, duration_s,
                                 seed
    runs                         one object per rate, in the order given:
      rate                       requested arrival rate (requests/s)
      num_requests               requests issued
      num_completed              requests that finished successfully
      num_errors                 requests that failed (num_requests = num_completed + num_errors)
      errors                     {error type: count}; a type is the server's error type, "connection_error",
                                 "timeout", "incomplete_stream" or "unfinished"
      requests_by_adapter        {adapter id or "<base>": requests issued}
      duration_s                 first send to last completion
      request_throughput         completed requests / duration_s
      output_token_throughput    output tokens of completed requests / duration_s
      total_prompt_tokens        sum of usage.prompt_tokens over completed requests
      total_output_tokens        sum of usage.completion_tokens over completed requests
      ttft_s, tpot_s, latency_s  {"mean", "p50", "p90", "p99", "max", "count"} (null values when count is 0)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.client import AsyncClient
from clients.errors import MultiplexError
from clients.options import add_connection_arguments, client_kwargs
from clients.workload import Distribution, PlannedRequest, Workload

logger = logging.getLogger(__name__)

BASE = "<base>"  # requests_by_adapter key of the base model
ADAPTER_FIELDS = ("adapter_id", "model")  # how a request names its adapter (--adapter-in)
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    planned: PlannedRequest
    error_type: str | None = None  # None: success
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    end_s: float = 0.0  # seconds after the start of the run

    @property
    def tpot_s(self) -> float | None:
        if self.error_type is not None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


async def send_one(client: AsyncClient, planned: PlannedRequest, start: float, temperature: float,
                   ignore_eos: bool, adapter_in: str = "adapter_id") -> RequestResult:
    result = RequestResult(planned)
    names = {"model": planned.adapter_id} if adapter_in == "model" else {"adapter_id": planned.adapter_id}
    sent = time.perf_counter()
    stream = client.stream(planned.prompt, **names, max_tokens=planned.max_tokens, temperature=temperature,
                           ignore_eos=ignore_eos)
    try:
        async for _ in stream:
            if result.ttft_s is None:
                result.ttft_s = time.perf_counter() - sent
        usage = stream.usage
        result.prompt_tokens = usage.prompt_tokens if usage else 0
        result.output_tokens = usage.completion_tokens if usage else 0
    except MultiplexError as exc:
        result.error_type = exc.error_type
    except Exception as exc:  # a malformed answer must not end the run: count it like any other failure
        logger.warning("request %d failed: %r", planned.index, exc)
        result.error_type = type(exc).__name__
    finally:
        await stream.aclose()
    now = time.perf_counter()
    result.latency_s, result.end_s = now - sent, now - start
    return result


async def run_rate(client: AsyncClient, planned: list[PlannedRequest], *, temperature: float, ignore_eos: bool,
                   drain_timeout_s: float, adapter_in: str = "adapter_id") -> tuple[list[RequestResult], float]:
    """Send every planned request at its arrival time -> (results in plan order, first send to last answer)."""
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []
    for request in planned:
        delay = start + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(client, request, start, temperature, ignore_eos, adapter_in)))
    done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = time.perf_counter() - start
    results = [t.result() if t in done else RequestResult(p, "unfinished", end_s=end) for t, p in zip(tasks, planned)]
    first_send = planned[0].arrival_s if planned else 0.0
    last_end = max((r.end_s for r in results), default=first_send)
    return results, max(last_end - first_send, 1e-9)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    position = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None, "count": 0}
    return {"mean": sum(ordered) / len(ordered), **{f"p{q}": percentile(ordered, q) for q in PERCENTILES},
            "max": ordered[-1], "count": len(ordered)}


def report(rate: float, results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """One run's entry of the JSON `runs` list (fields documented in the module docstring)."""
    ok = [r for r in results if r.error_type is None]
    total_output = sum(r.output_tokens for r in ok)
    return {
        "rate": rate,
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_errors": len(results) - len(ok),
        "errors": dict(Counter(r.error_type for r in results if r.error_type is not None)),
        "requests_by_adapter": dict(Counter(r.planned.adapter_id or BASE for r in results)),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": total_output / duration_s,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": total_output,
        "ttft_s": summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "latency_s": summarize([r.latency_s for r in ok]),
    }


async def run_sweep(connection: dict[str, Any], workloads: list[Workload], *, num_requests: int,
                    duration_s: float, temperature: float, ignore_eos: bool, drain_timeout_s: float,
                    adapter_in: str = "adapter_id") -> list[dict]:
    runs = []
    async with AsyncClient(**connection) as client:
        for workload in workloads:
            planned = workload.plan(num_requests, duration_s)
            results, elapsed = await run_rate(client, planned, temperature=temperature, ignore_eos=ignore_eos,
                                              drain_timeout_s=drain_timeout_s, adapter_in=adapter_in)
            runs.append(report(workload.rate, results, elapsed))
    return runs


# -- output ----------------------------------------------------------------------------------------------------------

def format_run(run: dict[str, Any]) -> str:
    def ms(stats: dict[str, Any]) -> str:
        if not stats["count"]:
            return "-"
        return " / ".join(f"{stats[f'p{q}'] * 1e3:.1f}" for q in PERCENTILES)

    errors = ", ".join(f"{k}: {v}" for k, v in sorted(run["errors"].items())) or "none"
    return (f"rate {run['rate']:g} req/s: {run['num_completed']}/{run['num_requests']} completed in "
            f"{run['duration_s']:.1f} s, {run['request_throughput']:.2f} req/s, "
            f"{run['output_token_throughput']:.1f} output tok/s\n"
            f"  p50 / p90 / p99 ms   TTFT {ms(run['ttft_s'])}   TPOT {ms(run['tpot_s'])}   "
            f"latency {ms(run['latency_s'])}\n"
            f"  errors: {errors}")


def write_plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """TTFT, TPOT and latency percentiles against the achieved request rate; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"loadgen: matplotlib is not installed; skipping the plot {path} (pip install matplotlib)",
              file=sys.stderr)
        return False
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    loads = [run["request_throughput"] for run in runs]
    for ax, (key, title) in zip(axes, (("ttft_s", "time to first token"), ("tpot_s", "time per output token"),
                                       ("latency_s", "request latency"))):
        for q in PERCENTILES:
            values = [run[key][f"p{q}"] * 1e3 if run[key][f"p{q}"] is not None else float("nan") for run in runs]
            ax.plot(loads, values, marker="o", label=f"p{q}")
        ax.set(title=title, xlabel="throughput (requests/s)", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# -- command line ----------------------------------------------------------------------------------------------------

def parse_rates(values: list[str]) -> list[float]:
    rates = [float(x) for value in values for x in value.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--rate needs positive requests/s values, got {values}")
    return rates


def adapter_ids_of(args: argparse.Namespace) -> tuple[str, ...]:
    if args.adapters:
        return tuple(a.strip() for a in args.adapters.split(",") if a.strip())
    return tuple(args.adapter_pattern.format(i=i) for i in range(args.num_adapters))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", action="append", default=None,
                        help="arrival rate(s), requests/s; several (2,4,8 or repeated) make a sweep [default 1]")
    parser.add_argument("--num-requests", type=int, default=100, help="most requests per rate [%(default)s]")
    parser.add_argument("--duration", type=float, default=60.0, help="most seconds of arrivals per rate [%(default)s]")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for requests in flight after the last arrival [%(default)s]")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapters", help="adapter ids, most popular first: a,b,c")
    which.add_argument("--num-adapters", type=int, default=0, help="N adapters named by --adapter-pattern")
    parser.add_argument("--adapter-pattern", default="adapter-{i}", help="name of adapter i (0-based) [%(default)s]")
    parser.add_argument("--adapter-in", choices=ADAPTER_FIELDS, default="adapter_id",
                        help="the request field naming the adapter: adapter_id (this server's), or model (OpenAI's, "
                             "as vLLM's --lora-modules names are selected) [%(default)s]")
    parser.add_argument("--popularity", choices=("zipf", "uniform"), default="zipf")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent [%(default)s]")
    parser.add_argument("--base-fraction", type=float, default=0.0,
                        help="fraction of requests for the base model (1 when no adapter is named) [%(default)s]")
    parser.add_argument("--prompt-len", default="32", help="prompt words: N, uniform:LO:HI, normal:M:S or exp:M")
    parser.add_argument("--max-tokens", default="32", help="output tokens: N, uniform:LO:HI, normal:M:S or exp:M")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly max_tokens (default), so output lengths follow --max-tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="PNG of latency against load (default with a sweep: <out>.png)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        rates = parse_rates(args.rate or ["1"])
        adapter_ids = adapter_ids_of(args)
        base_fraction = args.base_fraction if adapter_ids else 1.0
        prompt_len, max_tokens = Distribution.parse(args.prompt_len), Distribution.parse(args.max_tokens)
        workloads = [Workload(rate, adapter_ids, args.popularity, args.zipf_s, base_fraction, prompt_len,
                              max_tokens, args.seed) for rate in rates]
        for workload in workloads:
            workload.plan(0, 0.0)  # validates before anything is sent
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    runs = asyncio.run(run_sweep(client_kwargs(args), workloads, num_requests=args.num_requests,
                                 duration_s=args.duration, temperature=args.temperature, ignore_eos=args.ignore_eos,
                                 drain_timeout_s=args.drain_timeout, adapter_in=args.adapter_in))
    for one in runs:
        print(format_run(one))
    config = {"url": args.url, "adapter_ids": list(adapter_ids), "adapter_in": args.adapter_in,
              "popularity": args.popularity, "zipf_s": args.zipf_s, "base_fraction": base_fraction,
              "prompt_len": str(prompt_len), "max_tokens": str(max_tokens), "temperature": args.temperature,
              "ignore_eos": args.ignore_eos, "num_requests": args.num_requests, "duration_s": args.duration,
              "seed": args.seed}
    if args.out:
        args.out.write_text(json.dumps({"version": 1, "config": config, "runs": runs}, indent=2) + "\n")
        print(f"wrote {args.out}")
    plot = args.plot or (args.out.with_suffix(".png") if args.out and len(runs) > 1 else None)
    if plot and write_plot(runs, plot):
        print(f"wrote {plot}")
    if any(one["num_requests"] and not one["num_completed"] for one in runs):  # measured nothing: say so
        print("loadgen: every request of a rate failed (see errors above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.loadgen", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
