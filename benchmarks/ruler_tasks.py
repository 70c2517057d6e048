"""Offline RULER-style long-context tasks (needle-in-a-haystack, variable tracking, and real-text QA: ruler_qa.py).

Prompts follow the templates of RULER (``synthetic.yaml``, ``niah.py``, ``variable_tracking.py`` as packaged in
``nvidia-long-context-eval``), re-implemented here without nltk, wonderwords or a tokenizer dependency:

  niah_single_1    noise haystack ("The grass is green. ..."), 1 word key, 1 seven-digit value
  niah_multikey_2  essay haystack, 4 word keys (3 distractor needles), 1 queried
  niah_multikey_3  haystack made only of needles with UUID keys and values, 1 queried
  niah_multivalue  essay haystack, 1 word key with 4 values, all 4 expected
  niah_multiquery  essay haystack, 4 word keys, all 4 queried at once
  vt               noise haystack, 1 chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops; all 5 names expected
  niah_essay       Paul Graham essay haystack, 1 word key, 1 seven-digit value (RULER's niah_single_2)
  qa_1, qa_2       SQuAD / HotpotQA documents, one question (ruler_qa.py); any reference answer counts

Prompts are plain text (no chat template) and end with the sample's ``answer_prefix``.
"""

from __future__ import annotations

import itertools
import random
import string
import sys
import uuid
from dataclasses import dataclass
from typing import Callable

from benchmarks.ruler_qa import DATASETS, QALayout
from tailorkv.essays import essay_words, split_sentences

TASKS = (
    "niah_single_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "niah_essay",
    "qa_1",
    "qa_2",
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_TOLERANCE = 0.02  # the size search stops once a prompt is within 2% below the target length
_ANSWER_TOKENS = {"numbers": 24, "uuids": 48}  # generation budget per expected value
_VT_HOPS, _VT_ANSWER_TOKENS = 4, 30

# task -> (haystack, key kind, value kind, number of keys, values per key, queried keys)
_NIAH = {
    "niah_single_1": ("repeat", "words", "numbers", 1, 1, 1),
    "niah_multikey_2": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
    "niah_essay": ("essay", "words", "numbers", 1, 1, 1),
}

# Word keys are "adjective-noun" pairs like RULER's (100 x 100 = 10,000 distinct keys).
_ADJECTIVES = tuple(
    """
    able angry bad big bitter black blue bold brave bright broad brown busy calm cheap clean clear clever cold cool
    crazy cute dark deep dirty dry early easy empty fair fancy fast fat fine flat fresh full funny gentle giant glad
    gold good great green happy hard heavy high hot huge kind large late lazy light little long loud lucky mad
    modern narrow neat new nice noisy odd old orange pink plain polite poor proud purple quick quiet rapid rare red
    rich rough round sad safe sharp short shy silent silly simple slow small smart soft solid sour spicy strong sweet
""".split()
)
_NOUNS = tuple(
    """
    apple arm baby ball bank bed bell bird boat book bottle box bread bridge brother cake camera car cat chair
    cheese child city clock cloud coat coffee cow cup desk dog door dream egg engine eye farm field fish flag
    flower forest friend garden gate girl glass goat hat heart hill horse house island key king lake lamp leaf
    letter lion map market milk moon mountain mouse nose ocean orange paper park pen piano pig plane plate queen
    rabbit rain river road rock room rose school sheep ship shoe sister snake song star stone street sun table
""".split()
)


@dataclass
class Sample:
    """One prompt; the model continues after ``answer_prefix`` (the prompt's last text) for ``max_new_tokens``."""

    task: str
    length: int  # target token count; count_tokens(prompt) <= length
    prompt: str
    references: list[str]
    answer_prefix: str
    max_new_tokens: int
    match: str = (
        "all"  # RULER's string_match_all (fraction of references found) or "part" (any one found)
    )


@dataclass
class _Layout:
    """A sample before its haystack is sized: ``render(n)`` builds the prompt around the first n haystack units."""

    units: Callable[
        [int], list[str]
    ]  # first n haystack units (noise blocks, distractor needles or sentences)
    max_units: int
    sep: str
    needles: list[tuple[float, str]]  # (depth in percent, text), sorted by depth
    header: str
    question: str
    answer_prefix: str
    references: list[str]
    max_new_tokens: int

    def render(self, n: int) -> str:
        """Prompt with each needle inserted between haystack units at its depth (in needle order on ties)."""
        units = self.units(n)
        parts, start = [], 0
        for depth, needle in self.needles:
            pos = round(len(units) * depth / 100)
            parts += units[start:pos]
            parts.append(needle)
            start = pos
        parts += units[start:]
        return f"{self.header}\n{self.sep.join(parts)}\n{self.question} {self.answer_prefix}"


def _random_items(kind: str, rng: random.Random, n: int) -> list[str]:
    """n random keys or values of a kind: 7-digit "numbers", "adjective-noun" "words" or "uuids" (distinct)."""
    if kind == "numbers":
        return [str(v) for v in rng.sample(range(10**6, 10**7), n)]
    if kind == "words":
        picks = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), n)
        return [f"{_ADJECTIVES[i // len(_NOUNS)]}-{_NOUNS[i % len(_NOUNS)]}" for i in picks]
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def _haystack(kind: str, rng: random.Random, key_kind: str, value_kind: str):
    """(units, max_units, separator) of a RULER haystack type: "repeat" noise, "essay" words or "needle"s."""
    if kind == "repeat":
        return (lambda n: [NOISE] * n), sys.maxsize, "\n"
    if kind == "essay":
        words = essay_words()
        return (lambda n: split_sentences(" ".join(words[:n]))), len(words), " "
    pool, pool_rng = [], random.Random(rng.getrandbits(64))

    def distractors(
        n: int,
    ) -> list[str]:  # grows one shared list, so render(n) is the same for every call order
        while len(pool) < n:
            key, value = (
                _random_items(key_kind, pool_rng, 1)[0],
                _random_items(value_kind, pool_rng, 1)[0],
            )
            pool.append(_NEEDLE.format(kind=value_kind, key=key, value=value))
        return pool[:n]

    return distractors, sys.maxsize, "\n"


