"""What the comparison measures on the held-out split: held-out loss and teacher-forced token accuracy over the
labelled tokens, and exact match of batched greedy decoding."""
from __future__ import annotations

import torch
from torch import nn

from adapters.data import IGNORE_INDEX, pad_token_id, prompt_ids_of
from adapters.methods import Method


def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) next-token predictions: logits (B, T, V) at position t predict labels (B, T) at t + 1;
    only labelled positions (!= IGNORE_INDEX: the completion and its EOS) count."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return int((pred == target)[mask].sum()), int(mask.sum())


def _logits(model: nn.Module, method: Method | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = method.forward_kwargs(batch) if method is not None else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs).logits


@torch.no_grad()
def heldout_metrics(model: nn.Module, method: Method | None, batches: list[dict]) -> tuple[float, float]:
    """(token-mean CE, teacher-forced token accuracy) over the labelled tokens of `batches`; method None: the bare
    backbone."""
    model.eval()
    loss_sum, hits, count = 0.0, 0, 0
    for batch in batches:
        logits = _logits(model, method, batch).float()
        labels = batch["labels"][:, 1:]
        loss_sum += float(nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
        ))
        h, n = token_hits(logits, batch["labels"])
        hits, count = hits + h, count + n
    return loss_sum / max(count, 1), hits / max(count, 1)


@torch.no_grad()
def greedy_completions(model: nn.Module, method: Method | None, tokenizer, prompts: list[str], max_new_tokens: int,
                       device, chat: bool = False, batch_size: int = 16) -> list[str]:
    """Greedy decoding, `batch_size` prompts at a time, without a KV cache (PARA pools over the prompt, which a
    cached one-token step would not see): every step re-runs the right-padded batch, whose padding comes after each
    sequence and so cannot change it under causal attention, and reads each row at its last real position."""
    pad = pad_token_id(tokenizer)
    completions = []
    for start in range(0, len(prompts), batch_size):
        prompt_ids = [prompt_ids_of(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
        seqs = [list(ids) for ids in prompt_ids]
        active = list(range(len(seqs)))
        for _ in range(max_new_tokens):
            if not active:
                break
            batch = _right_padded([seqs[j] for j in active], [len(prompt_ids[j]) for j in active], pad, device)
            last = torch.tensor([len(seqs[j]) - 1 for j in active], device=device)
            tokens = _logits(model, method, batch)[torch.arange(len(active), device=device), last].argmax(-1).tolist()
            for j, token in zip(active, tokens):
                if token != tokenizer.eos_token_id:
                    seqs[j].append(token)
            active = [j for j, token in zip(active, tokens) if token != tokenizer.eos_token_id]
        completions += [tokenizer.decode(seq[len(ids) :], skip_special_tokens=True) for seq, ids in zip(seqs, prompt_ids)]
    return completions


def _right_padded(seqs: list[list[int]], prompt_lens: list[int], pad: int, device) -> dict[str, torch.Tensor]:
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, q in enumerate(seqs):
        ids[row, : len(q)] = torch.tensor(q)
        mask[row, : len(q)] = 1
    prompt_mask = torch.arange(width)[None] < torch.tensor(prompt_lens)[:, None]  # (B, T)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "prompt_mask": prompt_mask.to(device)}


def exact_match(model, method, tokenizer, records, max_new_tokens: int, device, chat: bool = False) -> float:
    model.eval()
    got = greedy_completions(model, method, tokenizer, [r["prompt"] for r in records], max_new_tokens, device, chat)
    return sum(g.strip() == r["completion"].strip() for g, r in zip(got, records)) / max(1, len(records))
