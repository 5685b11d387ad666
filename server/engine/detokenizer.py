"""Incremental detokenisation with stop strings: text is released only once no stop string can still match it.

Each step decodes only a short window of the request's newest tokens, not its whole output (which would cost
O(n) per step, O(n^2) per request: 0.5 ms a step for a 2000-token output). The window starts a few tokens back
(`prefix_offset`): decoding `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]` and keeping the difference
gives the text the new tokens add, with the context a tokenizer needs to place spaces (SentencePiece drops the
leading space of the first token it decodes, the same in both). While the window's text ends in an incomplete
UTF-8 sequence ("\ufffd") nothing is released; the final step releases it as the whole decode would.
"""
from __future__ import annotations

from typing import Callable

from server.engine.request import Request

Decode = Callable[[list[int]], str]


def make_decoder(tokenizer) -> Decode:
    """token ids -> text without special tokens, as tokenizer.decode gives it. For a fast tokenizer that does no
    clean-up of spaces (Llama, Mistral, Qwen2 tokenizers) the Rust decoder is called directly: transformers'
    wrapper costs ~7x the decode itself for the few tokens of a step's window."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _new_text(req: Request, decode: Decode, final: bool) -> str:
    """The text the tokens after req.read_offset add; advances the request's offsets when it is complete."""
    ids = req.output_ids
    prefix = decode(ids[req.prefix_offset : req.read_offset])
    full = decode(ids[req.prefix_offset :])
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        req.prefix_offset, req.read_offset = req.read_offset, len(ids)
        return full[len(prefix) :]
    return ""


def update_text(req: Request, decode: Decode, final: bool) -> tuple[str, bool]:
    """Add the newest tokens' text to req.text, cut at the first stop string (decode: make_decoder's).
    -> (new text to send, hit a stop string)."""
    text = req.text + _new_text(req, decode, final)
    stops = req.params.stop
    hit = False
    if stops:
        search_from = max(0, req.num_text_sent - max(len(s) for s in stops))
        cuts = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
        if cuts:
            text, hit = text[: min(cuts)], True
    req.text = text
    if hit or final:
        end = len(text)
    else:
        end = len(text) - max((len(s) - 1 for s in stops), default=0)  # hold back a possible stop-string prefix
    end = max(end, req.num_text_sent)
    new = text[req.num_text_sent : end]
    req.num_text_sent = end
    return new, hit
