"""Incremental detokenisation: the text released step by step equals decoding the whole output at once, for a
byte-level tokenizer (multi-byte characters split across tokens), by its byte table and by the window of tokens, and
a SentencePiece-style one (spaces carried by "▁", dropped at the start of a decode), and stays O(1) tokens per step."""
import logging
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import server.engine.detokenizer as detokenizer
from server.engine.detokenizer import ByteTableDecoder, WindowDecoder, make_decoder, update_text
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


def window_decoder(tokenizer) -> WindowDecoder:
    return WindowDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def stream(tokenizer, ids: list[int], stop=(), decoder=None, bounded=True) -> tuple[str, list[str]]:
    """Release ids one step at a time; `bounded`: check that each step decodes a short window, not the output."""
    req = Request("r", [1], SamplingParams(stop=tuple(stop)))
    decode = decoder or make_decoder(tokenizer)
    pieces = []
    for i, token in enumerate(ids):
        req.output_ids.append(token)
        new, hit = update_text(req, decode, final=i == len(ids) - 1)
        pieces.append(new)
        assert not bounded or req.read_offset - req.prefix_offset <= 8  # a short window, not the whole output
        if hit:
            break
    return "".join(pieces), pieces


def spacing_cleanup_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose decode cleans up spaces: make_decoder must go through transformers' decode for it."""
    tokenizer = metaspace_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    return tokenizer


@pytest.mark.parametrize("make,way", [(byte_level_tokenizer, ByteTableDecoder), (byte_level_tokenizer, WindowDecoder),
                                      (metaspace_tokenizer, WindowDecoder), (spacing_cleanup_tokenizer, WindowDecoder)],
                         ids=["byte-level-table", "byte-level-window", "metaspace", "cleanup"])
def test_streamed_text_equals_the_whole_decode(make, way):
    tokenizer = make()
    decoder = make_decoder(tokenizer)
    if way is WindowDecoder:
        decoder = decoder if isinstance(decoder, WindowDecoder) else window_decoder(tokenizer)
    assert isinstance(decoder, way)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        streamed, pieces = stream(tokenizer, ids, decoder=decoder)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in pieces)  # no half characters released


@pytest.mark.parametrize("way", ["table", "window"])
def test_random_bytes_stream_like_the_whole_decode(way):
    """Arbitrary byte tokens (invalid UTF-8 included): released text == whole decode, replacement characters and
    all; special tokens among them are skipped, ids past the tokenizer's vocabulary add nothing."""
    tokenizer = byte_level_tokenizer()
    decoder = make_decoder(tokenizer) if way == "table" else window_decoder(tokenizer)
    assert isinstance(make_decoder(tokenizer), ByteTableDecoder)
    rng = random.Random(0)
    low, high = (0, 270) if way == "table" else (3, 258)  # 0-2: <s>, </s>, <pad>; > 258: none (the window grows)
    for _ in range(40):
        ids = [rng.randint(low, high) for _ in range(rng.randint(1, 60))]
        # (the window grows while its text ends in an incomplete character: random bytes often do)
        streamed, pieces = stream(tokenizer, ids, decoder=decoder, bounded=False)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_the_byte_table_streams_added_tokens_and_multibyte_text_like_the_whole_decode():
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<tool>", "工具"])  # not special: their text is part of the output
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    decoder = make_decoder(tokenizer)
    assert isinstance(decoder, ByteTableDecoder)
    ids = tokenizer.encode("a <tool> é 工具 😀 <|im_end|> 日本", add_special_tokens=False)
    assert len(ids) == 22  # the added tokens are one token each
    streamed, pieces = stream(tokenizer, ids, decoder=decoder)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) and "<|im_end|>" not in streamed
    assert all("\ufffd" not in p for p in pieces)


def test_a_table_that_does_not_reproduce_the_decode_falls_back_to_the_window(monkeypatch, caplog):
    tokenizer = byte_level_tokenizer()
    wrong = lambda backend: [b"x" for _ in range(backend.get_vocab_size())]  # noqa: E731
    monkeypatch.setattr(detokenizer, "_byte_level_table", wrong)
    with caplog.at_level(logging.WARNING):
        decoder = make_decoder(tokenizer)
    assert isinstance(decoder, WindowDecoder) and "does not reproduce" in caplog.text
    assert stream(tokenizer, tokenizer.encode("ok", add_special_tokens=False), decoder=decoder)[0] == "ok"


def test_smollm2s_tokenizer_gets_the_table_and_streams_like_its_decode(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    decoder = make_decoder(tokenizer)
    assert isinstance(decoder, ByteTableDecoder)
    rng = random.Random(1)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False) + [rng.randrange(len(tokenizer)) for _ in range(40)]
        ids += [tokenizer.eos_token_id, 0, 1]  # special tokens: skipped
        assert stream(tokenizer, ids, decoder=decoder)[0] == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_tokens_with_multibyte_text():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("café STOP après", add_special_tokens=False)
    streamed, _ = stream(tokenizer, ids, stop=["STOP"])
    assert streamed == "café "
