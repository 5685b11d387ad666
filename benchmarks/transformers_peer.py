"""transformers and PEFT in this process: the base model's batched `generate`, and PEFT's mixed-batch
`generate(adapter_names=...)` over the workload's LoRA directories (the golden reference for mixed batches) on a
second copy of the model, so that the base rounds run plain transformers."""
from __future__ import annotations

import time
from importlib.metadata import version

from benchmarks.workload import Workload


class TransformersPeer:
    command = None  # in-process

    def __init__(self, workload: Workload):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.workload = workload
        self.system = f"transformers {version('transformers')} generate / PEFT {version('peft')} adapter_names"
        dtype = getattr(torch, workload.dtype)
        self.base = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=dtype).eval()
        first, *others = workload.distinct_adapter_ids()
        model = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=dtype)
        self.mixed = PeftModel.from_pretrained(model, workload.adapter_dir(first), adapter_name=first)
        for adapter_id in others:
            self.mixed.load_adapter(workload.adapter_dir(adapter_id), adapter_name=adapter_id)
        self.mixed.eval()
        self.input_ids = torch.tensor(workload.prompts)  # (B, P): equal lengths, so no padding
        pad_id = self.base.generation_config.pad_token_id
        pad_id = self.base.generation_config.eos_token_id if pad_id is None else pad_id
        self.pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id

    def round(self, mixed: bool) -> float:
        """Seconds of one batched generate of every request."""
        import torch

        model, extra = (self.mixed, {"adapter_names": self.workload.adapter_ids}) if mixed else (self.base, {})
        ids, max_tokens = self.input_ids, self.workload.max_tokens
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=self.pad_id,
                                 **extra)  # (B, P + max_tokens)
        seconds = time.perf_counter() - t0
        if tuple(out.shape) != (ids.shape[0], ids.shape[1] + max_tokens):
            raise RuntimeError(f"transformers generated shape {tuple(out.shape)}")
        return seconds

    def close(self) -> None:
        del self.base, self.mixed
