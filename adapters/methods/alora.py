"""ALoRA: LoRA whose ranks are pruned and re-allocated between modules during training (total rank budget kept).

delta W = s B diag(g) A, g in {0, 1} a non-trainable gate per rank, s = alpha / r_init for every module (alpha
defaults to r_init). Every target module starts with r_init = `rank` live ranks; budget = r_init * M.
Each rank (slot) is its own pair of parameters, its row of A and its column of B, so each has its own optimizer
state, Adam's moments and step count alike.

Schedule: after K1 optimizer steps, then every K2 steps, for N_A rounds:
  1. score every live rank on one fixed batch of TRAINING data (`StepContext.score_batch`; the paper's validation
     batch, taken from the training split so that the held-out split, on which the reported eval loss is
     measured, is never used to make training decisions):
         IS(r) = CE(network with rank r gated off) - CE(network with only rank r on, every other rank off)
  2. gate off the n_A lowest-scoring ranks, globally (n_A defaults to the number of target projections per layer);
  3. give n_A new ranks (A row Kaiming-uniform, B column zero) to modules where nothing was pruned this round,
     round-robin over them in order of their mean IS (highest first), so as evenly as possible. A module first
     reuses its own gated-off slots, else grows new ones. Either way the new rank's optimizer state is dropped:
     its first update is a fresh Adam step (|update| = lr after bias correction), where zeroed moments under the
     run's step count t would give lr * (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)), up to 3.2x lr.
Defaults K1 = 1 epoch, K2 = 0.25 epoch, scaled down to fit a short run (see `ALoRA.schedule`).

Served as LowRank per module with the live ranks only (gated rows/columns dropped; a module with no live rank is
absent). PEFT export: `rank_pattern` = live ranks, `alpha_pattern` = s * r_m (so that alpha_m / r_m = s).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank, parse_module_name
from adapters.methods.alora_scoring import SuffixScorer, WholeForwardScorer, onednn_projections
from adapters.methods.base import Method, MethodConfig, StepContext, TrainingDefaults, param_group_of

logger = logging.getLogger(__name__)


class ALoRALinear(nn.Module):
    """y = base(x) + s ((x A^T) * g) B^T; slots with g = 0 are dead (ignored by forward and export).

    A (slots, in) and B (out, slots) are stacked from one parameter per slot (`lora_A[i]` (in,), `lora_B[i]`
    (out,)), so that a slot's optimizer state can be dropped on its own when it is re-initialised.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.ParameterList()  # slot i: (in,)
        self.lora_B = nn.ParameterList()  # slot i: (out,)
        self.register_buffer("gate", torch.zeros(0, device=base.weight.device))  # (slots,) in {0, 1}
        self.add_slots(rank)
        self.gate.fill_(1.0)

    def add_slots(self, n: int) -> list[nn.Parameter]:
        """Append `n` dead slots (A row Kaiming-uniform, B column zero); returns their new parameters."""
        dev = self.base.weight.device
        new = []
        for row in _kaiming_rows(n, self.base.in_features, dev):
            a, b = nn.Parameter(row.clone()), nn.Parameter(torch.zeros(self.base.out_features, device=dev))
            self.lora_A.append(a)
            self.lora_B.append(b)
            new += [a, b]
        self.gate = torch.cat([self.gate, torch.zeros(n, device=dev)])
        return new

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (slots, in), B (out, slots), fp32, differentiable."""
        return torch.stack(tuple(self.lora_A)), torch.stack(tuple(self.lora_B), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        h = F.linear(x.float(), a) * self.gate  # (..., slots)
        return self.base(x) + (self.scale * F.linear(h, b)).to(x.dtype)

    def live(self) -> list[int]:
        return torch.nonzero(self.gate, as_tuple=False).flatten().tolist()


def _kaiming_rows(n: int, fan_in: int, device) -> torch.Tensor:
    """Rows drawn like nn.Linear / PEFT LoRA A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), (n, fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(n, fan_in, device=device).uniform_(-bound, bound)


@dataclass
class ALoRAConfig(MethodConfig):
    """ALoRA. `rank` is r_init. k1/k2 unset: 1 epoch / 0.25 epoch, shrunk so that all rounds fit the run."""

    rounds: int = field(default=8, metadata={"help": "N_A: number of prune/re-allocate rounds"})
    n_prune: int | None = field(
        default=None, metadata={"help": "n_A: ranks pruned per round (default: targets per layer)", "type": int}
    )
    k1: int | None = field(default=None, metadata={"help": "K1: optimizer steps before the first round", "type": int})
    k2: int | None = field(default=None, metadata={"help": "K2: optimizer steps between rounds", "type": int})


class ALoRA(Method):
    name = "alora"
    Config = ALoRAConfig
    # The paper's lr (METHODS.md, from the paper's text); its schedule, warm-up and decay were not in the material
    # available: the trainer's cosine with 3% warm-up, no weight decay.
    defaults = TrainingDefaults(lr=1e-4, source="ALoRA paper (Liu et al., NAACL 2024) as summarised in METHODS.md")

    def __init__(self, model: nn.Module, cfg: ALoRAConfig):
        super().__init__(model, cfg)
        self.round_steps: list[int] | None = None
        self.rounds_done = 0
        self.history: list[dict] = []  # per round: pruned and grown (module, slot) lists

    @property
    def scale(self) -> float:
        alpha = self.cfg.alpha if self.cfg.alpha is not None else float(self.cfg.rank)
        return alpha / self.cfg.rank

    @property
    def n_prune(self) -> int:
        return self.cfg.n_prune if self.cfg.n_prune is not None else len(self.cfg.targets)

    @property
    def budget(self) -> int:
        return self.cfg.rank * len(self.modules)

    def total_live_rank(self) -> int:
        return sum(len(m.live()) for m in self.modules.values())

    def make_module(self, layer: int, proj: str, linear: nn.Linear) -> nn.Module:
        return ALoRALinear(linear, self.cfg.rank, self.scale)

    def schedule(self, max_steps: int, steps_per_epoch: int) -> list[int]:
        """The optimizer steps after which a round runs: K1, K1 + K2, ..., all < max_steps."""
        k1 = self.cfg.k1 if self.cfg.k1 is not None else max(1, min(steps_per_epoch, max_steps // 4))
        k2 = self.cfg.k2
        if k2 is None:
            k2 = max(1, min(max(1, steps_per_epoch // 4), (max_steps - k1) // (self.cfg.rounds + 1)))
        return [s for s in (k1 + j * k2 for j in range(self.cfg.rounds)) if s < max_steps]

    def after_step(self, ctx: StepContext) -> None:
        if self.round_steps is None:
            self.round_steps = self.schedule(ctx.max_steps, ctx.steps_per_epoch)
        if ctx.step in self.round_steps:
            if ctx.score_batch is None and ctx.score_loss is None:
                raise ValueError("ALoRA needs a scoring batch (a fixed training batch) in the step context")
            self.run_round(ctx.score_loss, ctx.optimizer, score_batch=ctx.score_batch)

    # -- one round ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def importance_scores(self, score_loss=None, score_batch: dict[str, torch.Tensor] | None = None
                          ) -> dict[tuple[str, int], float]:
        """IS(r) = CE(r off) - CE(only r on) for every live rank in the network. With `score_batch`, by
        SuffixScorer (alora_scoring.py: from the rank's layer on, the same numbers within a few ulps); else by
        `score_loss()`, a whole forward per evaluation (the plain way, kept as the reference)."""
        saved = {name: m.gate.clone() for name, m in self.modules.items()}
        live = [(name, i) for name, m in self.modules.items() for i in m.live()]
        speedup = contextlib.nullcontext()
        if score_batch is not None:
            scorer = SuffixScorer(self.model, score_batch, self.forward_kwargs(score_batch))
            speedup = onednn_projections([m.base for m in self.modules.values()]
                                         + [self.model.get_output_embeddings()])
        else:
            scorer = WholeForwardScorer(score_loss)
        layer_of = {name: parse_module_name(name)[0] for name in self.modules}
        with speedup:
            scorer.start_pass()  # every live rank on
            off: dict[tuple[str, int], float] = {}
            for name, i in live:
                self.modules[name].gate[i] = 0.0
                off[(name, i)] = scorer.loss_from(layer_of[name])
                self.modules[name].gate[i] = 1.0
            for m in self.modules.values():
                m.gate.zero_()
            scorer.start_pass()  # every rank off
            scores = {}
            for name, i in live:
                self.modules[name].gate[i] = 1.0
                scores[(name, i)] = off[(name, i)] - scorer.loss_from(layer_of[name])
                self.modules[name].gate[i] = 0.0
        for name, m in self.modules.items():
            m.gate.copy_(saved[name])
        return scores

    @torch.no_grad()
    def run_round(self, score_loss, optimizer: torch.optim.Optimizer | None,
                  score_batch: dict[str, torch.Tensor] | None = None) -> dict:
        scores = self.importance_scores(score_loss, score_batch)
        n = min(self.n_prune, max(0, len(scores) - 1))
        pruned = sorted(scores, key=lambda key: scores[key])[:n]
        mean_is = {}
        for name in self.modules:
            vals = [v for (mod, _), v in scores.items() if mod == name]
            mean_is[name] = sum(vals) / len(vals) if vals else -math.inf
        for name, i in pruned:
            self.modules[name].gate[i] = 0.0
        pruned_modules = {name for name, _ in pruned}
        candidates = sorted((m for m in self.modules if m not in pruned_modules), key=lambda m: -mean_is[m])
        grown: list[tuple[str, int]] = []
        if candidates:
            counts = {m: 0 for m in candidates}
            for j in range(len(pruned)):
                counts[candidates[j % len(candidates)]] += 1
            for name, c in counts.items():
                grown += [(name, slot) for slot in self._add_ranks(name, c, optimizer)]
        record = {"pruned": pruned, "grown": grown, "scores": {f"{k[0]}#{k[1]}": v for k, v in scores.items()}}
        self.history.append(record)
        self.rounds_done += 1
        logger.info("ALoRA round %d: pruned %s, grew %s", self.rounds_done, pruned, grown)
        return record

    def _add_ranks(self, name: str, count: int, optimizer: torch.optim.Optimizer | None) -> list[int]:
        """Turn on `count` fresh ranks in a module: reuse dead slots first, then grow; fresh optimizer state."""
        if count == 0:
            return []
        m = self.modules[name]
        slots = torch.nonzero(m.gate == 0, as_tuple=False).flatten().tolist()[:count]
        grow = count - len(slots)
        if grow > 0:
            first = m.gate.numel()
            new = m.add_slots(grow)
            if optimizer is not None:
                param_group_of(optimizer, m.lora_A[0])["params"].extend(new)
            slots += list(range(first, first + grow))
        rows = _kaiming_rows(len(slots), m.base.in_features, m.gate.device)
        for slot, row in zip(slots, rows):
            m.lora_A[slot].copy_(row)
            m.lora_B[slot].zero_()
            m.gate[slot] = 1.0
            if optimizer is not None:  # moments AND step count start afresh at the next step
                optimizer.state.pop(m.lora_A[slot], None)
                optimizer.state.pop(m.lora_B[slot], None)
        return slots

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            live = m.live()
            if not live:
                continue
            idx = torch.tensor(live, device=m.gate.device)
            with torch.no_grad():
                a, b = m.factors()
            a = a[idx].float().cpu().contiguous()  # (r_m, in)
            b = b[:, idx].float().cpu().contiguous()  # (out, r_m)
            lowrank[name] = LowRank(A=a, B=b, scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)
