"""The trainer: data handling, the CLI end to end on a tiny local checkpoint, and that loss goes down."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from adapters.data import (
    IGNORE_INDEX,
    collate,
    load_jsonl,
    make_task,
    split_heldout,
    tokenize_example,
    write_jsonl,
)
from adapters.methods import METHODS
from adapters.spec import backbone_spec
from adapters.train import (
    FitOptions,
    TrainConfig,
    build_parser,
    config_from_args,
    lr_lambda,
    main,
    resolve_options,
    train,
)


@pytest.fixture(scope="module")
def upper_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "upper.jsonl"
    return write_jsonl(path, make_task("upper", 96, seed=0))


# -- data -----------------------------------------------------------------------------------------------------
def test_tokenize_masks_the_prompt_and_appends_eos(tokenizer):
    t = tokenize_example(tokenizer, "upper: ab =", " AB")
    prompt_ids = tokenizer("upper: ab =")["input_ids"]
    assert t.prompt_len == len(prompt_ids)
    assert t.input_ids[: t.prompt_len] == prompt_ids
    assert t.labels[: t.prompt_len] == [IGNORE_INDEX] * t.prompt_len
    completion = tokenizer(" AB", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert t.labels[t.prompt_len :] == t.input_ids[t.prompt_len :] == completion
    assert tokenize_example(tokenizer, "a long prompt", " x", max_length=5) is None  # no completion token left


def test_collate_pads_right_with_a_prompt_mask(tokenizer):
    a = tokenize_example(tokenizer, "ab", "c")
    b = tokenize_example(tokenizer, "abcd", "efg")
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [4, 8]
    assert batch["prompt_mask"].sum(1).tolist() == [2, 4]
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX] * 4
    assert batch["prompt_lens"].tolist() == [2, 4]


def test_split_heldout_is_seeded_and_disjoint():
    records = [{"prompt": str(i), "completion": "x"} for i in range(20)]
    train_a, held_a = split_heldout(records, 0.2, seed=1)
    train_b, held_b = split_heldout(records, 0.2, seed=1)
    assert held_a == held_b and len(held_a) == 4 and len(train_a) == 16
    assert not {r["prompt"] for r in train_a} & {r["prompt"] for r in held_a}
    assert split_heldout(records, 0.2, seed=2)[1] != held_a
    assert split_heldout(records, 0.0, seed=1) == (records, [])


def test_load_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_jsonl(path)


@pytest.mark.parametrize("task", ["upper", "reverse", "lookup", "kv_recall"])
def test_synthetic_tasks_are_seeded(task):
    assert make_task(task, 5, seed=3) == make_task(task, 5, seed=3)
    assert all(set(r) == {"prompt", "completion"} for r in make_task(task, 5, seed=3))


# -- CLI ------------------------------------------------------------------------------------------------------
def test_parser_routes_method_flags():
    parser = build_parser()
    args = parser.parse_args(
        ["--method", "sorsa", "--model", "m", "--data", "d", "--out", "o",
         "--sorsa-gamma", "0.01", "--sorsa-update", "decoupled", "--rank", "4"]
    )
    cfg = config_from_args(args, parser)
    assert cfg.method_options == {"gamma": 0.01, "update": "decoupled"} and cfg.rank == 4
    args = parser.parse_args(["--method", "lora", "--model", "m", "--data", "d", "--out", "o", "--sift-rho", "0.1"])
    with pytest.raises(SystemExit):
        config_from_args(args, parser)
    with pytest.raises(ValueError):
        TrainConfig(method="para", model="m", data="d", out="o", method_options={"pool": "max"})


@pytest.mark.parametrize(
    "method,flags",
    [
        ("lora", ["--rank", "4", "--targets", "q_proj,v_proj"]),
        ("sift", ["--sift-rho", "0.02"]),
        ("para", ["--rank", "4", "--para-pool", "mean"]),
        ("alora", ["--rank", "2", "--alora-k1", "1", "--alora-k2", "1", "--alora-rounds", "1"]),
    ],
)
def test_cli_writes_a_loadable_artifact(method, flags, model_dir, upper_jsonl, tmp_path, capsys):
    out = tmp_path / f"{method}-adapter"
    argv = ["--method", method, "--model", str(model_dir), "--data", str(upper_jsonl), "--out", str(out),
            "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--seed", "1", "--no-progress", *flags]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(out.name)
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["method"] == method and manifest["trainer"]["steps"] == 3
    artifact = pytest.importorskip("adapters.artifact", reason="adapters/artifact.py not available yet")
    spec = backbone_spec(transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True))
    loaded = artifact.load_adapter(out, spec)
    assert loaded.manifest["method"] == method
    if method == "lora":
        assert set(loaded.deltas.lowrank) == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    if method == "sift":
        assert loaded.deltas.sparse and all(sp.rows.dtype == torch.int32 for sp in loaded.deltas.sparse.values())
    if method == "para":
        assert {p.pool for p in loaded.deltas.para.values()} == {"mean"}


def test_unset_options_are_the_methods_own(model_dir, upper_jsonl, tmp_path):
    """No --lr / --schedule / --warmup-ratio / --weight-decay / --max-grad-norm: the method's (its authors') recipe,
    recorded in the artifact; a flag given wins."""
    out = tmp_path / "specadapt"
    argv = ["--method", "specadapt", "--model", str(model_dir), "--data", str(upper_jsonl), "--out", str(out),
            "--max-steps", "2", "--rank", "2", "--no-progress"]
    assert main(argv) == 0
    trainer = json.loads((out / "adapter.json").read_text())["trainer"]
    d = METHODS["specadapt"].defaults
    recipe = (d.lr, d.schedule, d.warmup_ratio, d.weight_decay, d.max_grad_norm)
    assert recipe == (3e-3, "cosine_squared", 0.05, 0.3, 0.0)
    assert tuple(trainer[k] for k in ("lr", "schedule", "warmup_ratio", "weight_decay", "max_grad_norm")) == recipe
    assert trainer["defaults_source"] == d.source
    for name, cls in METHODS.items():
        resolved = resolve_options(FitOptions(), cls.defaults)
        assert resolved.lr == cls.defaults.lr and resolved.schedule == cls.defaults.schedule, name
    given = resolve_options(FitOptions(lr=1.0, schedule="constant", max_grad_norm=2.0), METHODS["lora"].defaults)
    assert (given.lr, given.schedule, given.max_grad_norm, given.weight_decay) == (1.0, "constant", 2.0, 0.01)


def test_method_defaults_table_matches_the_code():
    """docs/method_defaults.md's lr / schedule / warm-up columns are each method's `defaults`."""
    from pathlib import Path

    table = Path(__file__).resolve().parents[2] / "docs" / "method_defaults.md"
    rows = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in METHODS:
            rows[cells[0]] = cells
    assert set(rows) == set(METHODS)
    for name, cls in METHODS.items():
        d = cls.defaults
        assert float(rows[name][1]) == d.lr and rows[name][2] == d.schedule, name
        assert rows[name][3] == f"{d.warmup_ratio * 100:g}%", name


def test_lr_schedules():
    f = lr_lambda("cosine_squared", warmup=2, total=12)  # SpecAdapt's: linear warm-up, then cosine squared to 0
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and abs(f(7) - 0.25) < 1e-12 and f(12) == 0.0  # half way: cos^2 = (1/2)^2
    g = lr_lambda("cosine", warmup=2, total=12)
    assert abs(g(7) - 0.5) < 1e-12
    h = lr_lambda("linear", warmup=0, total=10)
    assert h(0) == 1.0 and abs(h(5) - 0.5) < 1e-12


def test_loss_decreases_on_a_learnable_task(model_dir, upper_jsonl, tmp_path):
    cfg = TrainConfig(
        method="lora", model=str(model_dir), data=str(upper_jsonl), out=str(tmp_path / "a"), max_steps=30,
        lr=1e-2, batch_size=8, eval_every=10, eval_fraction=0.15, seed=0, progress=False,
    )
    path = train(cfg)
    trainer = json.loads((path / "adapter.json").read_text())["trainer"]
    assert trainer["eval_loss"] < 0.8 * trainer["eval_loss_initial"]
    assert trainer["lr"] == 1e-2 and trainer["method_config"]["rank"] == 8


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "sorsa", "sift", "para", "ia3"])
def test_cli_bf16_on_cuda(method, model_dir, upper_jsonl, tmp_path):
    out = tmp_path / method
    argv = ["--method", method, "--model", str(model_dir), "--data", str(upper_jsonl), "--out", str(out),
            "--max-steps", "3", "--lr", "1e-2", "--device", "cuda", "--dtype", "bf16", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["trainer"]["dtype"] == "bf16" and manifest["trainer"]["eval_loss"] < 10
