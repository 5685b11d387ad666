"""kernels.cpu_sampler (one token per row: greedy, temperature, top-k, top-p, inverse CDF) against its PyTorch
reference `sample_ref`: vocabularies around the kernel's 8-float steps and its radix-sort threshold, up to a
real model's 49152 tokens and more rows than a call keeps on one thread; peaked, flat and tied rows; rows whose
candidates cannot hold what top-p keeps (the whole-row sort); NaN, +-inf, temperatures that overflow; strided
rows. That the engine's sampler calls it: tests/server/test_sampler.py."""
import pytest
import torch

from kernels import cpu_sampler as cs

pytestmark = pytest.mark.skipif(not cs.available(), reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")

SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.8, 40, 0.9), (1.0, 0, 0.5),
            (2.0, 0, 0.999), (1.0, 1, 1.0), (1.0, 0, 1e-6), (0.3, -1, 0.99), (1.0, 10**9, 0.95)]


def settings(n: int, gen: torch.Generator) -> tuple[list[float], list[int], list[float], list[float]]:
    rows = [SETTINGS[i % len(SETTINGS)] for i in range(n)]
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    return [t for t, _, _ in rows], [k for _, k, _ in rows], [p for _, _, p in rows], u


def separated(n: int, vocab: int, gen: torch.Generator, spread: float) -> torch.Tensor:
    """Rows of distinct logits at least `spread` / 8 apart: no two probabilities within rounding of each other,
    so that the kernel and the reference must choose the very same token."""
    return torch.stack([torch.randperm(vocab, generator=gen).float() * spread / 8 for _ in range(n)])


@pytest.mark.parametrize("vocab", [1, 2, 7, 8, 9, 47, 48, 49, 320, 1000, 4097, 49152])
@pytest.mark.parametrize("n", [1, 11, 64])
def test_same_tokens_as_the_reference_on_well_separated_rows(n, vocab):
    gen = torch.Generator().manual_seed(n * 100003 + vocab)
    spread = min(1.0, 64.0 / vocab)  # the whole row within exp's range, neighbours still apart
    logits = separated(n, vocab, gen, spread) + torch.randn(n, 1, generator=gen) * 5
    temps, ks, ps, u = settings(n, gen)
    assert torch.equal(cs.sample(logits, temps, ks, ps, u), cs.sample_ref(logits, temps, ks, ps, u))


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
@pytest.mark.parametrize("vocab", [47, 320, 5000, 49152])
def test_random_rows_agree_up_to_rounding(kind, vocab):
    """Random rows have near-ties (two probabilities within an ulp, which the two exps may order either way) and
    long runs of tiny, equal probabilities (where an ulp of difference moves top-p's cut by a token): the tokens
    agree but for the rare rows where the draw falls within such rounding, and then the two choices are equally
    likely tokens a few places apart in the row's order."""
    gen = torch.Generator().manual_seed(vocab)
    n = 64
    if kind == "ties":
        logits = torch.randint(0, 4, (n, vocab), generator=gen).float() * 3
    else:
        logits = torch.randn(n, vocab, generator=gen) * (6.0 if kind == "peaked" else 0.5)
    temps, ks, ps, u = settings(n, gen)
    got, want = cs.sample(logits, temps, ks, ps, u), cs.sample_ref(logits, temps, ks, ps, u)
    differ = (got != want).nonzero()[:, 0].tolist()
    assert len(differ) <= n // 16
    for r in differ:
        probs = torch.softmax(logits[r].double() / temps[r], -1)
        rank = probs.argsort(descending=True, stable=True).argsort()
        assert abs(int(rank[got[r]]) - int(rank[want[r]])) <= 8
        assert torch.isclose(probs[got[r]], probs[want[r]], rtol=1e-3)


def test_rows_whose_candidates_fall_short_are_sorted_whole():
    """One likely token and a long tail each below the candidates' floor (1e-4 x the maximum) but together most of
    the mass: top-p must reach into the tail, which the kernel then sorts whole."""
    gen = torch.Generator().manual_seed(1)
    vocab = 49152
    logits = -10.0 - torch.arange(vocab).float()[None, :].expand(8, vocab) * 1e-4  # ordered tail, distinct values
    logits = logits[:, torch.randperm(vocab, generator=gen)].contiguous()
    logits[:, 123] = 0.0
    u = [0.2, 0.93, 0.97, 0.91] * 2  # the likely token holds 0.69 of the mass
    temps, ks, ps = [1.0] * 8, [0] * 4 + [30000] * 4, [0.9, 0.99, 0.95, 0.99] * 2
    got = cs.sample(logits, temps, ks, ps, u)
    assert torch.equal(got, cs.sample_ref(logits, temps, ks, ps, u))
    assert got[[0, 4]].tolist() == [123, 123] and (got != 123).sum() == 6  # the tail was drawn from