def _niah(task: str, rng: random.Random, depth: float) -> _Layout:
    """A needle-in-a-haystack sample; its first queried needle sits at ``depth``, the other needles at random."""
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = _NIAH[task]
    keys = _random_items(key_kind, rng, n_keys)
    values = [_random_items(value_kind, rng, n_values) for _ in keys]
    needles = [
        _NEEDLE.format(kind=value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs
    ]
    depths = [depth] + [rng.uniform(5, 95) for _ in needles[1:]]
    references = [v for vs in values[:n_queries] for v in vs]
    queried = keys[:n_queries]
    query = queried[0] if n_queries == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    if len(references) == 1:
        one = value_kind[:-1]
        header = (
            f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {one} afterwards."
        )
        question = f"What is the special magic {one} for {query} mentioned in the provided text?"
        prefix = f"The special magic {one} for {query} mentioned in the provided text is"
    else:
        header = (
            f"Some special magic {value_kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {value_kind} afterwards."
        )
        question = f"What are all the special magic {value_kind} for {query} mentioned in the provided text?"
        prefix = f"The special magic {value_kind} for {query} mentioned in the provided text are"
    units, max_units, sep = _haystack(haystack, rng, key_kind, value_kind)
    return _Layout(
        units,
        max_units,
        sep,
        sorted(zip(depths, needles), key=lambda p: p[0]),
        header,
        question,
        prefix,
        references,
        _ANSWER_TOKENS[value_kind] * len(references),
    )


def _vt(rng: random.Random, depth: float) -> _Layout:
    """A variable-tracking sample: one chain of 5 distinct 5-letter names, its statements in order, one at ``depth``."""
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    depths = sorted([depth] + [rng.uniform(5, 95) for _ in range(_VT_HOPS)])
    return _Layout(
        lambda n: [NOISE] * n,
        sys.maxsize,
        "\n",
        list(zip(depths, chain)),
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
        f"assigned the value {value}, they are:",
        names,
        _VT_ANSWER_TOKENS,
    )


def _fit(
    layout: _Layout, length: int, count_tokens: Callable[[str], int], hint: int | None
) -> tuple[int, str]:
    """(n, prompt) with the largest haystack size n found such that ``count_tokens(prompt) <= length``.

    Secant steps on (n, tokens), then bisection; stops as soon as a fitting prompt is within ``_TOLERANCE`` below
    ``length``, otherwise returns the largest fitting n exactly. count_tokens is called O(log length) times, usually
    2-4 times with a good ``hint`` (a previous sample's n). Only measured prompts are returned. Assumes a haystack
    unit costs at least one token. Raises ValueError if the prompt without any haystack is longer than ``length``.
    """
    max_units = min(layout.max_units, length)
    best = layout.render(0)
    t0 = count_tokens(best)
    if t0 > length:
        raise ValueError(
            f"length {length} is too small: the prompt without haystack has {t0} tokens"
        )
    lo, t_lo, hi, t_hi = (
        0,
        t0,
        max_units + 1,
        None,
    )  # render(lo) fits; hi is the smallest size known not to
    n = min(hint or 16, max_units)
    for step in itertools.count():
        if n <= lo:  # no haystack available at all
            break
        prompt = layout.render(n)
        t = count_tokens(prompt)
        if t <= length:
            lo, t_lo, best = n, t, prompt
        else:
            hi, t_hi = n, t
        if hi - lo <= 1 or t_lo >= length * (1 - _TOLERANCE):
            break
        if step < 4:
            slope = (t_hi - t_lo) / (hi - lo) if t_hi is not None else (t_lo - t0) / lo
            n = lo + round((length * (1 - _TOLERANCE / 2) - t_lo) / max(slope, 1e-9))
        else:
            n = (lo + hi) // 2
        n = min(max(n, lo + 1), hi - 1)
    return lo, best


def generate(
    task: str, length: int, count: int, seed: int, count_tokens: Callable[[str], int]
) -> list[Sample]:
    """``count`` samples of ``task`` whose prompts have ``count_tokens(prompt) <= length``.

    Each prompt is normally within ~2-3% below ``length`` (less only if one haystack unit is larger than that, or the
    essay text runs out). Deterministic for (task, seed, i); different seeds give different keys and values, and a
    sample's keys do not depend on ``length``. Needle depths are evenly spread over 5%..95% across the samples (50%
    for a single sample). ``length`` covers the prompt only: leave room for ``max_new_tokens`` and any chat template.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    samples, hint = [], None
    for i in range(count):
        rng = random.Random(f"{task}/{seed}/{i}")
        depth = 50.0 if count == 1 else 5 + 90 * i / (count - 1)
        if task in DATASETS:
            layout = QALayout(task, rng)
        else:
            layout = _vt(rng, depth) if task == "vt" else _niah(task, rng, depth)
        hint, prompt = _fit(layout, length, count_tokens, hint)
        a, n = layout.answer_prefix, layout.max_new_tokens
        match = "part" if task in DATASETS else "all"
        samples.append(Sample(task, length, prompt, layout.references, a, n, match))
    return samples


def score(sample: Sample, completion: str) -> float:
    """RULER's string_match_all (the fraction of references found, case-insensitively, in ``completion``) or, for
    QA, string_match_part (1 if any is found)."""
    text = completion.lower()
    found = [ref.lower() in text for ref in sample.references]
    return float(any(found)) if sample.match == "part" else sum(found) / len(found)
