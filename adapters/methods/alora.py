"""ALoRA: LoRA whose ranks are pruned and re-allocated between modules during training (total rank budget kept).

delta W = s B diag(g) A, g in {0, 1} a non-trainable gate per rank, s = alpha / r_init for every module (alpha
defaults to r_init). Every target module starts with r_init = `rank` live ranks; budget = r_init * M.

Schedule: after K1 optimizer steps, then every K2 steps, for N_A rounds:
  1. score every live rank on a fixed validation batch:
         IS(r) = CE(network with rank r gated off) - CE(network with only rank r on, every other rank off)
  2. gate off the n_A lowest-scoring ranks, globally (n_A defaults to the number of target projections per layer);
  3. give n_A new ranks (A row Kaiming-uniform, B column zero, fresh optimizer state) to modules where nothing was
     pruned this round, round-robin over them in order of their mean IS (highest first), so as evenly as possible.
     A module first reuses its own gated-off slots; otherwise its A and B grow (optimizer state carried over).
Defaults K1 = 1 epoch, K2 = 0.25 epoch, scaled down to fit a short run (see `ALoRA.schedule`).

Served as LowRank per module with the live ranks only (gated rows/columns dropped; a module with no live rank is
absent). PEFT export: `rank_pattern` = live ranks, `alpha_pattern` = s * r_m (so that alpha_m / r_m = s).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.delta import AdapterDeltas, LowRank
from adapters.methods.base import Method, MethodConfig, StepContext

logger = logging.getLogger(__name__)


class ALoRALinear(nn.Module):
    """y = base(x) + s ((x A^T) * g) B^T; slots with g = 0 are dead (ignored by forward and export)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        dev = base.weight.device
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(_kaiming_rows(rank, base.in_features, dev))  # (slots, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))  # (out, slots)
        self.register_buffer("gate", torch.ones(rank, device=dev))  # (slots,) in {0, 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.float(), self.lora_A) * self.gate  # (..., slots)
        return self.base(x) + (self.scale * F.linear(h, self.lora_B)).to(x.dtype)

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
    default_lr = 1e-4

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
            if ctx.eval_loss is None:
                raise ValueError("ALoRA needs a validation-loss callable in the step context")
            self.run_round(ctx.eval_loss, ctx.optimizer)

    # -- one round ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def importance_scores(self, eval_loss) -> dict[tuple[str, int], float]:
        """IS(r) = CE(r off) - CE(only r on) for every live rank in the network."""
        saved = {name: m.gate.clone() for name, m in self.modules.items()}
        live = [(name, i) for name, m in self.modules.items() for i in m.live()]
        off: dict[tuple[str, int], float] = {}
        for name, i in live:
            self.modules[name].gate[i] = 0.0
            off[(name, i)] = eval_loss()
            self.modules[name].gate[i] = 1.0
        for m in self.modules.values():
            m.gate.zero_()
        scores = {}
        for name, i in live:
            self.modules[name].gate[i] = 1.0
            scores[(name, i)] = off[(name, i)] - eval_loss()
            self.modules[name].gate[i] = 0.0
        for name, m in self.modules.items():
            m.gate.copy_(saved[name])
        return scores

    @torch.no_grad()
    def run_round(self, eval_loss, optimizer: torch.optim.Optimizer | None) -> dict:
        scores = self.importance_scores(eval_loss)
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
        """Turn on `count` fresh ranks in a module: reuse dead slots first, then grow A and B."""
        if count == 0:
            return []
        m = self.modules[name]
        dead = torch.nonzero(m.gate == 0, as_tuple=False).flatten().tolist()[:count]
        grow = count - len(dead)
        if grow > 0:
            old_a, old_b = m.lora_A, m.lora_B
            first = old_a.shape[0]
            m.lora_A = nn.Parameter(torch.cat([old_a.detach(), torch.zeros(grow, old_a.shape[1], device=old_a.device)], 0))
            m.lora_B = nn.Parameter(torch.cat([old_b.detach(), torch.zeros(old_b.shape[0], grow, device=old_b.device)], 1))
            m.gate = torch.cat([m.gate, torch.zeros(grow, device=m.gate.device)])
            if optimizer is not None:
                _swap_param(optimizer, old_a, m.lora_A, dim=0)
                _swap_param(optimizer, old_b, m.lora_B, dim=1)
            dead += list(range(first, first + grow))
        idx = torch.tensor(dead, device=m.gate.device)
        m.lora_A[idx] = _kaiming_rows(len(dead), m.lora_A.shape[1], m.lora_A.device)
        m.lora_B[:, idx] = 0.0
        m.gate[idx] = 1.0
        if optimizer is not None:
            _reset_state(optimizer, m.lora_A, idx, dim=0)
            _reset_state(optimizer, m.lora_B, idx, dim=1)
        return dead

    def export(self) -> AdapterDeltas:
        lowrank = {}
        for name, m in self.modules.items():
            live = m.live()
            if not live:
                continue
            idx = torch.tensor(live, device=m.gate.device)
            a = m.lora_A.detach()[idx].float().cpu().contiguous()  # (r_m, in)
            b = m.lora_B.detach()[:, idx].float().cpu().contiguous()  # (out, r_m)
            lowrank[name] = LowRank(A=a, B=b, scale=m.scale)
        return AdapterDeltas(lowrank=lowrank)


def _swap_param(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int) -> None:
    """Replace `old` by the grown `new` in the optimizer, padding its per-element state with zeros along `dim`."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    for key, v in state.items():
        if torch.is_tensor(v) and v.shape == old.shape:
            pad_shape = list(v.shape)
            pad_shape[dim] = new.shape[dim] - old.shape[dim]
            state[key] = torch.cat([v, torch.zeros(pad_shape, dtype=v.dtype, device=v.device)], dim)
    optimizer.state[new] = state


def _reset_state(optimizer: torch.optim.Optimizer, p: nn.Parameter, idx: torch.Tensor, dim: int) -> None:
    """Zero the optimizer's per-element state (Adam moments) of the re-initialised slots."""
    state = optimizer.state.get(p)
    if not state:
        return
    for v in state.values():
        if torch.is_tensor(v) and v.shape == p.shape:
            v.index_fill_(dim, idx, 0.0)
