"""Small-scale checks of two paper claims that `adapters.research.compare` does not test (see /work/shared/METHODS.md).

    python -m adapters.research.claims --model PATH --out DIR [--steps 150] [--jobs 2] [--only sweep|sift]

1. sweep: SpecAdapt and LoRA on one task (default `upper`) over ranks {2, 8, 32} x learning rates (`--lrs`, default
   {3e-3, 1e-2, 3e-2}, chosen for the tiny random backbone; a pretrained one wants smaller),
   the same data, steps and seed for both; per method, the mean, spread (max - min) and population std of the final
   held-out loss and exact-match accuracy across the 9 settings ("SpecAdapt varies less than LoRA").
2. sift: SIFT with rho chosen so that its trainable parameter count equals LoRA's at rank 8 on all seven projections
   (computed from the model's shapes), both at one lr (`--sift-lr`, default 1e-2), on the same tasks and steps ("SIFT matches LoRA at equal
   trainable parameters").

Every run is `adapters.research.compare.run_one` (through its `_job`) with that run's rank/options put in `HYPERPARAMS`
for the run's duration and its lr as the method's scale-1 lr (`Settings.lr`). Writes `DIR/claims.json` and
`DIR/claims.md`.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

from adapters.research import compare
from adapters.delta import PROJECTIONS
from adapters.methods.base import decoder_layers, projection_parent
from adapters.methods.sift import num_selected
from adapters.train import load_model_and_tokenizer

RANKS = (2, 8, 32)
LRS = (3e-3, 1e-2, 3e-2)


def projection_shapes(model_path: str) -> list[tuple[int, int]]:
    """(out, in) of each of the seven projections (q, k, v, o, gate, up, down) in every layer."""
    model, _ = load_model_and_tokenizer(model_path)
    layers = decoder_layers(model)
    return [tuple(getattr(projection_parent(layer, p), p).weight.shape) for layer in layers for p in PROJECTIONS]


def lora_count(shapes, rank: int) -> int:
    return sum(rank * (o + i) for o, i in shapes)


def sift_count(shapes, rho: float) -> int:
    return sum(num_selected(rho, o * i) for o, i in shapes)


def rho_for_count(shapes, target: int) -> float:
    """A rho whose SIFT count is `target` if one exists (else the smallest count above it): the middle of the rho
    interval [first rho reaching target, first rho reaching target + 1), found by bisection on the exact count."""
    def first_reaching(n: int) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if sift_count(shapes, mid) >= n else (mid, hi)
        return hi
    a = first_reaching(target)
    return (a + first_reaching(sift_count(shapes, a) + 1)) / 2


def _job(model_path: str, task: str, method: str, hp: dict, s: compare.Settings, seed: int) -> dict:
    s = replace(s, lr={method: hp["lr"]})
    with mock.patch.dict(compare.HYPERPARAMS, {method: {k: v for k, v in hp.items() if k != "lr"}}):
        r = compare._job(model_path, compare.Run(task, method, seed, 1.0), s)
    return asdict(r) | {"rank": hp.get("rank"), "options": hp.get("options")}


def _log(r: dict) -> dict:
    logging.info("%s / %s rank %s lr %g %s: loss %.4f, exact match %.3f, %d params, %.0f s", r["task"], r["method"],
                 r["rank"], r["lr"], r["options"] or "", r["eval_loss"], r["exact_match"], r["num_trainable"], r["wall_s"])
    return r


def run_jobs(model_path: str, specs: list[tuple[str, str, dict]], s: compare.Settings, seed: int,
             jobs: int) -> list[dict]:
    if jobs <= 1:
        return [_log(_job(model_path, t, m, hp, s, seed)) for t, m, hp in specs]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [_log(r) for r in pool.map(_job, *zip(*[(model_path, t, m, hp, s, seed) for t, m, hp in specs]))]


def sweep_tables(rows: list[dict], lrs: tuple[float, ...] = LRS) -> str:
    lines = ["| method | metric | mean | spread (max-min) | std | min | max |", "| --- " * 7 + "|"]
    for m in ("lora", "specadapt"):
        for key, name in (("eval_loss", "eval loss"), ("token_accuracy", "token accuracy"),
                          ("exact_match", "exact match")):
            v = [r[key] for r in rows if r["method"] == m]
            lines.append(f"| {m} | {name} | {statistics.mean(v):.3f} | {max(v) - min(v):.3f} | "
                         f"{statistics.pstdev(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    lines += ["", "| method | rank | " + " | ".join(f"lr {lr:g}: loss / token acc / EM" for lr in lrs) + " |",
              "| --- " * (2 + len(lrs)) + "|"]
    by = {(r["method"], r["rank"], r["lr"]): r for r in rows}
    for m in ("lora", "specadapt"):
        for rank in RANKS:
            cells = " | ".join(f"{by[m, rank, lr]['eval_loss']:.3f} / {by[m, rank, lr]['token_accuracy']:.3f} / "
                               f"{by[m, rank, lr]['exact_match']:.3f}" for lr in lrs)
            lines.append(f"| {m} | {rank} | {cells} |")
    return "\n".join(lines)


def sift_table(rows: list[dict], tasks: list[str]) -> str:
    head = "| method | trainable params | " + " | ".join(f"{t}: loss / token acc / EM" for t in tasks) + " |"
    lines = [head, "| --- " * (2 + len(tasks)) + "|"]
    for m in ("lora", "sift"):
        mine = {r["task"]: r for r in rows if r["method"] == m}
        cells = " | ".join(f"{mine[t]['eval_loss']:.3f} / {mine[t]['token_accuracy']:.3f} / {mine[t]['exact_match']:.3f}"
                           for t in tasks)
        lines.append(f"| {m} | {mine[tasks[0]]['num_trainable']:,} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapters.research.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", choices=("sweep", "sift"), default=None, help="run one experiment (default: both)")
    p.add_argument("--sweep-task", default="upper")
    p.add_argument("--sift-tasks", default="upper,lookup")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=64, help="held-out examples (all decoded for exact match)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="sweep: comma-separated learning rates")
    p.add_argument("--sift-lr", type=float, default=1e-2, help="sift: the lr of both SIFT and LoRA")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("adapters.train").setLevel(logging.WARNING)
    s = compare.Settings(steps=args.steps, batch_size=args.batch_size, num_train=args.num_train, num_eval=args.num_eval,
                         num_decode=args.num_eval, eval_every=args.eval_every, max_new_tokens=12,
                         device="cpu", dtype="fp32", progress=False)
    sift_tasks = args.sift_tasks.split(",")
    lrs = tuple(float(x) for x in args.lrs.split(","))
    shapes = projection_shapes(args.model)
    lora_n = lora_count(shapes, 8)
    rho = rho_for_count(shapes, lora_n)
    logging.getLogger(__name__).info("LoRA rank 8 on all seven (%d matrices): %s params; SIFT rho %r: %s params",
                                     len(shapes), f"{lora_n:,}", rho, f"{sift_count(shapes, rho):,}")

    specs: list[tuple[str, str, dict]] = []
    if args.only in (None, "sift"):
        specs += [(t, "lora", {"lr": args.sift_lr, "rank": 8, "options": {"targets": PROJECTIONS}}) for t in sift_tasks]
        specs += [(t, "sift", {"lr": args.sift_lr, "options": {"rho": rho}}) for t in sift_tasks]
    if args.only in (None, "sweep"):
        specs += [(args.sweep_task, m, {**compare.HYPERPARAMS[m], "rank": r, "lr": lr})
                  for m in ("lora", "specadapt") for r in RANKS for lr in lrs]
    started = time.perf_counter()
    rows = run_jobs(args.model, specs, s, args.seed, args.jobs)
    n_sift = 2 * len(sift_tasks) if args.only in (None, "sift") else 0
    md = [f"Settings: {args.steps} steps, batch {args.batch_size}, {args.num_train} train / {args.num_eval} held-out "
          f"examples, seed {args.seed}, model {args.model}."]
    if n_sift:
        md += ["", f"## SIFT (rho {rho:.6f}) vs LoRA rank 8, lr {args.sift_lr:g}, equal trainable parameters", "",
               sift_table(rows[:n_sift], sift_tasks)]
    if len(rows) > n_sift:
        md += ["", f"## LoRA vs SpecAdapt on `{args.sweep_task}`, ranks {RANKS} x lrs {lrs} (std: population)", "",
               sweep_tables(rows[n_sift:], lrs)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = round(time.perf_counter() - started, 1)
    (out / "claims.md").write_text("\n".join(md) + "\n")
    report = {"settings": asdict(s), "seed": args.seed, "lora_rank8_params": lora_n, "sift_rho": rho, "total_wall_s": wall,
              "results": rows, "markdown": "\n".join(md)}
    (out / "claims.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(md) + f"\n\nwall {wall} s; wrote {out / 'claims.json'} and {out / 'claims.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
