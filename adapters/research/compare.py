"""Compare every training method on one model and the synthetic tasks: several seeds, the authors' learning rates
and multiples of them.

    python -m adapters.research.compare --model PATH --out DIR [--quick] [--methods lora,sorsa] [--tasks upper,lookup]
        [--seeds 0,1,2] [--lr-scales 1,10,100] [--sweep-seeds 0] [--lr lora=1e-3] [--chat] [--jobs N]

The grid: for each task and seed, the base model (no training) is measured once, then each (method, lr scale)
trains a fresh copy of the backbone. The seed draws the task's records, the train / held-out split, the batch order
and any random init (LoRA's A, ALoRA's new ranks, PARA's generators). The learning rate is a multiple (`--lr-scales`)
of the method's AUTHORS' peak lr (`Method.defaults.lr`, docs/method_defaults.md; `--lr` replaces that base for a
method), and every other optimisation option (schedule, warm-up, weight decay, clipping) is the authors' too, as
`adapters.train.fit` takes them for every option left unset. Ranks and method options: `HYPERPARAMS`.

Measured on the held-out split, for the base model and after training:
  * held-out loss: token-mean CE over the completion tokens and the closing EOS (the trainer's loss);
  * token accuracy: teacher-forced next-token accuracy over the same tokens (argmax == label), the main graded
    metric: a small pretrained model is at 0% exact match on every task before training;
  * exact match of greedy decoding (secondary).
Per (task, method, lr scale) cell: mean and sample std (n - 1) over seeds. Writes DIR/compare.json (every run,
curves included, and the cells), DIR/compare.md (the table) and DIR/loss_curves.png (when matplotlib is installed):
mean held-out loss over seeds per method, one panel per task, at the authors' lr and, when several scales ran, at
each method's best scale (lowest mean final held-out loss: chosen on the held-out split, so optimistic).

ALoRA at the authors' settings (N_A 8 rounds, r 8 on all seven projections) scores every live rank with two passes
of its score batch per round: 26,880 per run on SmolLM2-135M's 30 layers, each from the rank's layer on
(adapters/methods/alora_scoring.py; about a third of a whole forward on average), about an hour on one CPU core
(the script logs the count when ALoRA is asked for).

On a randomly initialised backbone (such as the server's `tiny`), the singular directions that PiSSA, SORSA and
SpecAdapt start from carry no pretrained knowledge, and the authors' learning rates (set for thousands of steps on
pretrained models) barely move it in a few hundred steps: read the numbers with that in mind, and sweep the scale.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.data import make_task, pad_token_id, split_heldout, tokenize_records
from adapters.methods import METHODS, Method, get_method
from adapters.train import (
    DTYPES,
    FitOptions,
    batches_of,
    build_method,
    fit,
    load_model_and_tokenizer,
    method_config,
    seed_everything,
)
from adapters.research.metrics import exact_match, heldout_metrics

logger = logging.getLogger(__name__)

# Rank 8 wherever a rank applies (hidden size 576 at SmolLM2-135M: r 8 is already ~1.4% of it, where the authors'
# r 128 at 7B is ~3% of 4096), every other method option the authors' (the Config defaults; PARA's r 12 is its
# default). No overrides: an entry's "options" would replace a Config default, and must say why here.
HYPERPARAMS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8},
    "pissa": {"rank": 8},
    "sorsa": {"rank": 8},
    "specadapt": {"rank": 8},
    "alora": {"rank": 8},
    "sift": {},
    "para": {},
    "ia3": {},
}
DEFAULT_TASKS = ("upper", "reverse", "lookup")
QUICK_TASKS = ("upper", "lookup")
BASE = "base"  # the method name of the untrained model's rows


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
    device: str
    dtype: str
    progress: bool
    chat: bool = False  # prompts rendered with the model's chat template (as /v1/chat/completions does)
    lr: dict[str, float] = field(default_factory=dict)  # per-method replacements of the authors' lr (scale 1)


@dataclass(frozen=True)
class Run:
    """One unit of the grid: the base model's measurement (method BASE, lr_scale None) or one training run."""

    task: str
    method: str
    seed: int
    lr_scale: float | None = None


