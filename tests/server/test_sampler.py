"""The engine's sampler against the whole row sorted: on a CPU our kernel (kernels/cpu_sampler.c; its own sweep in
tests/kernels/test_cpu_sampler.py) and the batched PyTorch path (top-k/top-p without sorting the vocabulary,
sampler.candidate_groups), which serves other devices and dtypes."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_sampler
from server.engine.request import SamplingParams
from server.engine.sampler import (
    CDF_BLOCK,
    WIDE_ROW,
    _inverse_cdf,
    candidate_groups,
    greedy_tokens,
    make_generator,
    reference_sample_rows,
    sample,
)
from server.engine.uniforms import Uniforms


@pytest.fixture(params=["ours", "torch"])
def path(request, monkeypatch):
    """`sample` on a CPU through our kernel, or through the PyTorch path (what other devices run)."""
    if request.param == "ours" and not cpu_sampler.available():
        pytest.skip("our CPU sampler needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    monkeypatch.setattr(cpu_sampler, "_enabled", request.param == "ours")
    return request.param


def sorted_reference(logits: torch.Tensor, params: list[SamplingParams], generators) -> list[int]:
    return reference_sample_rows(logits, params, generators).tolist()


def flat_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One float64 cumsum over the whole row."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)[:, 0]


def rows_of(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logit rows shaped like an LM's (peaked: a few likely tokens), flat ones (every token plausible: the rows
    that fall back to a whole sort) and rows with ties."""
    if kind == "peaked":
        return torch.randn(n, vocab, generator=gen) * 6
    if kind == "flat":
        return torch.randn(n, vocab, generator=gen) * 0.5
    if kind == "ties":
        return torch.randint(0, 4, (n, vocab), generator=gen).float() * 3
    return torch.cat([rows_of("peaked", n // 2, vocab, gen), rows_of("flat", n - n // 2, vocab, gen)])[
        torch.randperm(n, generator=gen)]


@pytest.mark.parametrize("vocab", [7, 320, 4096, 5000])
@pytest.mark.parametrize("kind", ["peaked", "flat", "mixed", "ties"])
def test_candidates_sample_what_the_whole_sorted_row_samples(kind, vocab, path):
    gen = torch.Generator().manual_seed(vocab)
    n = 48
    logits = rows_of(kind, n, vocab, gen)
    choices = [(1.0, 0, 0.9), (0.7, 0, 0.95), (1.3, 5, 1.0), (0.8, 40, 0.9), (1.0, 0, 0.5), (2.0, 0, 0.999),
               (1.0, 1, 1.0), (1.0, 0, 1e-6)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=row)
              for row, (t, k, p) in zip(range(n), choices * n)]
    got = sample(logits, params, [make_generator(p) for p in params]).token_ids
    assert got == sorted_reference(logits, params, [make_generator(p) for p in params])


def test_candidates_hold_every_kept_token_and_flat_rows_take_the_whole_vocabulary():
    """Peaked rows share one narrow matrix; the flat row, and a row whose candidates fall short of its top_p, are
    sorted whole in a group of their own (so they do not widen the narrow rows' matrix)."""
    gen = torch.Generator().manual_seed(0)
    vocab = 4096
    probs = torch.softmax(torch.cat([torch.randn(3, vocab, generator=gen) * 6,
                                     torch.randn(1, vocab, generator=gen) * 0.1,
                                     torch.randn(1, vocab, generator=gen) * 6]), -1)
    ks = torch.tensor([vocab, vocab, 3, vocab, vocab])
    top_ps = torch.tensor([0.9, 0.99, 1.0, 0.9, 1.0 - 1e-7])  # the last keeps more than its candidates' mass
    groups = candidate_groups(probs, ks, top_ps)
    assert [g[0].tolist() for g in groups] == [[0, 1, 2], [3, 4]]
    assert groups[0][1].shape[1] < vocab * WIDE_ROW and groups[1][1].shape[1] == vocab
    full, order = probs.sort(dim=-1, descending=True, stable=True)
    for rows, ranked, tokens in groups:
        for i, row in enumerate(rows.tolist()):
            count = int((ranked[i] > 0).sum())
            assert torch.equal(ranked[i, :count], full[row, :count])
            assert torch.equal(tokens[i, :count], order[row, :count])
            kept = int(((full[row].cumsum(-1) - full[row] < top_ps[row]) & (torch.arange(vocab) < ks[row])).sum())
            assert kept <= count  # what top-k/top-p keep lies inside the candidates
    assert int((groups[1][1][1] > 0).sum()) == vocab  # the short row: every token


@pytest.mark.parametrize("vocab", [4 * CDF_BLOCK + 1, 49152, 50000])
def test_two_level_inverse_cdf_picks_what_one_cumsum_picks_and_never_a_zero_probability_token(vocab):
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.cat([torch.randn(32, vocab, generator=gen) * 6,
                                     torch.randn(32, vocab, generator=gen) * 0.5]), -1)
    probs[:8, : vocab // 2] = 0  # whole empty blocks
    probs[8:16] *= torch.rand(8, vocab, generator=gen) > 0.9  # scattered zeros
    u = torch.rand(64, dtype=torch.float64, generator=gen)
    u[0], u[1] = 0.0, 1.0 - 1e-16  # the ends
    got = _inverse_cdf(probs, u)
    assert torch.equal(got[2:], flat_inverse_cdf(probs, u)[2:])
    assert (probs.gather(1, got[:, None]) > 0).all()
    # The ends: u = 0 takes the first token with any probability; u just under 1 a token of the last 1e-9 of the
    # mass (which one rests on the float32 block sums' rounding, which varies with the CPU's vector width).
    assert got[0] == (probs[0] > 0).nonzero()[0, 0]
    assert probs[1, : got[1]].double().sum() >= (1 - 1e-9) * probs[1].double().sum()


@pytest.mark.parametrize("vocab", [4 * CDF_BLOCK + 1, 49152, 50000])
def test_greedy_picks_the_first_maximum_as_argmax_does(vocab, path):
    """Ties (the first one wins), a NaN (counted as the maximum, the first NaN wins), a row of -inf, a maximum in
    the padded last block, penalties' partial rows: the two-level argmax picks what torch.argmax picks."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=gen) * 4
    logits[0, [5, vocab // 2, vocab - 1]] = 100.0  # a three-way tie
    logits[1, [vocab // 3, 17]] = float("nan")
    logits[2] = float("-inf")
    logits[3, -1] = 1e9  # in the last, maybe padded, block
    logits[4] = torch.randint(0, 3, (vocab,), generator=gen).float()  # ties everywhere
    logits[5, : CDF_BLOCK * 2] = float("-inf")
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    params = [SamplingParams(temperature=0.0)] * 12
    assert sample(logits, params, [None] * 12).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_uniforms_draw_what_one_torch_rand_per_draw_gives(seed):
    """Drawn a batch at a time, a request's uniforms are the draws of its seeded generator, one `torch.rand` per
    draw, across batch boundaries: seeded outputs stay what they were."""
    stream = make_generator(SamplingParams(temperature=1.0, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    assert [stream.next() for _ in range(3 * Uniforms.BATCH + 5)] == [
        float(torch.rand((), generator=gen)) for _ in range(3 * Uniforms.BATCH + 5)]
    assert make_generator(SamplingParams(temperature=0)) is None
