"""Next-token choice per request: greedy, temperature, top-k, top-p, a per-request seed, and top logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's logprob (None when not asked for)
    top: list[list[tuple[int, float]] | None]  # top-k (token, logprob) per row when asked for


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> SampleResult:
    """logits: (B, V) fp32, one row per request that needs a token this step."""
    token_ids = logits.argmax(dim=-1)  # (B,) greedy for every row; sampled rows overwrite theirs
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            token_ids[row] = _sample_row(logits[row], p, gen)
    ids = token_ids.tolist()
    want = [p.logprobs is not None for p in params]
    logprobs: list[float | None] = [None] * len(ids)
    top: list[list[tuple[int, float]] | None] = [None] * len(ids)
    if any(want):
        logp = torch.log_softmax(logits, dim=-1)  # (B, V): logprobs of the model's distribution (pre-temperature)
        chosen = logp.gather(1, token_ids[:, None]).squeeze(1).tolist()
        for row, p in enumerate(params):
            if want[row]:
                logprobs[row] = chosen[row]
                if p.logprobs:
                    vals, idx = logp[row].topk(p.logprobs)
                    top[row] = list(zip(idx.tolist(), vals.tolist()))
                else:
                    top[row] = []
    return SampleResult(ids, logprobs, top)


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    x = logits / p.temperature  # (V,)
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= p.top_p  # keep the smallest prefix reaching top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