@dataclass
class RunResult:
    task: str
    method: str
    seed: int
    lr_scale: float | None
    lr: float | None
    eval_loss: float | None
    token_accuracy: float
    exact_match: float
    num_trainable: int
    wall_s: float
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)


def base_lr(method_name: str, s: Settings) -> float:
    """Scale 1: the method's authors' peak lr (what `fit` uses when lr is unset), unless `--lr` replaced it."""
    return s.lr.get(method_name, get_method(method_name).defaults.lr)


# -- runs -----------------------------------------------------------------------------------------------------
def task_data(tokenizer, task: str, seed: int, s: Settings) -> dict:
    """The seeded train / held-out split of one task, tokenised (the same for every method at this seed)."""
    records = make_task(task, s.num_train + s.num_eval, seed=seed)
    train_records, eval_records = split_heldout(records, s.num_eval / (s.num_train + s.num_eval), seed)
    return {
        "train": tokenize_records(tokenizer, train_records, chat=s.chat),
        "eval": tokenize_records(tokenizer, eval_records, chat=s.chat),
        "eval_records": eval_records,
    }


def measure(model, method: Method | None, tokenizer, data: dict, s: Settings) -> tuple[float, float, float]:
    """(held-out loss, token accuracy, exact match) of `model` as it is now."""
    batches = batches_of(data["eval"], s.batch_size, pad_token_id(tokenizer), s.device)
    loss, acc = heldout_metrics(model, method, batches)
    em = exact_match(model, method, tokenizer, data["eval_records"][: s.num_decode], s.max_new_tokens, s.device, s.chat)
    return loss, acc, em


def run_base(base: nn.Module, tokenizer, run: Run, data: dict, s: Settings) -> RunResult:
    loss, acc, em = measure(base, None, tokenizer, data, s)
    return RunResult(task=run.task, method=BASE, seed=run.seed, lr_scale=None, lr=None, eval_loss=loss,
                     token_accuracy=acc, exact_match=em, num_trainable=0, wall_s=0.0)


def run_one(base: nn.Module, tokenizer, run: Run, data: dict, s: Settings) -> RunResult:
    """Train a fresh copy of `base` with `run.method` at lr = base_lr * run.lr_scale; measure it."""
    if run.method == BASE:
        return run_base(base, tokenizer, run, data, s)
    hp = HYPERPARAMS[run.method]
    lr = base_lr(run.method, s) * run.lr_scale
    seed_everything(run.seed)
    model = copy.deepcopy(base)
    method = build_method(run.method, model, rank=hp.get("rank"), options=hp.get("options"))
    opts = FitOptions(lr=lr, max_steps=s.steps, batch_size=s.batch_size, seed=run.seed, eval_every=s.eval_every,
                      progress=s.progress, device=s.device)
    result = fit(model, method, data["train"], data["eval"], pad_token_id(tokenizer), opts)
    loss, acc, em = measure(model, method, tokenizer, data, s)
    return RunResult(
        task=run.task, method=run.method, seed=run.seed, lr_scale=run.lr_scale, lr=lr, eval_loss=loss,
        token_accuracy=acc, exact_match=em, num_trainable=method.num_trainable_parameters(), wall_s=result.wall_s,
        train_curve=result.train_losses, eval_curve=result.eval_losses,
    )


def make_grid(tasks: list[str], methods: list[str], seeds: list[int], lr_scales: list[float],
              sweep_seeds: list[int] | None = None) -> list[Run]:
    """Per task and seed: the base measurement, then every method at scale 1 (all seeds) and at the other scales
    (only the seeds in `sweep_seeds`, default all)."""
    sweep = set(seeds if sweep_seeds is None else sweep_seeds)
    grid = []
    for task in tasks:
        for seed in seeds:
            grid.append(Run(task, BASE, seed))
            grid += [Run(task, m, seed, x) for m in methods for x in lr_scales if x == 1 or seed in sweep]
    return grid


_LOADED: dict[tuple, tuple[nn.Module, Any]] = {}


