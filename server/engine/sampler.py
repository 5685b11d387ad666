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


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A request's random source: on the host whatever the device (one uniform draw per sampled token, see
    _sample_rows), so that a seed gives the same stream on every device and costs no kernel launch."""
    if params.temperature == 0:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           outputs: list[list[int]] | None = None) -> SampleResult:
    """logits: (B, V) fp32, one row per request that needs a token this step; outputs: the tokens each request
    generated so far (for presence/frequency penalties). Logprobs are those of the model's own distribution."""
    chosen_from = _penalized(logits, params, outputs)
    token_ids = chosen_from.argmax(dim=-1)  # (B,) greedy for every row; sampled rows overwrite theirs
    rows = [row for row, p in enumerate(params) if p.temperature > 0]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        token_ids[index] = _sample_rows(chosen_from[index], [params[r] for r in rows], [generators[r] for r in rows])
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


def _penalized(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None) -> torch.Tensor:
    """OpenAI's penalties, all rows at once: logit[t] -= presence * (count[t] > 0) + frequency * count[t], where
    count is how often the request generated t so far. Returns `logits` itself when no row has a penalty."""
    rows = [row for row, p in enumerate(params) if p.has_penalties and outputs and outputs[row]]
    if not rows:
        return logits
    dev = logits.device
    ids = [outputs[r] for r in rows]
    flat = torch.tensor([t for out in ids for t in out], device=dev)
    which = torch.tensor([i for i, out in enumerate(ids) for _ in out], device=dev)
    counts = torch.zeros((len(rows), logits.shape[1]), device=dev, dtype=logits.dtype)
    counts.index_put_((which, flat), torch.ones_like(flat, dtype=logits.dtype), accumulate=True)
    presence = torch.tensor([params[r].presence_penalty for r in rows], device=dev, dtype=logits.dtype)
    frequency = torch.tensor([params[r].frequency_penalty for r in rows], device=dev, dtype=logits.dtype)
    out = logits.clone()
    index = torch.tensor(rows, device=dev)
    out[index] -= presence[:, None] * (counts > 0) + frequency[:, None] * counts
    return out


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, all rows at once (a fixed number of batched ops, not a loop over requests): temperature,
    then top-k and top-p on the sorted distribution, then inverse-CDF sampling with one uniform per row drawn from
    the row's generator. logits: (n, V) -> (n,) token ids."""
    n, vocab = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    x = logits / temps[:, None]  # (n, V)
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float64)
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):  # plain temperature: no sort needed
        probs, order = torch.softmax(x, dim=-1), None
    else:
        x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(x, dim=-1)
        ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_ps = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
        keep = torch.arange(vocab, device=dev)[None, :] < ks[:, None]  # top-k: the k most likely
        keep &= probs.cumsum(-1) - probs < top_ps[:, None]  # top-p: the smallest prefix reaching top_p (>= 1 token)
        probs = probs * keep
    cdf = probs.double().cumsum(-1)  # (n, V); float64 so that the last entries stay ordered
    target = u.to(dev)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # first entry with cdf > u * total
    # A token of probability 0 (cut by top-k/top-p) has cdf equal to its predecessor's, so it is never chosen.
    return (idx if order is None else order.gather(1, idx)).squeeze(1)
