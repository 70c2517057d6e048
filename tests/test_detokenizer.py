"""Incremental detokenization (Request.append): the text grows by complete characters only, equals the whole
decode at every step where that is complete and at the end, and stop strings match across token boundaries."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from tailorkv.engine.detokenizer import IncrementalDetokenizer, find_stop
from tailorkv.engine.request import Request
from tailorkv.engine.sampling import SamplingParams
from tailorkv.engine.tokenizer import Tokenizer
from tailorkv.models.embedded import embedded_tokenizer_source
from tailorkv.scheduler.scheduler import Seq

MULTI_BYTE = "Hello 世界! 🎉🎊 naïve café 😀 end"
SPACES = " leading,  two spaces\n\n   indented\tand tabbed  "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(embedded_tokenizer_source())


def request(n: int, **params) -> Request:
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True, **params)
    return Request(0, [1], sp, Seq(0, 1, n))


def grow(tok, ids: list[int], **params) -> tuple[Request, list[str]]:
    """The request after appending `ids` one by one, and its `text` after each append."""
    req = request(len(ids), **params)
    texts = []
    for t in ids:
        req.append(t, tok)
        texts.append(req.text)
        if req.finished:
            break
    return req, texts


def assert_incremental(tok, ids: list[int]) -> None:
    req, texts = grow(tok, ids)
    partial = 0
    for n, text in enumerate(texts[:-1], 1):
        whole = tok.decode(ids[:n])
        assert "\ufffd" not in text
        if whole.endswith("\ufffd"):
            partial += 1
            assert whole.startswith(text)
        else:
            assert text == whole
    assert req.finish_reason["type"] == "length" and texts[-1] == tok.decode(ids)
    return partial


def test_multi_byte_characters_split_over_tokens(tok):
    ids = tok.encode(MULTI_BYTE)
    assert assert_incremental(tok, ids) >= 4  # CJK and emoji bytes are spread over tokens


def test_leading_and_repeated_spaces(tok):
    assert_incremental(tok, tok.encode(SPACES))


def test_a_long_answer(tok):
    from tailorkv.essays import load_essays

    ids = tok.encode(load_essays()[:6000] + MULTI_BYTE)
    assert_incremental(tok, ids)


class Sentencepiece:
    """A Llama-style decoder (▁ for a space, byte fallback, the first space stripped) over a toy vocabulary."""

    PIECES = [
        "▁Hello",
        "▁world",
        "▁",
        "<0xE4>",
        "<0xB8>",
        "<0x96>",
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
    ]
    PIECES += ["!", "▁new", "line", "<0x0A>"]

    def __init__(self):
        self.tk = HFTokenizer(models.WordLevel({p: i for i, p in enumerate(self.PIECES)}, "!"))
        self.tk.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids)

    decode_continuation = (
        decode  # as Tokenizer's for a tokenizer.json: its decoder strips one leading space
    )

    def ids(self, pieces: str) -> list[int]:
        return [self.PIECES.index(p) for p in pieces.split()]


def test_sentencepiece_spaces_and_byte_fallback():
    sp = Sentencepiece()
    pieces = "▁Hello ▁world ▁ <0xE4> <0xB8> <0x96> ! <0xF0> <0x9F> <0x98> <0x80> <0x0A> ▁new line ▁"
    ids = sp.ids(pieces)
    assert sp.decode(ids[:2]) == "Hello world" and sp.decode(ids) == "Hello world 世!😀\n newline "
    detok, text = IncrementalDetokenizer(), ""
    for n in range(1, len(ids) + 1):
        text += detok.step(sp, ids[:n])
        whole = sp.decode(ids[:n])
        assert text == whole or (whole.endswith("\ufffd") and whole.startswith(text))
    assert text + detok.flush(sp, ids) == sp.decode(ids)


def test_an_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok.encode(MULTI_BYTE)
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    req, texts = grow(tok, ids[:cut])
    assert texts[-1] == tok.decode(ids[:cut]) and texts[-1].endswith("\ufffd")


def test_a_stop_string_spanning_tokens(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    req, texts = grow(tok, ids, stop=["never", "wn fo"])
    assert req.text == "The quick bro" and req.finish_reason == {"type": "stop", "matched": "wn fo"}
    assert tok.decode(req.output_ids) == "The quick brown fox"


def test_a_stop_string_of_a_split_character(tok):
    ids = tok.encode(MULTI_BYTE)
    req, _ = grow(tok, ids, stop=["界!"])
    assert req.text == "Hello 世" and req.finish_reason["matched"] == "界!"
    assert tok.decode(req.output_ids) == "Hello 世界!"


def test_streamed_text_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    req = request(len(ids), stop=["fox jumps!"])
    streamed, held = "", set()
    for t in ids:
        req.append(t, tok)
        streamed += req.new_text()
        held.add(req.text[len(streamed) :])
    assert held == {"", "fox", "fox jumps"}
    assert streamed == req.text == tok.decode(ids)


def test_a_stop_token_ends_without_its_text(tok):
    ids = tok.encode(MULTI_BYTE)
    req, _ = grow(tok, ids[:4] + [ids[5]], stop_token_ids=[ids[5]])
    assert req.output_ids == ids[:4] and req.text == tok.decode(ids[:4])
    assert req.finish_reason == {"type": "stop", "matched": ids[5]}


def test_find_stop_searches_only_the_new_tail():
    assert find_stop("ab stop cd", 3, ["stop"]) is None  # wholly before the new text: found earlier
    assert find_stop("ab stop cd", 6, ["stop"]) == (3, 7, "stop")
    assert find_stop("ab stop", 1, ["zz", "stop"]) == (3, 7, "stop")


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    """A small sentencepiece BPE with byte fallback: '▁' spaces, lone '▁' pieces, CJK and emoji as bytes."""
    import io

    import sentencepiece

    corpus = [
        "Hello world, this is a small corpus.",
        "The quick brown fox jumps over the lazy dog.",
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 50),
        model_writer=model,
        vocab_size=340,
        byte_fallback=True,
        model_type="bpe",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    from tailorkv.models.weights import TokenizerSource

    return Tokenizer(TokenizerSource("hf_dir", path=str(path)))


@pytest.mark.parametrize("text", [MULTI_BYTE, SPACES, "a  b   c 世界  😀   x"])
def test_sentencepiece_spaces_and_bytes_survive_incremental_decoding(spm, text):
    ids = spm.encode(text)
    assert spm._sp.id_to_piece(ids[0]) and any(spm._sp.id_to_piece(i) == "\u2581" for i in ids[1:])
    req, texts = grow(spm, ids)
    assert req.text == spm.decode(ids)
    for n, t in enumerate(
        texts, 1
    ):  # at every step: a prefix of the whole decode of what came so far
        assert spm.decode(ids[:n]).startswith(t)


def test_sentencepiece_lone_spaces_from_a_model_keep_their_spaces(spm):
    """A model may emit what the encoder never does (a lone '▁' before a '▁word', runs of them): sentencepiece
    strips every leading space of a text, so a window inside the answer must not start its decode bare."""
    import random

    sp = spm._sp
    words = spm.encode("The lazy dog")  # '▁The', '▁lazy', ...: each word one or more pieces
    lone = sp.piece_to_id("\u2581")
    ids = [words[0], lone, *words[1:], lone, lone, words[-1], lone]
    assert "  " in spm.decode(ids)
    assert grow(spm, ids)[0].text == spm.decode(ids)
    rng = random.Random(0)
    plain = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    for _ in range(20):
        ids = [rng.choice(plain) for _ in range(40)]
        assert grow(spm, ids)[0].text == spm.decode(ids)
