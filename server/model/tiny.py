"""The embedded default backbone: a small Llama-architecture model with seeded random weights and a byte-level
tokenizer, written once as an ordinary Hugging Face checkpoint directory so that every code path (loading,
training, PEFT) treats it like a real model. Its text is noise until an adapter is trained on it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_CONFIG = dict(
    vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
TINY_SEED = 1234
NUM_SPECIAL = 3  # <pad>=0, <s>=1, </s>=2, then the 256 bytes


def byte_level_tokenizer():
    """A PreTrainedTokenizerFast mapping each UTF-8 byte to one token (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    table = _bytes_to_unicode()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({table[b]: NUM_SPECIAL + b for b in range(256)})
    assert set(table.values()) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenisation emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def ensure_tiny_checkpoint(directory: str | Path) -> Path:
    """Write the tiny checkpoint into `directory` unless it is already there; return the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(directory)
    marker = path / "multiplex-tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == {"config": TINY_CONFIG, "seed": TINY_SEED}:
        return path
    path.mkdir(parents=True, exist_ok=True)
    log.info("writing the tiny default backbone to %s", path)
    torch.manual_seed(TINY_SEED)
    config = LlamaConfig(**TINY_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF's init (std 0.02) makes every logit ~0; wider weights give a livelier toy
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(path)
    marker.write_text(json.dumps({"config": TINY_CONFIG, "seed": TINY_SEED}))
    return path
