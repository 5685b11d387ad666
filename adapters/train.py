"""The offline trainer: a method from `adapters.methods` on a local HF checkpoint + JSONL data -> an adapter artifact.

    python -m adapters.train --method lora --model PATH --data train.jsonl --out DIR [--max-steps N] [...]

Data path: JSONL records -> `data.tokenize_records` (completion-only labels) -> seeded shuffled batches
(`data.collate`, right padded, with `prompt_mask`) -> `fit` (AdamW, warm-up + decay schedule, gradient clipping,
the method's hooks; see `methods/base.py`) -> `method.export()` (AdapterDeltas relative to the ORIGINAL backbone)
-> `artifact.save_artifact(out, deltas, spec=backbone_spec(model.config))`.

Every optimisation option left unset (None: lr, schedule, warm-up ratio, weight decay, gradient clipping) is the
method's own, its authors' recipe (`Method.defaults`; the table is docs/method_defaults.md), and the artifact's
`trainer` record holds the values actually used.

`main(argv)` is the CLI; `multiplex train` delegates to it after resolving `--model tiny` to a path.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapters.data import (
    IGNORE_INDEX,
    Tokenized,
    collate,
    load_jsonl,
    pad_token_id,
    split_heldout,
    tokenize_records,
)
from adapters.methods import METHODS, Method, StepContext, get_method
from adapters.methods.base import SCHEDULES, TrainingDefaults, method_fields

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything `train` needs. None for lr/schedule/warmup_ratio/weight_decay/max_grad_norm/rank/alpha/targets:
    the method's defaults."""

    method: str
    model: str  # local checkpoint directory (config, weights, tokenizer)
    data: str  # JSONL {"prompt", "completion"}
    out: str  # artifact directory to write
    eval: str | None = None  # held-out JSONL; None: split `eval_fraction` off `data`
    max_steps: int | None = None  # None: epochs * steps per epoch
    epochs: float = 1.0
    lr: float | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 8
    dtype: str = "fp32"
    device: str = "cpu"
    max_length: int = 512
    chat: bool = False  # render each prompt as a user message with the model's chat template (as the chat API does)
    eval_fraction: float = 0.1
    eval_every: int = 50
    warmup_ratio: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    name: str | None = None
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)  # fields of the method's Config

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1) or self.epochs <= 0:
            raise ValueError("batch_size, max_steps and epochs must be positive")
        method_config(self.method, rank=self.rank, alpha=self.alpha, targets=self.targets, options=self.method_options)


@dataclass
class FitOptions:
    """`fit`'s options; None for lr, warmup_ratio, schedule, weight_decay, max_grad_norm: the method's defaults."""

    lr: float | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    seed: int = 0
    warmup_ratio: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None  # 0: no clipping
    eval_every: int = 50
    progress: bool = True
    device: str | torch.device = "cpu"


def resolve_options(opts: FitOptions, d: TrainingDefaults) -> FitOptions:
    """`opts` with every unset optimisation option taken from a method's defaults `d` (its authors' recipe)."""
    return replace(
        opts,
        lr=d.lr if opts.lr is None else opts.lr,
        warmup_ratio=d.warmup_ratio if opts.warmup_ratio is None else opts.warmup_ratio,
        schedule=d.schedule if opts.schedule is None else opts.schedule,
        weight_decay=d.weight_decay if opts.weight_decay is None else opts.weight_decay,
        max_grad_norm=d.max_grad_norm if opts.max_grad_norm is None else opts.max_grad_norm,
    )


@dataclass
class FitResult:
    steps: int
    train_losses: list[tuple[int, float]]  # (step, loss of that step's batch)
    eval_losses: list[tuple[int, float]]  # (step, token-mean CE on the held-out set); step 0 = before training
    tokens: int
    wall_s: float

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None


# -- loss -----------------------------------------------------------------------------------------------------
def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def lm_loss(model: nn.Module, method: Method, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token CE on the completion tokens only (labels != -100), in fp32."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **method.forward_kwargs(batch)
    )
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


