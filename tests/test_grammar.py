"""The grammar module on real vocabularies (no model): a matching text walks its grammar token by token, special
tokens are never text, and EOS is allowed only where the grammar may end."""

from __future__ import annotations

import pytest
import torch
from test_detokenizer import spm  # noqa: F401 (a small sentencepiece tokenizer with byte fallback)

from tailorkv.engine.grammar import Grammars
from tailorkv.engine.tokenizer import Tokenizer
from tailorkv.models.embedded import embedded_tokenizer_source
from tailorkv.models.weights import TokenizerSource


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer(embedded_tokenizer_source())


@pytest.fixture(scope="module")
def spm_eos(spm, tmp_path_factory) -> Tokenizer:  # noqa: F811
    """The sentencepiece tokenizer with its "</s>" (id 2) as EOS."""
    path = tmp_path_factory.mktemp("spm_eos")
    spm.save_pretrained(str(path))
    assert spm.token_str(2) == "</s>"
    return Tokenizer(TokenizerSource("hf_dir", path=str(path), eos_token_id=2))


def allowed(match, vocab_size: int) -> torch.Tensor:
    return match(torch.zeros(vocab_size)).isfinite()


@pytest.mark.parametrize("which", ["smollm", "spm_eos"])
def test_a_matching_text_walks_the_grammar(request, which):
    tok = request.getfixturevalue(which)
    # sentencepiece's first piece carries its "▁" (a space, as xgrammar reads it); digits come as byte pieces
    match = Grammars(tok, tok.vocab_size).matcher("regex", r" ?[A-Z][a-z]+, [0-9]{2} times\.")
    ids = [t for t in tok.encode("Hello, 42 times.") if t != tok.bos_token_id]
    for n, t in enumerate(ids):
        ok = allowed(match, tok.vocab_size)
        assert ok[t] and not ok[tok.eos_token_ids].any()  # EOS only at the end
        assert match.accept(t), tok.decode(ids[: n + 1])
    ok = allowed(match, tok.vocab_size)
    assert (
        ok.nonzero().flatten().tolist() == tok.eos_token_ids
    )  # a finite grammar: only EOS is left
    assert not match.terminated and match.accept(tok.eos_token_ids[0]) and match.terminated


def test_special_tokens_are_never_text(smollm):
    match = Grammars(smollm, smollm.vocab_size).matcher("regex", ".{0,40}")
    ok = allowed(match, smollm.vocab_size)
    special = [
        i
        for i in range(32)
        if smollm.token_str(i).startswith("<") and i not in smollm.eos_token_ids
    ]
    assert smollm.token_str(1) == "<|im_start|>" and len(special) == 16
    assert not ok[special].any() and ok[smollm.eos_token_ids].all()
    assert ok[smollm.encode("Hello")].all() and ok.sum() > 40000
