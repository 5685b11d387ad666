"""Next-token choice per request: greedy, temperature, top-k, top-p, a per-request seed, and top logprobs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import cpu_sampler
from server.engine.request import SamplingParams
from server.engine.uniforms import Uniforms


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's logprob (None when not asked for)
    top: list[list[tuple[int, float]] | None]  # top-k (token, logprob) per row when asked for
    nonfinite: list[int] = field(default_factory=list)  # rows whose logits hold a NaN or +inf (or are all -inf)


def make_generator(params: SamplingParams) -> Uniforms | None:
    """The request's uniform draws (None for greedy decoding, which draws none)."""
    return None if params.temperature == 0 else Uniforms(params.seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Uniforms | None],
           outputs: list[list[int]] | None = None, cpu_kernel: bool = True) -> SampleResult:
    """logits: (B, V) fp32, one row per request that needs a token this step; outputs: the tokens each request
    generated so far (for presence/frequency penalties). Logprobs are those of the model's own distribution.
    A row whose logits are not finite (their maximum NaN, +inf or -inf: an adapter that overflows) is named in
    `nonfinite`, its token that of the degenerate row (the first maximum).
    cpu_kernel=False: the batched PyTorch ops even where our CPU kernel runs (the benchmark compares the two)."""
    token_ids, nonfinite = _choose(_penalized(logits, params, outputs), params, generators, cpu_kernel)
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
    return SampleResult(ids, logprobs, top, nonfinite)


def _choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[Uniforms | None],
            cpu_kernel: bool = True) -> tuple[torch.Tensor, list[int]]:
    """One token per row, and the rows whose logits are not finite: (B, V) -> (B,), [rows]. fp32 logits on a CPU
    go through our kernel (kernels/cpu_sampler.c, one call for every row, greedy or not, which finds those rows on
    its own pass); elsewhere a fixed number of batched PyTorch ops and one reduction for them."""
    if cpu_kernel and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(-1) == 1 \
            and cpu_sampler.enabled():
        return cpu_sampler.sample_checked(
            logits, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
            [g.next() if p.temperature > 0 else 0.0 for p, g in zip(params, generators)])
    bad = ~torch.isfinite(logits.amax(dim=-1)) if logits.shape[1] else torch.zeros(len(logits), dtype=torch.bool)
    return _torch_choose(logits, params, generators), bad.nonzero()[:, 0].tolist() if bool(bad.any()) else []


