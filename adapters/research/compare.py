"""Compare every training method on one small model and the synthetic tasks, with fixed hyper-parameters.

    python -m adapters.research.compare --model PATH --out DIR [--quick] [--methods lora,sorsa] [--tasks upper,lookup]

For each (task, method): a fresh copy of the backbone, the method's fixed hyper-parameters (`HYPERPARAMS`, the
same for every task; chosen once for small models, not tuned per task), the same seeded data and number of steps.
Reported: final held-out loss, exact-match accuracy of greedy decoding on the held-out prompts, trainable
parameters, training wall time. Writes `DIR/compare.json`, and `DIR/loss_curves.png` when matplotlib is installed.

On a randomly initialised backbone (such as the server's `tiny`), the singular directions that PiSSA, SORSA and
SpecAdapt start from carry no pretrained knowledge; read their numbers with that in mind.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.data import make_task, pad_token_id, split_heldout, tokenize_records
from adapters.methods import METHODS, Method
from adapters.train import DTYPES, FitOptions, build_method, fit, load_model_and_tokenizer, seed_everything

logger = logging.getLogger(__name__)

# Fixed per-method hyper-parameters for small models (rank 8 where a rank applies, the methods' own defaults
# otherwise). Small random backbones want much larger steps than the 7B-scale defaults of the method files.
HYPERPARAMS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 1e-2, "rank": 8},
    "pissa": {"lr": 1e-2, "rank": 8},
    "sorsa": {"lr": 1e-2, "rank": 8, "options": {"gamma": 4e-4}},
    "specadapt": {"lr": 1e-2, "rank": 8},
    "alora": {"lr": 1e-2, "rank": 8, "options": {"rounds": 4}},
    "sift": {"lr": 1e-2, "options": {"rho": 0.01}},
    "para": {"lr": 1e-2, "rank": 12},
    "ia3": {"lr": 1e-1},
}
DEFAULT_TASKS = ("upper", "reverse", "lookup")
QUICK_TASKS = ("upper", "lookup")


@dataclass
class Settings:
    """What every run of one comparison shares."""

    steps: int
    batch_size: int
    num_train: int
    num_eval: int
    num_decode: int
    eval_every: int
    max_new_tokens: int
    seed: int
    device: str
    dtype: str
    progress: bool
    lr: dict[str, float] = field(default_factory=dict)  # per-method overrides of HYPERPARAMS' lr


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    eval_loss: float | None
    accuracy: float
    num_trainable: int
    wall_s: float
    train_curve: list[tuple[int, float]]
    eval_curve: list[tuple[int, float]]


@torch.no_grad()
def greedy_completion(model: nn.Module, method: Method, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy decoding without a KV cache (tiny models): the whole sequence is re-run for every new token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prompt_ids], device=device)  # (1, P)
    new: list[int] = []
    for _ in range(max_new_tokens):
        prompt_mask = torch.arange(ids.shape[1], device=device)[None] < len(prompt_ids)  # (1, T)
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
            **method.forward_kwargs({"prompt_mask": prompt_mask}),
        ).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], 1)
    return tokenizer.decode(new, skip_special_tokens=True)


def exact_match(model, method, tokenizer, records, max_new_tokens: int, device) -> float:
    model.eval()
    hits = sum(
        greedy_completion(model, method, tokenizer, r["prompt"], max_new_tokens, device).strip() == r["completion"].strip()
        for r in records
    )
    return hits / max(1, len(records))


def task_data(tokenizer, task: str, s: Settings) -> dict:
    """The seeded train / held-out split of one task, tokenised (the same for every method)."""
    records = make_task(task, s.num_train + s.num_eval, seed=s.seed)
    train_records, eval_records = split_heldout(records, s.num_eval / (s.num_train + s.num_eval), s.seed)
    return {
        "train": tokenize_records(tokenizer, train_records),
        "eval": tokenize_records(tokenizer, eval_records),
        "eval_records": eval_records,
    }


def run_one(base: nn.Module, tokenizer, task: str, method_name: str, data: dict, s: Settings) -> RunResult:
    hp = HYPERPARAMS[method_name]
    lr = s.lr.get(method_name, hp["lr"])
    seed_everything(s.seed)
    model = copy.deepcopy(base)
    method = build_method(method_name, model, rank=hp.get("rank"), options=hp.get("options"))
    opts = FitOptions(
        lr=lr, max_steps=s.steps, batch_size=s.batch_size, seed=s.seed, eval_every=s.eval_every,
        progress=s.progress, device=s.device,
    )
    result = fit(model, method, data["train"], data["eval"], pad_token_id(tokenizer), opts)
    acc = exact_match(model, method, tokenizer, data["eval_records"][: s.num_decode], s.max_new_tokens, s.device)
    return RunResult(
        task=task, method=method_name, lr=lr, eval_loss=result.final_eval_loss, accuracy=acc,
        num_trainable=method.num_trainable_parameters(), wall_s=result.wall_s,
        train_curve=result.train_losses, eval_curve=result.eval_losses,
    )


def _job(model_path: str, task: str, method_name: str, s: Settings) -> RunResult:
    """One run in a worker process (one torch thread: tiny models gain nothing from more)."""
    torch.set_num_threads(1)
    base, tokenizer = load_model_and_tokenizer(model_path, s.dtype, s.device)
    return run_one(base, tokenizer, task, method_name, task_data(tokenizer, task, s), s)


def run_all(model_path: str, tasks: list[str], methods: list[str], s: Settings, jobs: int = 1) -> list[RunResult]:
    """Every (task, method) pair; with jobs > 1, in that many worker processes (CPU only)."""
    pairs = [(t, m) for t in tasks for m in methods]
    if jobs <= 1:
        base, tokenizer = load_model_and_tokenizer(model_path, s.dtype, s.device)
        results = []
        for task in tasks:
            data = task_data(tokenizer, task, s)
            for m in methods:
                results.append(run_one(base, tokenizer, task, m, data, s))
                _log(results[-1])
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_job, model_path, t, m, s) for t, m in pairs]
        results = []
        for f in futures:
            results.append(f.result())
            _log(results[-1])
    return results


def _log(r: RunResult) -> None:
    logger.info("%s / %s (lr %g): eval loss %.4f, exact match %.3f, %.1f s",
                r.task, r.method, r.lr, r.eval_loss, r.accuracy, r.wall_s)


def format_table(results: list[RunResult], tasks: list[str], methods: list[str]) -> str:
    """One row per method: parameters, lr, per task final held-out loss and exact match, mean accuracy, wall time."""
    by = {(r.task, r.method): r for r in results}
    per_task = " ".join(f"{t[:8] + ' loss':>13} {t[:8] + ' acc':>12}" for t in tasks)
    head = f"{'method':<10} {'params':>8} {'lr':>7} {per_task}"
    head += f" {'mean acc':>9} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for m in methods:
        rows = [by[(t, m)] for t in tasks]
        cells = " ".join(f"{r.eval_loss:>13.4f} {r.accuracy:>12.3f}" for r in rows)
        mean_acc = sum(r.accuracy for r in rows) / len(rows)
        wall = sum(r.wall_s for r in rows)
        lines.append(f"{m:<10} {rows[0].num_trainable:>8d} {rows[0].lr:>7.0e} {cells} {mean_acc:>9.3f} {wall:>8.1f}")
    return "\n".join(lines)


def plot_curves(results: list[RunResult], tasks: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the loss-curve PNG (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r.task == task):
            steps, losses = zip(*r.eval_curve) if r.eval_curve else ((), ())
            ax.plot(steps, losses, marker=".", label=r.method)
        ax.set_title(f"{task}: held-out loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapters.research.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF checkpoint directory")
    p.add_argument("--out", required=True, help="directory for compare.json (and loss_curves.png)")
    p.add_argument("--quick", action="store_true", help=f"tasks {','.join(QUICK_TASKS)}, 60 steps, small data")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 400; quick 60)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-train", type=int, default=None, help="training examples per task (default 2000; quick 256)")
    p.add_argument("--num-eval", type=int, default=None, help="held-out examples per task (default 128; quick 48)")
    p.add_argument("--num-decode", type=int, default=None, help="held-out prompts decoded for accuracy (default: all)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--lr", default=None, help="per-method learning-rate overrides, e.g. lora=1e-2,ia3=0.1")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (CPU), one run each at a time")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_lr_overrides(text: str | None) -> dict[str, float]:
    """'lora=1e-2,ia3=0.1' -> {'lora': 0.01, 'ia3': 0.1}."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            raise SystemExit(f"--lr: expected METHOD=LR items, got {item!r}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    steps = args.steps or (60 if args.quick else 400)
    num_eval = args.num_eval or (48 if args.quick else 128)
    settings = Settings(
        steps=steps, batch_size=args.batch_size, num_train=args.num_train or (256 if args.quick else 2000),
        num_eval=num_eval, num_decode=args.num_decode or num_eval, eval_every=args.eval_every or max(1, steps // 10),
        max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device, dtype=args.dtype,
        progress=not args.no_progress and args.jobs <= 1, lr=parse_lr_overrides(args.lr),
    )
    if args.jobs > 1 and not str(args.device).startswith("cpu"):
        raise SystemExit("--jobs > 1 runs on CPU only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_all(args.model, tasks, methods, settings, args.jobs)
    table = format_table(results, tasks, methods)
    print(table)
    report = {
        "model": str(args.model),
        "settings": asdict(settings),
        "hyperparams": {m: {**HYPERPARAMS[m], "lr": settings.lr.get(m, HYPERPARAMS[m]["lr"])} for m in methods},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "results": [asdict(r) for r in results],
        "table": table,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    png = plot_curves(results, tasks, out / "loss_curves.png")
    print(f"wrote {out / 'compare.json'}" + (f" and {png}" if png else " (no PNG: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