def loaded(model_path: str, s: Settings):
    """The backbone and tokenizer, loaded once per process (runs deep-copy the backbone)."""
    key = (str(model_path), s.dtype, s.device)
    if key not in _LOADED:
        _LOADED[key] = load_model_and_tokenizer(model_path, s.dtype, s.device)
    return _LOADED[key]


def _job(model_path: str, run: Run, s: Settings) -> RunResult:
    """One run in a worker process (one torch thread: with several workers, more threads only contend)."""
    torch.set_num_threads(1)
    base, tokenizer = loaded(model_path, s)
    return run_one(base, tokenizer, run, task_data(tokenizer, run.task, run.seed, s), s)


def run_all(model_path: str, grid: list[Run], s: Settings, jobs: int = 1) -> list[RunResult]:
    """Every run of `grid`, in order, on one torch thread; with jobs > 1, in that many worker processes (CPU only)."""
    if jobs <= 1:
        torch.set_num_threads(1)
        base, tokenizer = loaded(model_path, s)
        data: dict[tuple[str, int], dict] = {}
        results = []
        for run in grid:
            if (run.task, run.seed) not in data:
                data = {(run.task, run.seed): task_data(tokenizer, run.task, run.seed, s)}  # one split held at a time
            results.append(_log(run_one(base, tokenizer, run, data[run.task, run.seed], s)))
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_job, model_path, run, s) for run in grid]
        return [_log(f.result()) for f in futures]


def _log(r: RunResult) -> RunResult:
    where = "no training" if r.method == BASE else f"x{r.lr_scale:g} lr {r.lr:.1e}, {r.wall_s:.1f} s"
    logger.info("%s / %s seed %d (%s): held-out loss %.4f, token acc %.3f, exact match %.3f",
                r.task, r.method, r.seed, where, r.eval_loss, r.token_accuracy, r.exact_match)
    return r


# -- aggregation ----------------------------------------------------------------------------------------------
METRICS = ("eval_loss", "token_accuracy", "exact_match")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None with one value); a non-finite value (a diverged run) makes both NaN."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(results: list[RunResult]) -> list[dict]:
    """One cell per (task, method, lr scale), in first-seen order: n seeds, lr, and mean / std of each metric."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.method, r.lr_scale), []).append(r)
    cells = []
    for (task, method, scale), rs in groups.items():
        cell: dict[str, Any] = {"task": task, "method": method, "lr_scale": scale, "lr": rs[0].lr,
                                "seeds": [r.seed for r in rs], "num_trainable": rs[0].num_trainable,
                                "wall_s_mean": statistics.fmean(r.wall_s for r in rs)}
        for key in METRICS:
            mean, std = _mean_std([float("nan") if getattr(r, key) is None else getattr(r, key) for r in rs])
            cell[f"{key}_mean"], cell[f"{key}_std"] = mean, std
        cells.append(cell)
    return cells


def best_scales(cells: list[dict]) -> dict[tuple[str, str], float]:
    """(task, method) -> the lr scale with the lowest finite mean held-out loss (chosen on the held-out split)."""
    best: dict[tuple[str, str], dict] = {}
    for c in cells:
        key = (c["task"], c["method"])
        if c["method"] == BASE or not math.isfinite(c["eval_loss_mean"]):
            continue
        if key not in best or c["eval_loss_mean"] < best[key]["eval_loss_mean"]:
            best[key] = c
    return {k: c["lr_scale"] for k, c in best.items()}


def _pm(mean: float, std: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± " + ("n/a" if std is None else f"{std:.{digits}f}")


def format_table(cells: list[dict]) -> str:
    """Markdown: one row per cell, the base model first in each task; mean ± sample std over the seeds."""
    lines = ["| task | method | lr scale | lr | seeds | held-out loss | token accuracy | exact match | params | train s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = sorted(range(len(cells)), key=lambda i: (cells[i]["task"], cells[i]["method"] != BASE, i))
    for c in (cells[i] for i in order):
        is_base = c["method"] == BASE
        row = [
            c["task"], "base (no training)" if is_base else c["method"],
            "-" if is_base else f"x{c['lr_scale']:g}", "-" if is_base else f"{c['lr']:.1e}", str(len(c["seeds"])),
            _pm(c["eval_loss_mean"], c["eval_loss_std"]), _pm(c["token_accuracy_mean"], c["token_accuracy_std"]),
            _pm(c["exact_match_mean"], c["exact_match_std"]), f"{c['num_trainable']:,}",
            "-" if is_base else f"{c['wall_s_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mean_curve(runs: list[RunResult]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (0 with one run) of the held-out loss curves of `runs` (same steps in every run)."""
    steps = [step for step, _ in runs[0].eval_curve]
    per_step = list(zip(*[[loss for _, loss in r.eval_curve] for r in runs]))
    means = [statistics.fmean(v) for v in per_step]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
    return steps, means, stds


