"""Incremental detokenisation: the text released step by step equals decoding the whole output at once, for a
byte-level tokenizer (multi-byte characters split across tokens) and a SentencePiece-style one (spaces carried by
"▁", dropped at the start of a decode), and stays O(1) tokens per step."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.engine.detokenizer import make_decoder, update_text
from server.engine.request import Request, SamplingParams
from server.model.tiny import byte_level_tokenizer

TEXTS = ["hello world, the quick brown fox", "naïve café — déjà vu 😀 日本語 ok", "a  b   c\n\nd\te"]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([t for t in TEXTS for _ in range(20)],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def stream(tokenizer, ids: list[int], stop=()) -> tuple[str, list[str]]:
    req = Request("r", [1], SamplingParams(stop=tuple(stop)))
    decode = make_decoder(tokenizer)
    pieces = []
    for i, token in enumerate(ids):
        req.output_ids.append(token)
        new, hit = update_text(req, decode, final=i == len(ids) - 1)
        pieces.append(new)
        assert req.read_offset - req.prefix_offset <= 8  # a short window, not the whole output
        if hit:
            break
    return "".join(pieces), pieces


def spacing_cleanup_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose decode cleans up spaces: make_decoder must go through transformers' decode for it."""
    tokenizer = metaspace_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    return tokenizer


@pytest.mark.parametrize("make", [byte_level_tokenizer, metaspace_tokenizer, spacing_cleanup_tokenizer],
                         ids=["byte-level", "metaspace", "cleanup"])
def test_streamed_text_equals_the_whole_decode(make):
    tokenizer = make()
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        streamed, pieces = stream(tokenizer, ids)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in pieces)  # no half characters released


def test_random_bytes_stream_like_the_whole_decode():
    """Arbitrary byte tokens (invalid UTF-8 included): released text == whole decode, replacement characters and all."""
    tokenizer = byte_level_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randint(3, 258) for _ in range(rng.randint(1, 60))]
        assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_tokens_with_multibyte_text():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("café STOP après", add_special_tokens=False)
    streamed, _ = stream(tokenizer, ids, stop=["STOP"])
    assert streamed == "café "
