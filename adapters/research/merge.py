"""Merge the runs of several `adapters.research.compare` outputs into one comparison (its cells, table and curves),
as if one grid had run them: runs made at different times or on different machines, with the same settings.

    python -m adapters.research.merge --out DIR IN_DIR [IN_DIR ...]

Each IN_DIR holds a compare.json. Their settings (steps, batch size, data sizes, evaluation, dtype, chat) must be
equal, or the merge is refused by name. A run (task, method, seed, lr scale) found in several inputs is taken from
the first and the others are reported. Writes DIR/compare.json (with `merged_from`), compare.md, loss_curves.png.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from adapters.research.compare import BASE, RunResult, aggregate, best_scales, format_table, write_outputs

logger = logging.getLogger(__name__)

# Settings that change what a run measures; `device`, `progress` and the like do not.
SAME = ("steps", "batch_size", "num_train", "num_eval", "num_decode", "eval_every", "max_new_tokens", "dtype", "chat")


def load(path: Path) -> dict:
    report = json.loads((path / "compare.json").read_text())
    report["runs"] = [RunResult(**{**r, "train_curve": [tuple(p) for p in r["train_curve"]],
                                   "eval_curve": [tuple(p) for p in r["eval_curve"]]}) for r in report["runs"]]
    return report


def merge(reports: list[dict], names: list[str]) -> tuple[list[RunResult], list[str]]:
    """-> (the runs, each (task, method, seed, lr scale) once, in input order; the duplicates skipped)."""
    first = reports[0]["settings"]
    for report, name in zip(reports[1:], names[1:]):
        differ = [k for k in SAME if report["settings"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{name}: settings differ from {names[0]}'s in {', '.join(differ)}; not merged")
    runs, seen, skipped = [], set(), []
    for report, name in zip(reports, names):
        for r in report["runs"]:
            key = (r.task, r.method, r.seed, r.lr_scale)
            if key in seen:
                skipped.append(f"{name}: {r.task}/{r.method} seed {r.seed} x{r.lr_scale}")
                continue
            seen.add(key)
            runs.append(r)
    return runs, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapters.research.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the merged compare.json, compare.md, loss_curves.png")
    p.add_argument("inputs", nargs="+", help="directories holding a compare.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reports = [load(Path(d)) for d in args.inputs]
    runs, skipped = merge(reports, args.inputs)
    for s in skipped:
        logger.warning("already merged from an earlier input, skipped: %s", s)
    cells = aggregate(runs)
    table = format_table(cells)
    print(table)
    tasks = list(dict.fromkeys(r.task for r in runs))
    methods = list(dict.fromkeys(r.method for r in runs if r.method != BASE))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "merged_from": [{"dir": d, "model": r["model"], "grid": r["grid"], "total_wall_s": r["total_wall_s"]}
                        for d, r in zip(args.inputs, reports)],
        "model": reports[0]["model"], "settings": reports[0]["settings"],
        "hyperparams": {m: h for r in reports for m, h in r["hyperparams"].items()},
        "cells": cells,
        "best_lr_scale": [{"task": t, "method": m, "lr_scale": x} for (t, m), x in best_scales(cells).items()],
        "runs": [vars(r) for r in runs], "skipped": skipped, "table": table,
    }
    print(write_outputs(out, report, runs, tasks, methods, note=f" Merged from {', '.join(args.inputs)}."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