def test_degenerate_rows_take_their_first_maximum():
    """NaN (the first NaN, as argmax), a row of -inf, +inf twice, a temperature that overflows a finite maximum, and
    ties: sampled rows whose maximum is not finite after the temperature take argmax, as greedy rows do."""
    logits = torch.randn(6, 50)
    logits[0, [7, 3]] = float("nan")
    logits[1] = float("-inf")
    logits[2, [30, 9]] = float("inf")
    logits[3, 11] = 3e38  # / 0.01 overflows to inf
    logits[4, [2, 30]] = 1e3
    logits[5, 40:] = float("-inf")  # masked tokens are never drawn
    for t in (0.0, 0.01, 1.0):
        got = cs.sample(logits, [t] * 6, [0] * 6, [1.0] * 6, [0.999] * 6)
        assert torch.equal(got, cs.sample_ref(logits, [t] * 6, [0] * 6, [1.0] * 6, [0.999] * 6))
        assert got[:4].tolist() == [3, 0, 9, 11]
        assert got[5] < 40


@pytest.mark.parametrize("n,vocab", [(6, 50), (64, 4097)])  # one thread; rows split over the team
def test_rows_whose_logits_are_not_finite_are_named(n, vocab):
    """sample_checked names the rows holding a NaN or +inf, or all -inf (an overflowing adapter's), greedy or not,
    and no other: a temperature that overflows a finite maximum, large finite values and masked (-inf) tokens are
    fine. Its tokens are sample's."""
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(n, vocab, generator=gen)
    logits[0, [7, 3]] = float("nan")
    logits[1] = float("-inf")
    logits[2, [30, 9]] = float("inf")
    logits[3, 11] = 3e38
    logits[4, 40:] = float("-inf")
    logits[n - 1, vocab - 1] = float("nan")  # the last entry: past the kernel's 8-float steps when vocab % 8
    temps, ks, ps, u = settings(n, gen)
    for t in (temps, [0.0] * n, [0.01] * n):
        got, bad = cs.sample_checked(logits, t, ks, ps, u)
        assert bad == [0, 1, 2, n - 1]
        assert torch.equal(got, cs.sample(logits, t, ks, ps, u))
    assert cs.sample_checked(torch.randn(3, vocab, generator=gen), [1.0] * 3, [0] * 3, [1.0] * 3, [0.5] * 3)[1] == []
    assert cs.sample_checked(torch.randn(0, vocab), [], [], [], [])[1] == []


def test_the_ends_of_the_draw_and_strided_rows():
    """u = 0 takes the row's first token with any probability (never a zero-probability one), u just under 1 its
    last; rows a slice of a wider tensor read as the contiguous copy."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 700, generator=gen)
    rows = base[:, 50:650]
    rows[:, :100] = float("-inf")
    for u in (0.0, 1.0 - 2**-53):
        for k, p in ((0, 1.0), (0, 0.9), (7, 1.0)):
            got = cs.sample(rows, [1.0] * 4, [k] * 4, [p] * 4, [u] * 4)
            assert torch.equal(got, cs.sample_ref(rows.contiguous(), [1.0] * 4, [k] * 4, [p] * 4, [u] * 4))
            assert (got >= 100).all()


def test_draws_follow_the_distribution():
    """Many draws from one row: each token's frequency is its probability after temperature and top-k (chi-square
    at 5 degrees of freedom, p > 0.001 under the right distribution)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -9.0, -20.0]]).expand(20000, 8).contiguous()
    u = torch.rand(20000, generator=gen, dtype=torch.float64).tolist()
    got = cs.sample(logits, [0.9] * 20000, [6] * 20000, [1.0] * 20000, u)
    counts = torch.bincount(got, minlength=8).double()
    assert counts[6:].sum() == 0  # beyond top-k
    expected = torch.softmax(logits[0, :6].double() / 0.9, -1) * 20000
    assert float(((counts[:6] - expected) ** 2 / expected).sum()) < 20.5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        cs.sample(torch.randn(2, 8, dtype=torch.float64), [1.0] * 2, [0] * 2, [1.0] * 2, [0.5] * 2)
    with pytest.raises(ValueError):
        cs.sample(torch.randn(8, 2).t(), [1.0] * 2, [0] * 2, [1.0] * 2, [0.5] * 2)
    with pytest.raises(ValueError):
        cs.sample(torch.randn(2, 8), [1.0], [0] * 2, [1.0] * 2, [0.5] * 2)
