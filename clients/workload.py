"""What the load generator sends: arrival times, which adapter, prompt and output lengths. Pure and seeded, so a
workload can be replayed exactly.

- Arrivals are a Poisson process: gaps between requests are exponential with mean 1/rate.
- Popularity over the adapters, listed most popular first: `zipf` gives the k-th adapter a weight 1/k^s,
  `uniform` the same weight to all. A `base_fraction` of requests goes to the base model (adapter None).
- Lengths come from a `Distribution` spec: `32` (fixed), `uniform:16:64` (inclusive), `normal:64:16`,
  `exp:64` (exponential with that mean); every draw is rounded and at least 1.
- A prompt of length n is n words drawn from WORDS (a space before each but the first). Tokens per word depend on
  the server's tokenizer (~1 for BPE vocabularies, ~5 for the tiny byte-level one); the server reports the exact
  count in `usage.prompt_tokens`, which the load generator records.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ("the", "of", "and", "to", "in", "is", "that", "it", "for", "on", "was", "with", "as", "at", "by", "be",
         "this", "from", "or", "have", "an", "they", "which", "one", "you", "were", "all", "we", "can", "her")


@dataclass(frozen=True)
class Distribution:
    kind: str  # "fixed" | "uniform" | "normal" | "exp"
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> Distribution:
        """'32' | 'uniform:LO:HI' | 'normal:MEAN:STD' | 'exp:MEAN'; ValueError names what is wrong."""
        kind, *rest = spec.strip().split(":")
        arity = {"uniform": 2, "normal": 2, "exp": 1}
        try:
            if not rest:
                value = int(kind)
                if value < 1:
                    raise ValueError
                return cls("fixed", (float(value),))
            if kind not in arity or len(rest) != arity[kind]:
                raise ValueError
            params = tuple(float(x) for x in rest)
        except ValueError:
            raise ValueError(f"bad length distribution {spec!r}: use N, uniform:LO:HI, normal:MEAN:STD or exp:MEAN "
                             "(N, LO, HI, MEAN >= 1)") from None
        if kind == "uniform" and not 1 <= params[0] <= params[1]:
            raise ValueError(f"bad length distribution {spec!r}: uniform needs 1 <= LO <= HI")
        if params[0] < 1 or (kind == "normal" and params[1] < 0):
            raise ValueError(f"bad length distribution {spec!r}: the mean must be >= 1 and the std >= 0")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.params[0]
        elif self.kind == "uniform":
            value = rng.randint(int(self.params[0]), int(self.params[1]))
        elif self.kind == "normal":
            value = rng.gauss(self.params[0], self.params[1])
        else:
            value = rng.expovariate(1.0 / self.params[0])
        return max(1, round(value))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.params[0]))
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


def popularity_weights(num_adapters: int, popularity: str, zipf_s: float) -> list[float]:
    """Probability of each adapter, most popular first; sums to 1."""
    if popularity == "uniform":
        raw = [1.0] * num_adapters
    elif popularity == "zipf":
        raw = [1.0 / (k ** zipf_s) for k in range(1, num_adapters + 1)]
    else:
        raise ValueError(f"unknown popularity {popularity!r}: use zipf or uniform")
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    arrival_s: float  # seconds after the start of the run
    adapter_id: str | None  # None: the base model
    prompt: str
    prompt_words: int
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    rate: float  # requests per second
    adapter_ids: tuple[str, ...]
    popularity: str
    zipf_s: float
    base_fraction: float
    prompt_len: Distribution
    max_tokens: Distribution
    seed: int

    def plan(self, num_requests: int, duration_s: float) -> list[PlannedRequest]:
        """The requests arriving within `duration_s`, at most `num_requests` of them."""
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError(f"base fraction must be within [0, 1], got {self.base_fraction}")
        if not self.adapter_ids and self.base_fraction < 1.0:
            raise ValueError("no adapters given: name some, or send everything to the base model (base fraction 1)")
        rng = random.Random(self.seed)
        weights = popularity_weights(len(self.adapter_ids), self.popularity, self.zipf_s) if self.adapter_ids else []
        planned: list[PlannedRequest] = []
        arrival = 0.0
        while len(planned) < num_requests:
            arrival += rng.expovariate(self.rate)
            if arrival > duration_s:
                break
            is_base = not self.adapter_ids or rng.random() < self.base_fraction
            adapter_id = None if is_base else rng.choices(self.adapter_ids, weights)[0]
            words = self.prompt_len.sample(rng)
            prompt = " ".join(rng.choice(WORDS) for _ in range(words))
            max_tokens = self.max_tokens.sample(rng)
            planned.append(PlannedRequest(len(planned), arrival, adapter_id, prompt, words, max_tokens))
        return planned
