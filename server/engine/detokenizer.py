"""Incremental detokenisation with stop strings: text is released only once no stop string can still match it.

Two ways to turn a step's new tokens into text, both releasing exactly what decoding the whole output at once gives
(`tokenizer.decode(output_ids, skip_special_tokens=True)`):
- `ByteTableDecoder`, for byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2 style: the tokenizer's decoder
  is `ByteLevel` and transformers cleans up no spaces): every token id's bytes are looked up once at start-up, and a
  request's text grows by its new tokens' bytes through its own incremental UTF-8 decoder, which holds back an
  incomplete character until its last byte comes. No tokenizer call per step: a table lookup and a `bytes.decode`
  (the two tokenizer calls a request the window below needs were ~0.9 ms of the host's 2.75 ms per decode step at
  64 requests). The table is checked against the tokenizer's own decode at start-up (every id alone and random
  sequences); a tokenizer it does not reproduce gets the window decoder.
- `WindowDecoder`, for every other tokenizer: each step decodes only a short window of the request's newest tokens,
  not its whole output (which would cost O(n) per step, O(n^2) per request: 0.5 ms a step for a 2000-token output).
  The window starts a few tokens back (`prefix_offset`): decoding `ids[prefix_offset:]` and
  `ids[prefix_offset:read_offset]` and keeping the difference gives the text the new tokens add, with the context a
  tokenizer needs to place spaces (SentencePiece drops the leading space of the first token it decodes, the same in
  both). While the window's text ends in an incomplete UTF-8 sequence ("\ufffd") nothing is released; the final
  step releases it as the whole decode would.
"""
from __future__ import annotations

import codecs
import logging
import random
from typing import Callable, Protocol

from server.engine.request import Request

log = logging.getLogger(__name__)

Decode = Callable[[list[int]], str]
_UTF8 = codecs.getincrementaldecoder("utf-8")


class TextDecoder(Protocol):
    def new_text(self, req: Request, final: bool) -> str:
        """The text the tokens after req.read_offset add; advances the request's offsets past what it released."""
        ...


class WindowDecoder:
    """Decodes a short window of the newest tokens with the tokenizer (see the module docstring)."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode

    def new_text(self, req: Request, final: bool) -> str:
        ids = req.output_ids
        prefix = self.decode(ids[req.prefix_offset : req.read_offset])
        full = self.decode(ids[req.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            req.prefix_offset, req.read_offset = req.read_offset, len(ids)
            return full[len(prefix) :]
        return ""


class ByteTableDecoder:
    """A byte-level tokenizer's ids -> bytes table and a UTF-8 decoder per request (see the module docstring).
    Ids the table does not cover (a model vocabulary padded past the tokenizer's) add nothing, as in the
    tokenizer's decode, which skips ids it has no token for."""

    def __init__(self, table: list[bytes]) -> None:
        self.table, self.size = table, len(table)

    def new_text(self, req: Request, final: bool) -> str:
        ids, table, size = req.output_ids, self.table, self.size
        start = req.read_offset
        if start == len(ids) - 1:  # the common case: one new token
            token = ids[start]
            data = table[token] if 0 <= token < size else b""
        else:
            data = b"".join([table[t] for t in ids[start:] if 0 <= t < size])
        req.read_offset = req.prefix_offset = len(ids)
        if req.utf8 is None:
            req.utf8 = _UTF8("replace")
        return req.utf8.decode(data, final)

    def decode(self, ids: list[int]) -> str:
        """The whole decode of `ids`, as the tokenizer gives it (for the start-up check)."""
        return b"".join([self.table[t] for t in ids if 0 <= t < self.size]).decode("utf-8", "replace")


def make_decoder(tokenizer) -> TextDecoder:
    """The byte table where it reproduces the tokenizer's decode (a byte-level BPE tokenizer), else the window."""
    decode = _tokenizer_decode(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return WindowDecoder(decode)
    if type(backend.decoder).__name__ != "ByteLevel":
        return WindowDecoder(decode)
    table = ByteTableDecoder(_byte_level_table(backend))
    mismatch = _first_mismatch(table, backend)
    if mismatch is not None:
        log.warning("token text: the byte table does not reproduce this tokenizer's decode of %s; decoding a "
                    "window of tokens per step instead", mismatch)
        return WindowDecoder(decode)
    return table


def _tokenizer_decode(tokenizer) -> Decode:
    """token ids -> text without special tokens, as tokenizer.decode gives it. For a fast tokenizer that does no
    clean-up of spaces (Llama, Mistral, Qwen2 tokenizers) the Rust decoder is called directly: transformers'
    wrapper costs ~7x the decode itself for the few tokens of a step's window."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters, the alphabet of byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def _byte_level_table(backend) -> list[bytes]:
    """Every id's bytes in the whole decode: special tokens none (skipped), a token of byte characters their bytes,
    any other (an added token's text) its UTF-8, as the ByteLevel decoder does."""
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        if i in special:
            continue
        try:
            table[i] = bytes([to_byte[c] for c in token])
        except KeyError:
            table[i] = token.encode()
    return table


def _first_mismatch(table: ByteTableDecoder, backend, samples: int = 256) -> list[int] | None:
    """The first ids (every id alone, then random sequences rich in single-byte tokens, invalid UTF-8 included)
    whose decode by the table differs from the tokenizer's; None when all agree."""
    for i, data in enumerate(table.table):
        if data.decode("utf-8", "replace") != backend.decode([i], skip_special_tokens=True):
            return [i]
    rng = random.Random(0)
    short = [i for i, b in enumerate(table.table) if len(b) == 1] or list(range(table.size))
    sequences = [[rng.choice(short) if rng.random() < 0.5 else rng.randrange(table.size)
                  for _ in range(rng.randint(1, 24))] for _ in range(samples)]
    for ids in sequences:
        if table.decode(ids) != backend.decode(ids, skip_special_tokens=True):
            return ids
    return None


def update_text(req: Request, decoder: TextDecoder, final: bool) -> tuple[str, bool]:
    """The newest tokens' text, cut at the first stop string (decoder: make_decoder's). With stop strings the text
    is kept in req.text and a possible stop string's beginning is held back until it cannot start one; without
    them every new character goes out at once and nothing is kept. -> (new text to send, hit a stop string)."""
    new = decoder.new_text(req, final)
    stops = req.params.stop
    if not stops:
        return new, False
    text, hit = req.text + new, False
    search_from = max(0, req.num_text_sent - max(len(s) for s in stops))
    cuts = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    if cuts:
        text, hit = text[: min(cuts)], True
    req.text = text
    if hit or final:
        end = len(text)
    else:
        end = len(text) - max(len(s) - 1 for s in stops)  # hold back a possible stop-string prefix
    end = max(end, req.num_text_sent)
    new = text[req.num_text_sent : end]
    req.num_text_sent = end
    return new, hit