def _torch_choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[Uniforms | None]
                  ) -> torch.Tensor:
    rows = [row for row, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return greedy_tokens(logits)
    token_ids = torch.empty(len(params), dtype=torch.int64, device=logits.device)
    greedy = [row for row, p in enumerate(params) if p.temperature == 0]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        token_ids[index] = greedy_tokens(logits[index])
    index = torch.tensor(rows, device=logits.device)
    chosen = logits if not greedy else logits[index]  # every row sampled: no copy
    token_ids[index] = _sample_rows(chosen, [params[r] for r in rows], [generators[r] for r in rows])
    return token_ids


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`, the first maximum of each row (a NaN counts as the maximum, as argmax counts it). On a
    CPU a large vocabulary goes in two levels, each block's maximum then the first maximum inside the first block
    holding the row's: torch's CPU argmax is not vectorised (~2 ms for 64 x 49152 logits, amax ~0.2 ms), the two
    levels take ~0.3 ms. On other devices argmax itself."""
    n, vocab = logits.shape
    if logits.device.type != "cpu" or vocab <= 4 * CDF_BLOCK:
        return logits.argmax(dim=-1)
    blocks = _blocks(logits, float("-inf"))
    b = blocks.amax(-1).argmax(-1)  # the first block holding the row's maximum (or its first NaN)
    inner = blocks.gather(1, b[:, None, None].expand(n, 1, CDF_BLOCK))[:, 0].argmax(-1)
    return b * CDF_BLOCK + inner


def _blocks(rows: torch.Tensor, fill: float) -> torch.Tensor:
    """(n, V) -> (n, ceil(V / CDF_BLOCK), CDF_BLOCK), a view when V is a multiple of the block, else padded with
    `fill`."""
    n, vocab = rows.shape
    pad = -vocab % CDF_BLOCK
    return (torch.nn.functional.pad(rows, (0, pad), value=fill) if pad else rows).view(n, -1, CDF_BLOCK)


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


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[Uniforms]) -> torch.Tensor:
    """One token per row, all rows at once (a fixed number of batched ops, not a loop over requests): temperature,
    then top-k and top-p on the distribution in descending order, then inverse-CDF sampling with one uniform per
    row drawn from the row's generator. logits: (n, V) -> (n,) token ids."""
    n, vocab = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    probs = torch.softmax(logits / temps[:, None], dim=-1)  # (n, V)
    u = torch.tensor([g.next() for g in generators], dtype=torch.float64).to(dev)
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):  # plain temperature: no order needed
        return _inverse_cdf(probs, u)
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    top_ps = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
    out = torch.empty(n, dtype=torch.int64, device=dev)
    for rows, ranked, tokens in candidate_groups(probs, ks, top_ps):  # each row's head, in order
        keep = torch.arange(ranked.shape[1], device=dev)[None, :] < ks[rows, None]  # top-k: the k most likely
        keep &= ranked.cumsum(-1) - ranked < top_ps[rows, None]  # top-p: the smallest prefix reaching top_p (>= 1)
        out[rows] = tokens.gather(1, _inverse_cdf(ranked * keep, u[rows])[:, None]).squeeze(1)
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first column whose cumulative probability exceeds u * the row's total: (n, V), (n,) -> (n,). A large
    vocabulary goes in two levels, blocks then the token inside the chosen block (an exact inverse CDF too, a
    fraction of the work: a float64 cumsum of 64 x 49152 probabilities takes ~12 ms on a CPU)."""
    n, vocab = probs.shape
    if vocab <= 4 * CDF_BLOCK:
        cdf = probs.double().cumsum(-1)  # float64 so that the last entries stay ordered
        return _first_above(cdf, u[:, None] * cdf[:, -1:])[:, 0]
    blocks = _blocks(probs, 0.0)
    sums = blocks.sum(-1).double()  # (n, blocks); summed in float32: a float64 copy of the rows costs more
    cdf = sums.cumsum(-1)
    b = _first_above(cdf, u[:, None] * cdf[:, -1:])  # (n, 1): never an empty block
    rest = (u[:, None] * cdf[:, -1:] - (cdf.gather(1, b) - sums.gather(1, b))).clamp_(min=0)  # mass into block b
    inner = blocks.gather(1, b[:, :, None].expand(n, 1, CDF_BLOCK))[:, 0].double().cumsum(-1)  # (n, CDF_BLOCK)
    return (b * CDF_BLOCK + _first_above(inner, rest))[:, 0]


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The first column of `cdf` (n, m) above `target` (n, 1) -> (n, 1), never one that adds no probability: such a
    column's cdf equals its predecessor's, and a target at or past the total (rounding) gets the last column that
    adds some."""
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, target, right=True), last)


# Blocks of this many tokens: a large vocabulary's inverse CDF, greedy's argmax and the top-k/top-p candidates'
# search go block by block.
CDF_BLOCK = 256


# Candidates for top-k/top-p: the tokens at least this fraction as likely as the row's most likely one. A row
# with more than WIDE_ROW of its vocabulary among them (a flat distribution) is sorted whole instead.
CANDIDATE_FLOOR = 1e-4
WIDE_ROW = 1 / 16
SORT_WHOLE = 2048  # vocabularies up to this size are sorted whole


def candidate_groups(probs: torch.Tensor, ks: torch.Tensor, top_ps: torch.Tensor, floor: float = CANDIDATE_FLOOR
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each row's most likely tokens in descending order, as many as its top-k and top-p can keep, in groups of
    rows: [(row indices (m,), probs (m, K), token ids (m, K))], rows zero-padded on the right. What top-k/top-p keep
    from them is what they would keep from the whole sorted row (same order, same float32 prefix sums), without
    sorting the vocabulary: on a CPU a sort of 64 x 49152 probabilities takes ~230 ms. The candidates are the tokens
    >= `floor` x the row's maximum, sorted as one short list for the rows that have few; a flat row (more than
    WIDE_ROW of its vocabulary among them) is sorted whole, in a group of its own width, so that one flat row does
    not widen every other row's matrix to the vocabulary; a row whose candidates cannot hold what it keeps (their
    mass, summed in order, below its top_p and fewer than its top_k) takes every token, so the result is exact for
    any distribution."""
    n, vocab = probs.shape
    if vocab <= SORT_WHOLE:  # a small vocabulary: sorting it costs less than finding candidates
        ranked, tokens = probs.sort(dim=-1, descending=True, stable=True)
        return [(torch.arange(n, device=probs.device), ranked, tokens)]
    floors, rows, cols = _candidates(probs, floor)
    count = torch.bincount(rows, minlength=n)
    flat = count > vocab * WIDE_ROW
    groups = []
    narrow = (~flat).nonzero().squeeze(1)
    if narrow.numel():
        ranked, tokens = _sorted_candidates(probs, rows, cols, count, narrow, flat)
        short = _short(ranked, count[narrow], ks[narrow], top_ps[narrow], vocab)
        if bool(short.any()):
            flat[narrow[short]] = True
            narrow, ranked, tokens = narrow[~short], ranked[~short], tokens[~short]
        groups.append((narrow, ranked, tokens))
    whole = flat.nonzero().squeeze(1)
    if whole.numel():
        values, order = probs[whole].sort(dim=-1, descending=True, stable=True)
        ranked = values * (values >= floors[whole])  # the tokens below the floor count 0 ...
        short = _short(ranked, count[whole], ks[whole], top_ps[whole], vocab)
        groups.append((whole, torch.where(short[:, None], values, ranked), order))  # ... unless it falls short
    return groups


def _short(ranked: torch.Tensor, count: torch.Tensor, ks: torch.Tensor, top_ps: torch.Tensor, vocab: int
           ) -> torch.Tensor:
    """Rows whose `count` candidates (first in `ranked`) cannot hold what top-k/top-p keep: their mass, summed in
    order, below top_p, and fewer than k of them."""
    tail = ranked.cumsum(-1).gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    return ~((tail >= top_ps) | (count >= ks) | (count == vocab))


def _candidates(probs: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's floor (`floor` x its maximum, (n, 1)) and the tokens at or above it as (rows, cols), row-major:
    found by blocks of the vocabulary, only the blocks whose maximum reaches the floor looked into (a dense mask and
    its nonzero over 64 x 49152 probabilities cost ~4 ms on a CPU; a block's maximum ~0.2 ms for them all)."""
    blocks = _blocks(probs, 0.0)  # a padded token's 0 never reaches a floor > 0
    block_max = blocks.amax(-1)  # (n, blocks)
    floors = block_max.amax(-1, keepdim=True) * floor
    block_rows, block_ids = (block_max >= floors).nonzero(as_tuple=True)  # row-major
    inside, cols = (blocks[block_rows, block_ids] >= floors[block_rows]).nonzero(as_tuple=True)
    return floors, block_rows[inside], block_ids[inside] * CDF_BLOCK + cols


def _sorted_candidates(probs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, count: torch.Tensor,
                       group: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates (rows, cols: row-major; `count` per row) of the rows in `group` (none of them `flat`), sorted
    by descending probability as one flat list into a (len(group), K) matrix, K the largest count."""
    keep = ~flat[rows]
    rows, cols = rows[keep], cols[keep]
    values = probs[rows, cols]
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by row, descending within a row
    rows, cols, values = rows[order], cols[order], values[order]
    at = torch.full_like(count, -1)
    at[group] = torch.arange(group.numel(), device=probs.device)  # row -> its index in the group
    sizes = count[group]
    pos = torch.arange(rows.numel(), device=probs.device) - (sizes.cumsum(0) - sizes)[at[rows]]
    ranked = probs.new_zeros((group.numel(), int(sizes.max())))
    tokens = torch.zeros(ranked.shape, dtype=torch.int64, device=probs.device)
    ranked[at[rows], pos] = values
    tokens[at[rows], pos] = cols
    return ranked, tokens


def reference_sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                          generators: list[Uniforms]) -> torch.Tensor:
    """What _sample_rows computes, the plain way (kernels.cpu_sampler.sample_ref: one float64 cumsum over the whole
    row, sorted whole first when a row has top-k or top-p). The tests and `benchmarks.engine --mode sampling`
    compare against it."""
    return cpu_sampler.sample_ref(logits, [p.temperature for p in params], [p.top_k for p in params],
                                  [p.top_p for p in params], [g.next() for g in generators])
