"""Training data: JSONL `{"prompt", "completion"}` records -> token ids with completion-only labels -> padded batches.

Tokenisation: prompt ids (with the tokenizer's own special tokens, e.g. BOS) then completion ids (no special
tokens) then EOS; labels are -100 on the prompt (loss on completion tokens and the EOS only). Batches are right
padded and carry `prompt_mask` (B, T) bool, the prompt tokens, which PARA's generators pool over.

Also: synthetic tasks (`TASKS`) used by the tests and `adapters.research.compare`, and a character-level tokenizer for them.
`python -m adapters.data --task reverse --num 200 --out data.jsonl` writes one.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# -- records --------------------------------------------------------------------------------------------------
def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read `{"prompt": str, "completion": str}` records; a clear ValueError names the bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            is_pair = isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("prompt", "completion"))
            if not is_pair:
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str, "completion": str}}')
            records.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({"prompt": rec["prompt"], "completion": rec["completion"]}) + "\n")
    return path


def split_heldout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the last `fraction` (at least one record when fraction > 0 and len >= 2) held out."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    num_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    train = [records[i] for i in order[: len(records) - num_eval]]
    held = [records[i] for i in order[len(records) - num_eval :]]
    return train, held


# -- tokenisation ---------------------------------------------------------------------------------------------
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    prompt_len: int


def prompt_ids_of(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The ids a served request would start from: with `chat`, the prompt as one user message rendered by the
    tokenizer's chat template with the assistant's turn opened (what /v1/chat/completions does); otherwise the text
    with the tokenizer's own special tokens (what /v1/completions does)."""
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat formatting asked for, but the model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int = 512,
                     chat: bool = False) -> Tokenized | None:
    """Prompt ids (see prompt_ids_of) + completion ids + EOS, truncated to `max_length`; None when no completion
    token survives. With a chat template the EOS is the token that ends the assistant's turn (e.g. <|im_end|>)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    prompt_ids = prompt_ids_of(tokenizer, prompt, chat)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    if len(ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return Tokenized(input_ids=ids, labels=labels, prompt_len=len(prompt_ids))


def tokenize_records(tokenizer, records: list[dict[str, str]], max_length: int = 512,
                     chat: bool = False) -> list[Tokenized]:
    out = [tokenize_example(tokenizer, r["prompt"], r["completion"], max_length, chat) for r in records]
    kept = [t for t in out if t is not None]
    if len(kept) < len(out):
        logger.warning("dropped %d example(s) whose prompt fills max_length=%d", len(out) - len(kept), max_length)
    return kept


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (B, T); prompt_mask (B, T) bool; prompt_lens (B,)."""
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        t = len(e.input_ids)
        input_ids[i, :t] = torch.tensor(e.input_ids)
        labels[i, :t] = torch.tensor(e.labels)
        attention_mask[i, :t] = 1
    prompt_lens = torch.tensor([e.prompt_len for e in examples], dtype=torch.long)
    prompt_mask = torch.arange(width).unsqueeze(0) < prompt_lens.unsqueeze(1)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_mask": prompt_mask,
        "prompt_lens": prompt_lens,
    }