@torch.no_grad()
def evaluate(model: nn.Module, method: Method, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean CE over `batches` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(lm_loss(model, method, batch, reduction="sum"))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


# -- batching and schedule ------------------------------------------------------------------------------------
def batches_of(examples: list[Tokenized], batch_size: int, pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    return [to_device(collate(examples[i : i + batch_size], pad_id), device) for i in range(0, len(examples), batch_size)]


def epoch_batches(examples: list[Tokenized], batch_size: int, pad_id: int, seed: int, device) -> Iterator[dict]:
    """Endless seeded shuffled batches: epoch e is the permutation drawn from seed + e."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield to_device(collate([examples[j] for j in order[i : i + batch_size]], pad_id), device)
        epoch += 1


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The lr multiplier at `step`: linear warm-up, then constant, linear, cosine or cosine-squared decay to 0."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine**2 if schedule == "cosine_squared" else cosine

    return f


# -- the loop -------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, method: Method, batch: dict, scheduler, ctx: StepContext, max_grad_norm: float) -> float:
    """One optimizer step with the method's hooks (order: methods/base.py); `ctx.step` counts finished steps."""
    optimizer = ctx.optimizer
    loss = lm_loss(model, method, batch)
    reg = method.regularizer()
    optimizer.zero_grad(set_to_none=True)
    (loss if reg is None else loss + reg).backward()
    if max_grad_norm and max_grad_norm > 0:  # the task gradient only: hooks below add their own terms after
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    ctx.lr = optimizer.param_groups[0]["lr"]
    method.before_optimizer_step(ctx)
    optimizer.step()
    method.after_optimizer_step(ctx)
    scheduler.step()
    ctx.step += 1
    method.after_step(ctx)
    return loss.item()


def fit(
    model: nn.Module,
    method: Method,
    train_examples: list[Tokenized],
    eval_examples: list[Tokenized],
    pad_id: int,
    opts: FitOptions,
) -> FitResult:
    """Train `method`'s parameters on `train_examples`; evaluate every `eval_every` steps and at the end.

    Unset options in `opts` are the method's defaults (`resolve_options`). The held-out `eval_examples` are only
    ever measured; decisions made during training (ALoRA's rank scores) use `score_batch`, a fixed batch of
    training examples.
    """
    if not train_examples:
        raise ValueError("no training examples")
    opts = resolve_options(opts, method.defaults)
    device = torch.device(opts.device)
    steps_per_epoch = math.ceil(len(train_examples) / opts.batch_size)
    max_steps = opts.max_steps if opts.max_steps is not None else max(1, math.ceil(opts.epochs * steps_per_epoch))
    eval_batches = batches_of(eval_examples, opts.batch_size, pad_id, device)
    score_batch = to_device(collate(train_examples[: opts.batch_size], pad_id), device)
    stream = epoch_batches(train_examples, opts.batch_size, pad_id, opts.seed, device)

    model.train()
    if method.num_prepare_batches():
        batches = [next(stream) for _ in range(method.num_prepare_batches())]
        method.prepare(lambda b: lm_loss(model, method, b), batches)
        stream = epoch_batches(train_examples, opts.batch_size, pad_id, opts.seed, device)  # the update starts afresh

    groups = method.param_groups(opts.weight_decay)
    if not any(p.numel() for g in groups for p in g["params"]):
        raise ValueError(f"method {method.name!r} has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=opts.lr)
    warmup = math.ceil(opts.warmup_ratio * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.schedule, warmup, max_steps))

    def score_loss() -> float:
        return evaluate(model, method, [score_batch])

    ctx = StepContext(step=0, lr=opts.lr, peak_lr=opts.lr, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
                      optimizer=optimizer, score_batch=score_batch, score_loss=score_loss)
    result = FitResult(steps=0, train_losses=[], eval_losses=[], tokens=0, wall_s=0.0)
    if eval_batches:
        result.eval_losses.append((0, evaluate(model, method, eval_batches)))
    start = time.perf_counter()
    bar = tqdm(total=max_steps, desc=method.name, disable=not opts.progress, dynamic_ncols=True)
    for step in range(1, max_steps + 1):
        batch = next(stream)
        loss = train_step(model, method, batch, scheduler, ctx, opts.max_grad_norm)
        result.steps = step
        result.tokens += int(batch["attention_mask"].sum())
        result.train_losses.append((step, loss))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{result.tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        if eval_batches and (step % max(1, opts.eval_every) == 0 or step == max_steps):
            result.eval_losses.append((step, evaluate(model, method, eval_batches)))
            logger.info("step %d: eval loss %.4f", step, result.eval_losses[-1][1])
    bar.close()
    result.wall_s = time.perf_counter() - start
    model.eval()
    return result


# -- model, method, artifact ----------------------------------------------------------------------------------
def load_model_and_tokenizer(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """A local HF checkpoint directory (no download): AutoModelForCausalLM + AutoTokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: not a local checkpoint directory")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def method_config(
    name: str,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
    options: dict[str, Any] | None = None,
):
    """The Config of method `name`: `options` are its fields; None for rank/alpha/targets keeps the defaults."""
    cls = get_method(name)
    kwargs = dict(options or {})
    for key, value in (("rank", rank), ("alpha", alpha), ("targets", targets)):
        if value is not None:
            kwargs[key] = value
    try:
        return cls.Config(**kwargs)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None


def build_method(name: str, model: nn.Module, **kwargs: Any) -> Method:
    """Wrap `model` (in place) with method `name`; kwargs as for `method_config`."""
    return get_method(name).wrap(model, cfg=method_config(name, **kwargs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> Path:
    """Train, export, and write the artifact directory `cfg.out`; returns its path."""
    from adapters.artifact import save_artifact
    from adapters.spec import backbone_spec

    seed_everything(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, cfg.device)
    records = load_jsonl(cfg.data)
    if cfg.eval is not None:
        train_records, eval_records = records, load_jsonl(cfg.eval)
    else:
        train_records, eval_records = split_heldout(records, cfg.eval_fraction, cfg.seed)
    train_ex = tokenize_records(tokenizer, train_records, cfg.max_length, chat=cfg.chat)
    eval_ex = tokenize_records(tokenizer, eval_records, cfg.max_length, chat=cfg.chat) if eval_records else []
    spec = backbone_spec(model.config)  # of the untouched backbone

    method = build_method(cfg.method, model, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, options=cfg.method_options)
    opts = resolve_options(FitOptions(
        lr=cfg.lr,
        max_steps=cfg.max_steps,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        warmup_ratio=cfg.warmup_ratio,
        schedule=cfg.schedule,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        progress=cfg.progress,
        device=cfg.device,
    ), method.defaults)
    logger.info("%s: %d trainable parameters, %d train / %d eval examples",
                cfg.method, method.num_trainable_parameters(), len(train_ex), len(eval_ex))
    result = fit(model, method, train_ex, eval_ex, pad_token_id(tokenizer), opts)
    trainer = {
        "method_config": method.config_dict(),
        "lr": opts.lr,
        "steps": result.steps,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "schedule": opts.schedule,
        "warmup_ratio": opts.warmup_ratio,
        "weight_decay": opts.weight_decay,
        "max_grad_norm": opts.max_grad_norm,
        "defaults_source": method.defaults.source,
        "max_length": cfg.max_length,
        "chat": cfg.chat,
        "num_trainable_parameters": method.num_trainable_parameters(),
        "train_loss": result.train_losses[-1][1] if result.train_losses else None,
        "eval_loss": result.final_eval_loss,
        "eval_loss_initial": result.eval_losses[0][1] if result.eval_losses else None,
        "tokens": result.tokens,
        "wall_s": round(result.wall_s, 3),
        "data": Path(cfg.data).name,
    }
    path = save_artifact(cfg.out, method.export(), method=cfg.method, spec=spec, name=cfg.name, trainer=trainer)
    return Path(path)


# -- CLI ------------------------------------------------------------------------------------------------------
def _flag(method: str, field_name: str) -> str:
    return f"--{method}-{field_name.replace('_', '-')}"


def _dest(method: str, field_name: str) -> str:
    return f"opt__{method}__{field_name}"


def build_parser(prog: str = "python -m adapters.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train an adapter offline and write a multiplex artifact.")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--model", required=True, help="local HF checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--data", required=True, help='training JSONL: {"prompt", "completion"} per line')
    p.add_argument("--eval", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--name", default=None, help="adapter name recorded in the manifest")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default: the method's)")
    p.add_argument("--alpha", type=float, default=None, help="scale numerator, scale = alpha / r")
    p.add_argument("--targets", default=None, help="comma-separated projections, e.g. q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="backbone dtype (adapters train in fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as a user message with the model's chat template, as "
                        "/v1/chat/completions does (the completion ends with the template's end-of-turn token)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="share of the steps in linear warm-up (default: the method's)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="lr decay after warm-up (default: the method's)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the method's)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the task gradient, 0: off (default: the method's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, cls in METHODS.items():
        group = p.add_argument_group(f"{name} options")
        for f in method_fields(cls.Config):
            helptext = f.metadata.get("help", "")
            default = f.default if f.default is not MISSING else None
            helptext = f"{helptext} (default: {default})"
            if isinstance(default, bool):
                group.add_argument(_flag(name, f.name), dest=_dest(name, f.name),
                                   action=argparse.BooleanOptionalAction, default=None, help=helptext)
            else:
                ftype = f.metadata.get("type") or (type(default) if default is not None else str)
                group.add_argument(_flag(name, f.name), dest=_dest(name, f.name), type=ftype, default=None,
                                   metavar=f.name.upper(), help=helptext)
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    options: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("opt__") or value is None:
            continue
        _, method, field_name = key.split("__", 2)
        if method != args.method:
            parser.error(f"{_flag(method, field_name)} is an option of --method {method}, not {args.method}")
        options[field_name] = value
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    return TrainConfig(
        method=args.method,
        model=args.model,
        data=args.data,
        out=args.out,
        eval=args.eval,
        max_steps=args.max_steps,
        epochs=args.epochs,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        targets=targets,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        max_length=args.max_length,
        chat=args.chat,
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        name=args.name,
        progress=not args.no_progress,
        method_options=options,
    )


def main(argv: list[str] | None = None, prog: str = "python -m adapters.train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, parser)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = train(cfg)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
