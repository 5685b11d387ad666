"""Before and after: greedy answers of the base model and of the base model with an adapter artifact, on held-out
records, with the exact-match accuracy of each.

    python -m adapters.evaluate --model .multiplex/models/smollm2 --adapter out/city --data city_eval.jsonl --chat

The adapter's LowRank and Sparse deltas are merged into a copy of the weights (the serving correctness anchor), so
this checks the artifact that is uploaded, not the trainer's in-memory model. Scale kinds (IA3, PARA) act on
activations and cannot be merged: they are refused here by name.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass

import torch

from adapters.artifact import load_adapter
from adapters.spec import backbone_spec
from adapters.data import load_jsonl, prompt_ids_of

PROJECTION_OWNER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class Answers:
    texts: list[str]
    accuracy: float


def merge_adapter(model, adapter_dir: str) -> torch.nn.Module:
    """A copy of `model` with the artifact's LowRank and Sparse deltas added to its weights."""
    deltas = load_adapter(adapter_dir, spec=backbone_spec(model.config)).deltas
    if deltas.scale or deltas.para:
        raise ValueError(f"{adapter_dir}: Scale deltas (IA3, PARA) act on activations; evaluate serves them "
                         f"through the server instead")
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in deltas.weight_deltas().items():  # 'layers.3.q_proj' -> (out, in) fp32
            _, layer, proj = name.split(".")
            block = merged.model.layers[int(layer)]
            linear = getattr(getattr(block, PROJECTION_OWNER[proj]), proj)
            linear.weight += delta.to(linear.weight.dtype)
    return merged.eval()


@torch.no_grad()
def greedy_answers(model, tokenizer, records: list[dict[str, str]], *, chat: bool, max_new_tokens: int) -> Answers:
    texts = []
    for record in records:
        ids = torch.tensor([prompt_ids_of(tokenizer, record["prompt"], chat)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    hits = sum(text == record["completion"].strip() for text, record in zip(texts, records))
    return Answers(texts, hits / max(1, len(records)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory of the base model")
    parser.add_argument("--adapter", required=True, help="adapter artifact directory (format 1 or PEFT)")
    parser.add_argument("--data", required=True, help='held-out JSONL: {"prompt", "completion"} per line')
    parser.add_argument("--chat", action="store_true", help="render prompts with the model's chat template")
    parser.add_argument("--num", type=int, default=50, help="records to answer")
    parser.add_argument("--show", type=int, default=5, help="answers to print side by side")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    records = load_jsonl(args.data)[: args.num]
    start = time.monotonic()
    before = greedy_answers(base, tokenizer, records, chat=args.chat, max_new_tokens=args.max_new_tokens)
    after = greedy_answers(merge_adapter(base, args.adapter), tokenizer, records, chat=args.chat,
                           max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"num": len(records), "base_accuracy": before.accuracy, "adapter_accuracy": after.accuracy,
                          "seconds": round(time.monotonic() - start, 1)}))
        return 0
    for record, old, new in list(zip(records, before.texts, after.texts))[: args.show]:
        print(f"prompt:   {record['prompt']}\n  base:    {old[:100]!r}\n  adapter: {new[:100]!r}\n")
    print(f"exact match on {len(records)} held-out records: base {before.accuracy:.1%}, "
          f"with the adapter {after.accuracy:.1%} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
