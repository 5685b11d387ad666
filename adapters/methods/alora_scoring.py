"""ALoRA's importance scores, the same numbers as two whole forward passes per rank, at a fraction of the cost.

    IS(r) = CE(network with rank r gated off) - CE(network with only rank r on)      (adapters/methods/alora.py)

The plain way runs the whole network twice per live rank (3,360 forwards a round at r 8 on SmolLM2-135M's 210
projections). Gating a rank of layer l changes nothing before layer l, so `SuffixScorer`:
  * runs the network once with every live rank on and once with every rank off, keeping each decoder layer's input
    (hidden states and the keyword arguments the model passed it: rotary tables, mask, positions);
  * for a rank of layer l, runs layers l.. from the kept input of the right configuration (on for "r off", off for
    "only r on"): on average half the layers;
  * computes the LM head only at the positions the loss counts (the completion tokens), not at every position;
  * multiplies by the frozen base projections through oneDNN (weights reordered once per round) where PyTorch has
    it: on this repository's AMD CPU about 2.3x MKL's speed, which F.linear uses for fp32.
The prefix layers see the same inputs and gates as in a whole forward, so only the head's row subset and oneDNN's
summation order differ from the plain way: a few ulps of the CE (tests/adapters/test_alora_scoring.py compares
the two). Measured on SmolLM2-135M, score batch 8 x 13 tokens, one core (2026-12-01): a whole forward the plain way
0.46-0.57 s; from layer 0 0.24 s, from layer 15 0.14 s, from layer 29 0.05 s, so about 0.14 s a rank on average; a
run at the authors' settings (8 rounds over 1,680 ranks) took 67 min instead of about 3 hours.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adapters.methods.base import decoder_layers

IGNORE_INDEX = -100


class SuffixScorer:
    """CE of `model` on one fixed batch, re-run from any decoder layer on; see the module doc."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], forward_kwargs: dict[str, Any] | None = None):
        self.model, self.batch = model, batch
        self.forward_kwargs = forward_kwargs or {}
        self.layers = decoder_layers(model)
        inner = getattr(model, "model", model)
        self.norm, self.head = inner.norm, model.get_output_embeddings()
        labels = batch["labels"][:, 1:]  # the label of position t is the token at t + 1
        self.keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        self.keep[:, :-1] = labels != IGNORE_INDEX  # positions whose logits the loss counts
        self.targets = labels[labels != IGNORE_INDEX]
        self.count = max(int(self.targets.numel()), 1)
        self.inputs: list[tuple[torch.Tensor, tuple, dict]] = []  # start_pass's

    @torch.no_grad()
    def start_pass(self) -> None:
        """One whole forward as the gates are now, keeping each decoder layer's input (hidden states, other args,
        kwargs): loss_from re-runs from those until the next start_pass."""
        inputs: list[tuple[torch.Tensor, tuple, dict]] = []

        def keep_input(module, args, kwargs):
            inputs.append((args[0], args[1:], dict(kwargs)))

        hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in self.layers]
        try:
            self.model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"],
                       use_cache=False, **self.forward_kwargs)
        finally:
            for h in hooks:
                h.remove()
        if len(inputs) != len(self.layers):
            raise RuntimeError(f"captured {len(inputs)} decoder-layer inputs, expected {len(self.layers)}")
        self.inputs = inputs

    @torch.no_grad()
    def loss_from(self, layer: int) -> float:
        """Token-mean CE with layers `layer`.. re-run (as the gates are now) from the pass's input of `layer`: the
        whole network's CE when no gate before `layer` changed since start_pass."""
        hidden, args, kwargs = self.inputs[layer]
        for decoder_layer in self.layers[layer:]:
            out = decoder_layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.head(self.norm(hidden[self.keep])).float()  # (counted tokens, V)
        return float(F.cross_entropy(logits, self.targets, reduction="sum")) / self.count


class WholeForwardScorer:
    """SuffixScorer's interface the plain way: every loss a whole forward (`score_loss()`); the reference."""

    def __init__(self, score_loss: Callable[[], float]):
        self.score_loss = score_loss

    def start_pass(self) -> None:
        pass

    def loss_from(self, layer: int) -> float:
        return self.score_loss()


@contextlib.contextmanager
def onednn_projections(linears: list[nn.Linear]) -> Iterator[None]:
    """Within the block, each frozen fp32 CPU nn.Linear in `linears` multiplies through oneDNN on a weight
    reordered once (no autograd: scoring only). A no-op where PyTorch has no oneDNN linear. The serving path does the
    same in kernels/linear.py (prepack), which the trainer may not import (README, Layout)."""
    ops = getattr(torch.ops, "mkldnn", None)
    usable = (ops is not None and torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight"))
    patched = []
    try:
        for lin in linears:
            w = lin.weight
            if not usable or w.device.type != "cpu" or w.dtype != torch.float32 or w.requires_grad:
                continue
            packed = ops._reorder_linear_weight(w.detach().contiguous())
            bias = lin.bias

            def forward(x, packed=packed, bias=bias):
                return ops._linear_pointwise(x, packed, bias, "none", [], "")

            lin.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
            patched.append(lin)
        yield
    finally:
        for lin in patched:
            del lin.forward
