"""A prompt that extends an earlier one is tokenized from the earlier one's ids: exactly the ids of tokenizing it
whole, for texts that end anywhere (mid-word, on spaces, digits, punctuation, other scripts, special tokens)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tailorkv.engine.prefix_tokens import LLAMA3_SPLIT, MIN_CHARS, PrefixTokenCache, word_gaps_split
from tailorkv.engine.tokenizer import Tokenizer
from tailorkv.models.embedded import embedded_tokenizer_source

PIECES = [
    "the",
    "river",
    "Straße",
    "café",
    "naïve",
    "日本語",
    "Москва",
    "it's",
    "we'll",
    "I'M",
    "2024",
    "3.14",
    "x2",
    "42nd",
    ",",
    ".",
    "!?",
    "(a)",
    "--",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "😀",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "Answer:",
    "'s",
    " ",
    "e\u0301",
]


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(["", " ", " ", " ", "\n"]) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(embedded_tokenizer_source())


def whole(tk: HFTokenizer):
    def tokenize(t: str) -> tuple[list[int], list[int]]:
        enc = tk.encode_batch([t], add_special_tokens=False)[0]
        return enc.ids, [end for _, end in enc.offsets]

    return tokenize


def check_turns(encode, reference, seed: int, turns: int = 40) -> None:
    """Chats that grow by pieces ending anywhere (also inside a word or a multi-character piece)."""
    rng = random.Random(seed)
    prompt = "Read this document.\n\n" + text(rng, MIN_CHARS // 3)
    for _ in range(turns):
        addition = text(rng, rng.randrange(1, 60))
        prompt += addition[rng.randrange(len(addition)) :]  # starts mid-piece
        assert encode(prompt) == reference(prompt)


def test_a_next_turn_is_tokenized_from_the_last(tokenizer: Tokenizer):
    assert tokenizer._prefix is not None
    reference = PrefixTokenCache(whole(tokenizer._tk), max_entries=0)
    for seed in range(6):
        check_turns(
            tokenizer.encode,
            lambda t: ([tokenizer.bos_token_id] if tokenizer.add_bos else []) + reference.encode(t),
            seed,
        )
    assert tokenizer._prefix.hits >= 200 and reference.hits == 0


def test_llama3_split_is_tokenized_from_the_last(tokenizer: Tokenizer):
    spec = json.loads(tokenizer._tk.to_str())
    tk = HFTokenizer.from_str(tokenizer._tk.to_str())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert word_gaps_split(tk) and spec["pre_tokenizer"] != json.loads(tk.to_str())["pre_tokenizer"]
    cached, reference = PrefixTokenCache(whole(tk)), PrefixTokenCache(whole(tk), max_entries=0)
    check_turns(cached.encode, reference.encode, seed=7)
    assert cached.hits >= 30


def test_tokenizers_where_gaps_may_not_split(tokenizer: Tokenizer):
    base = tokenizer._tk.to_str()
    assert word_gaps_split(tokenizer._tk)

    def changed(edit) -> HFTokenizer:
        tk = HFTokenizer.from_str(base)
        edit(tk)
        return tk

    assert not word_gaps_split(
        changed(lambda tk: setattr(tk, "pre_tokenizer", pre_tokenizers.Metaspace()))
    )
    assert not word_gaps_split(
        changed(
            lambda tk: setattr(
                tk,
                "pre_tokenizer",
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            )
        )
    )
    assert not word_gaps_split(
        changed(
            lambda tk: setattr(
                tk,
                "pre_tokenizer",
                pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
                        pre_tokenizers.ByteLevel(use_regex=False),
                    ]
                ),
            )
        )
    )
    assert not word_gaps_split(
        changed(lambda tk: setattr(tk, "normalizer", normalizers.Lowercase()))
    )
    spec = json.loads(base)
    spec["added_tokens"][1]["lstrip"] = True
    assert not word_gaps_split(HFTokenizer.from_str(json.dumps(spec)))
    spec = json.loads(base)
    spec["added_tokens"].append({**spec["added_tokens"][1], "id": 99999, "content": "two words"})
    assert not word_gaps_split(HFTokenizer.from_str(json.dumps(spec)))


def test_the_cache_forgets_the_oldest_prompts(tokenizer: Tokenizer):
    rng = random.Random(3)
    cache = PrefixTokenCache(whole(tokenizer._tk), max_entries=2)
    prompts = [text(rng, MIN_CHARS // 3) for _ in range(3)]
    for p in prompts:
        cache.encode(p)
    cache.encode(prompts[0] + " more words")
    assert cache.hits == 0  # the first prompt was forgotten
    cache.encode(prompts[2] + " more words")
    assert cache.hits == 1


def test_the_head_of_a_long_text_is_the_head_of_its_ids(tokenizer: Tokenizer):
    """encode_head (the calibration prompt) tokenizes only up to a word gap, and gives the whole text's first ids.
    The text: 16 dashes (one token), then words of one 8-character token each, so that a cut 8n characters in
    (not at a gap) would split the n-th token."""
    rng = random.Random(11)
    words = ["country", "between", "because", "through", "nothing", "several", "problem"]
    long = "-" * 16 + "Read " + " ".join(rng.choice(words) for _ in range(3000))
    ids = tokenizer.encode(long)
    assert abs(len(long) / len(ids) - 8) < 0.1
    for n in (*range(40, 60), 1000, len(ids) - 1, len(ids) + 5):
        assert tokenizer.encode_head(long, n) == ids[:n]