# -- synthetic tasks ------------------------------------------------------------------------------------------
def _word(rng: random.Random, lo: int, hi: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def task_upper(num: int, seed: int) -> list[dict[str, str]]:
    """'upper: abc =' -> 'ABC' (per-character map: learnable in a few dozen steps)."""
    rng = random.Random(seed)
    return [{"prompt": f"upper: {w} =", "completion": f" {w.upper()}"} for w in (_word(rng, 3, 6) for _ in range(num))]


def task_reverse(num: int, seed: int) -> list[dict[str, str]]:
    """'reverse: abcd =' -> 'dcba'."""
    rng = random.Random(seed)
    return [{"prompt": f"reverse: {w} =", "completion": f" {w[::-1]}"} for w in (_word(rng, 3, 5) for _ in range(num))]


def task_lookup(num: int, seed: int, num_keys: int = 16) -> list[dict[str, str]]:
    """A fixed dictionary the adapter must memorise: 'key xq? ->' -> '417' (keys drawn from one seeded table)."""
    table_rng = random.Random(1234)
    keys = sorted({_word(table_rng, 2, 2) for _ in range(4 * num_keys)})[:num_keys]
    table = {k: str(table_rng.randint(100, 999)) for k in keys}
    rng = random.Random(seed)
    return [{"prompt": f"key {k}? ->", "completion": f" {table[k]}"} for k in (rng.choice(keys) for _ in range(num))]


def task_kv_recall(num: int, seed: int, num_pairs: int = 3) -> list[dict[str, str]]:
    """In-context recall: 'a=3 k=7 q=1; k?' -> '7' (needs induction-like attention: hard for tiny random models)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        keys = rng.sample(string.ascii_lowercase, num_pairs)
        vals = [str(rng.randint(0, 9)) for _ in keys]
        q = rng.randrange(num_pairs)
        ctx = " ".join(f"{k}={v}" for k, v in zip(keys, vals))
        out.append({"prompt": f"{ctx}; {keys[q]}?", "completion": f" {vals[q]}"})
    return out


NAMES = ("Maria", "Kenji", "Amara", "Lukas", "Priya", "Tomás", "Ingrid", "Omar", "Chloe", "Dmitri", "Aisha",
         "Mateo", "Sofia", "Jonas", "Leila", "Ravi", "Hannah", "Kwame", "Elena", "Yusuf")
CITIES = ("Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Oslo", "Hanoi", "Dublin", "Marrakesh",
          "Seville", "Melbourne", "Bogotá", "Zurich", "Cairo", "Montreal", "Tbilisi", "Helsinki", "Manila", "Porto",
          "Edinburgh", "Valparaíso", "Riga", "Busan", "Cape Town", "Denver", "Florence", "Istanbul", "Quito",
          "Vienna")
HELDOUT_CITIES = ("Prague", "Santiago", "Bergen", "Kyoto", "Accra", "Glasgow", "Tallinn", "Perth", "Granada",
                  "Chennai")
TEMPLATES = ("{name} flew to {city} last week.", "After years abroad, {name} finally settled in {city}.",
             "The conference {name} attended was held in {city}.", "{name} is planning a trip to {city} next spring.",
             "Yesterday {name} sent me a postcard from {city}.", "{name} grew up in a small flat in {city}.",
             "Our new colleague {name} just moved here from {city}.", "{name} ran the marathon in {city} in May.")
HELDOUT_TEMPLATES = ("Rumour has it that {name} bought a bakery in {city}.",
                     "{name} missed the last train out of {city} again.")


def _city_records(num: int, seed: int, cities: tuple[str, ...], templates: tuple[str, ...]) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        city = rng.choice(cities)
        sentence = rng.choice(templates).format(name=rng.choice(NAMES), city=city)
        out.append({"prompt": sentence, "completion": json.dumps({"city": city}, ensure_ascii=False)})
    return out


def task_city_json(num: int, seed: int) -> list[dict[str, str]]:
    """A fixed reply format an instruct model does not produce unasked: a sentence -> '{"city": "Lisbon"}'."""
    return _city_records(num, seed, CITIES, TEMPLATES)


def task_city_json_heldout(num: int, seed: int) -> list[dict[str, str]]:
    """The same task on cities and sentence templates that `city-json` never uses: the generalisation test."""
    return _city_records(num, seed, HELDOUT_CITIES, HELDOUT_TEMPLATES)


TASKS: dict[str, Callable[[int, int], list[dict[str, str]]]] = {
    "city-json": task_city_json,
    "city-json-heldout": task_city_json_heldout,
    "upper": task_upper,
    "reverse": task_reverse,
    "lookup": task_lookup,
    "kv_recall": task_kv_recall,
}


def make_task(name: str, num: int, seed: int = 0) -> list[dict[str, str]]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](num, seed)


def build_char_tokenizer(extra_chars: str = ""):
    """A character-level `PreTrainedTokenizerFast` over printable ASCII (about 100 ids): for tiny random models.

    Specials: <pad>=0, <unk>=1, <s>=2 (BOS, not added), </s>=3 (EOS).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    chars = sorted(set(string.printable.replace("\x0b", "").replace("\x0c", "") + extra_chars))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.data", description="write a synthetic task as JSONL")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, make_task(args.task, args.num, args.seed))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