def plot_curves(results: list[RunResult], tasks: list[str], methods: list[str], path: Path) -> Path | None:
    """Rows: the authors' lr (scale 1) and, with several scales, each method's best scale; one column per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the loss-curve PNG (pip install matplotlib)")
        return None
    trained = [r for r in results if r.method != BASE and r.eval_curve]
    if not trained:
        return None
    best = best_scales(aggregate(trained))
    scales = {r.lr_scale for r in trained}
    rows = [("authors' lr (x1)", lambda t, m: 1.0)] if 1 in scales else []
    if len(scales) > 1 or not rows:
        rows.append(("best lr scale per method (lowest final held-out loss)", lambda t, m: best.get((t, m))))
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(5.5 * len(tasks), 4.2 * len(rows)), squeeze=False)
    for (title, scale_of), ax_row in zip(rows, axes):
        for ax, task in zip(ax_row, tasks):
            for m in methods:
                scale = scale_of(task, m)
                runs = [r for r in trained if r.task == task and r.method == m and r.lr_scale == scale]
                if not runs:
                    continue
                steps, means, stds = mean_curve(runs)
                line, = ax.plot(steps, means, marker=".", label=f"{m} x{scale:g}" if len(rows) > 1 else m)
                low = [mu - sd for mu, sd in zip(means, stds)]
                high = [mu + sd for mu, sd in zip(means, stds)]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
            ax.set_title(f"{task}: held-out loss, {title}", fontsize=9)
            ax.set_xlabel("step (0 = the base model)")
            ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"mean over seeds (band: ± sample std), n seeds = {len({r.seed for r in trained})}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- CLI ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapters.research.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF checkpoint directory")
    p.add_argument("--out", required=True, help="directory for compare.json, compare.md (and loss_curves.png)")
    p.add_argument("--quick", action="store_true", help=f"tasks {','.join(QUICK_TASKS)}, 60 steps, small data")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: all; '' measures the base model only)")
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--seeds", default="0",
                   help="comma-separated seeds: the data, its split and order, random inits (default 0)")
    p.add_argument("--lr-scales", default="1",
                   help="comma-separated multiples of each method's authors' lr (or of its --lr); default 1")
    p.add_argument("--sweep-seeds", default=None,
                   help="seeds at which the lr scales other than 1 run (default: every seed of --seeds)")
    p.add_argument("--lr", default=None,
                   help="per-method replacements of the authors' lr as scale 1, e.g. lora=1e-2,ia3=0.1")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 400; quick 60)")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--num-train", type=int, default=None, help="training examples per task (default 2000; quick 256)")
    p.add_argument("--num-eval", type=int, default=None, help="held-out examples per task (default 128; quick 48)")
    p.add_argument("--num-decode", type=int, default=None, help="held-out prompts decoded for exact match "
                                                                "(default: all held-out)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default steps/10)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy decoding budget for exact match (default 12)")
    p.add_argument("--chat", action="store_true", help="render prompts with the model's chat template")
    p.add_argument("--device", default="cpu", help="default cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (CPU), one run each at a time; every run "
                                                        "uses one torch thread (default 1)")
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


def parse_list(text: str | None, kind, flag: str) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(t) for t in (t.strip() for t in text.split(",")) if t]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag}: empty")
    return values


def settings_from_args(args: argparse.Namespace) -> Settings:
    steps = args.steps or (60 if args.quick else 400)
    num_eval = args.num_eval or (48 if args.quick else 128)
    return Settings(
        steps=steps, batch_size=args.batch_size, num_train=args.num_train or (256 if args.quick else 2000),
        num_eval=num_eval, num_decode=args.num_decode or num_eval, eval_every=args.eval_every or max(1, steps // 10),
        max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
        progress=not args.no_progress and args.jobs <= 1, chat=args.chat, lr=parse_lr_overrides(args.lr),
    )


def method_record(m: str, s: Settings) -> dict:
    """What a method ran with: rank / options (HYPERPARAMS), scale-1 lr and where the recipe comes from."""
    d = get_method(m).defaults
    return {**HYPERPARAMS[m], "lr_scale_1": base_lr(m, s), "authors_lr": d.lr, "schedule": d.schedule,
            "warmup_ratio": d.warmup_ratio, "weight_decay": d.weight_decay, "max_grad_norm": d.max_grad_norm,
            "defaults_source": d.source}


def warn_alora_cost(model_path: str, methods: list[str]) -> None:
    """ALoRA scores every live rank with two forwards of its score batch per round: on a 30-layer model with the
    authors' seven targets that is hours of CPU per run, so say it before starting."""
    if "alora" not in methods:
        return
    from transformers import AutoConfig

    cfg = method_config_of("alora")
    layers = AutoConfig.from_pretrained(model_path, local_files_only=True).num_hidden_layers
    forwards = cfg.rounds * 2 * cfg.rank * len(cfg.targets) * layers
    logger.warning("alora: %d rounds x 2 x %d live ranks = %d passes of its score batch per run (each from the rank's "
                   "layer on), on top of training", cfg.rounds, cfg.rank * len(cfg.targets) * layers, forwards)


