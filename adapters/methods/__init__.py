"""Training methods: one file per method, one registry line per method (name -> class). See `base.py` for the hooks."""
from __future__ import annotations

from adapters.methods.alora import ALoRA
from adapters.methods.base import Method, MethodConfig, StepContext
from adapters.methods.ia3 import IA3
from adapters.methods.lora import LoRA
from adapters.methods.para import PARA
from adapters.methods.pissa import PiSSA
from adapters.methods.sift import SIFT
from adapters.methods.sorsa import SORSA
from adapters.methods.specadapt import SpecAdapt

METHODS: dict[str, type[Method]] = {
    "lora": LoRA,
    "pissa": PiSSA,
    "sorsa": SORSA,
    "specadapt": SpecAdapt,
    "alora": ALoRA,
    "sift": SIFT,
    "para": PARA,
    "ia3": IA3,
}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None


__all__ = ["METHODS", "Method", "MethodConfig", "StepContext", "get_method"]