def method_config_of(name: str):
    hp = HYPERPARAMS[name]
    return method_config(name, rank=hp.get("rank"), options=hp.get("options"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    seeds = parse_list(args.seeds, int, "--seeds")
    lr_scales = parse_list(args.lr_scales, float, "--lr-scales")
    sweep_seeds = parse_list(args.sweep_seeds, int, "--sweep-seeds")
    if args.jobs > 1 and not str(args.device).startswith("cpu"):
        raise SystemExit("--jobs > 1 runs on CPU only")
    settings = settings_from_args(args)
    warn_alora_cost(args.model, methods)
    grid = make_grid(tasks, methods, seeds, lr_scales, sweep_seeds)
    logger.info("%d runs (%d base measurements)", len(grid), sum(r.method == BASE for r in grid))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_all(args.model, grid, settings, args.jobs)
    cells = aggregate(results)
    table = format_table(cells)
    print(table)
    report = {
        "model": str(args.model),
        "settings": asdict(settings),
        "grid": {"tasks": tasks, "methods": methods, "seeds": seeds, "lr_scales": lr_scales,
                 "sweep_seeds": sweep_seeds if sweep_seeds is not None else seeds},
        "hyperparams": {m: method_record(m, settings) for m in methods},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "cells": cells,
        "best_lr_scale": [{"task": t, "method": m, "lr_scale": x} for (t, m), x in best_scales(cells).items()],
        "runs": [asdict(r) for r in results],
        "table": table,
    }
    print(write_outputs(out, report, results, tasks, methods))
    return 0


def write_outputs(out: Path, report: dict, results: list[RunResult], tasks: list[str], methods: list[str],
                  note: str = "") -> str:
    """DIR/compare.json (the report), compare.md (a line on the settings, then the table), loss_curves.png.
    -> a line naming what was written."""
    s = report["settings"]
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    seeds = sorted({r.seed for r in results})
    (out / "compare.md").write_text(f"Model {report['model']}; {s['steps']} steps, batch {s['batch_size']}, "
                                    f"{s['num_train']} train / {s['num_eval']} held-out examples, seeds {seeds}; "
                                    f"mean ± sample std over seeds.{note}\n\n{report['table']}\n")
    png = plot_curves(results, tasks, methods, out / "loss_curves.png")
    return f"wrote {out / 'compare.json'}, {out / 'compare.md'}" + (f" and {png}" if png else "")


if __name__ == "__main__":
    raise SystemExit(main())
