"""The offline Engine: batching and chunked prefill exact, seeded sampling (on dummy:tiny), sampling params, page
accounting and real answers on the embedded model."""

import threading
import time

import pytest
from conftest import assert_close_logprobs, forced_logprobs

from tailorkv import Engine, SamplingParams
from tailorkv.errors import InvalidRequestError

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She",
    "The theory of relativity",
    "Here is a short list of three fruits that are red:",
    "In 1969, Neil Armstrong became the first person to walk on the moon. Since then, space exploration has",
]
GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine():
    with Engine(progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def tiny():
    """Exactness needs no real text: dummy:tiny runs the same code in a fraction of the time."""
    with Engine(model="dummy:tiny", progress=False) as e:
        yield e


def test_chat_answers_paris(engine):
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    out = engine.generate(prompt, sampling_params={"max_new_tokens": 16, "temperature": 0})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}


def test_batch_equals_each_prompt_alone(tiny):
    alone = [tiny.generate(p, sampling_params=GREEDY)["output_ids"] for p in PROMPTS]
    together = tiny.generate(PROMPTS, sampling_params=GREEDY)
    assert [r["output_ids"] for r in together] == alone
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]  # the exact check: teacher-forced logprobs
    batch = tiny.forced([x[:-2] for x in ids], [x[-2:] for x in ids])
    for x, r in zip(ids, batch):
        assert_close_logprobs(r.output_logprobs, tiny.forced([x[:-2]], [x[-2:]])[0].output_logprobs)
    assert len({len(tiny.tokenize(p, None)) for p in PROMPTS}) == len(
        PROMPTS
    )  # really different lengths


def test_chunked_prefill_equals_whole_prefill(tiny):
    whole = tiny.generate(PROMPTS[3], sampling_params=GREEDY)["output_ids"]
    with Engine(model="dummy:tiny", progress=False, chunked_prefill_size=5) as small:
        assert small.generate(PROMPTS[3], sampling_params=GREEDY)["output_ids"] == whole
        # the exact check (greedy tokens of random weights hardly depend on attention)
        assert_close_logprobs(
            forced_logprobs(small, PROMPTS[3], 8), forced_logprobs(tiny, PROMPTS[3], 8)
        )


def test_pages_return_to_the_pool(engine):
    before = engine.memory.usage()
    engine.generate(PROMPTS, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert engine.memory.usage() == before
    assert not engine.memory.held and not engine.scheduler.running


def test_meta_info(engine):
    out = engine.generate(
        input_ids=[504, 3575, 282],
        sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
    )
    m = out["meta_info"]
    assert (m["prompt_tokens"], m["completion_tokens"]) == (3, 3)
    assert m["finish_reason"] == {"type": "length", "matched": None}
    assert 0 <= m["queue_time"] < m["e2e_latency"]


def test_queue_time_counts_the_wait_for_a_running_slot():
    """One running slot: the second prompt waits in the queue until the first finishes."""
    with Engine(progress=False, max_running_requests=1) as one:
        first, second = one.generate(PROMPTS[:2], sampling_params=GREEDY)
    assert first["meta_info"]["queue_time"] < 0.1 * first["meta_info"]["e2e_latency"]
    assert second["meta_info"]["queue_time"] >= 0.9 * first["meta_info"]["e2e_latency"]


def test_seed_reproduces_and_top_k_1_is_greedy(tiny):
    """Sampling is the same code whatever the weights: dummy:tiny's are enough."""
    sp = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7, "ignore_eos": True}
    a = tiny.generate(PROMPTS[1], sampling_params=sp)["output_ids"]
    assert tiny.generate(PROMPTS[1], sampling_params=sp)["output_ids"] == a
    assert tiny.generate(PROMPTS[1], sampling_params={**sp, "seed": 8})["output_ids"] != a
    greedy = tiny.generate(PROMPTS[1], sampling_params={**GREEDY, "max_new_tokens": 12})[
        "output_ids"
    ]
    assert tiny.generate(PROMPTS[1], sampling_params={**sp, "top_k": 1})["output_ids"] == greedy


def test_stop_string_and_stop_token(engine):
    full = engine.generate(PROMPTS[0], sampling_params=GREEDY)
    word = full["text"].split()[3]
    out = engine.generate(PROMPTS[0], sampling_params={**GREEDY, "stop": word})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert word not in out["text"] and full["text"].startswith(out["text"])
    tok = full["output_ids"][5]
    out = engine.generate(PROMPTS[0], sampling_params={**GREEDY, "stop_token_ids": [tok]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    assert out["output_ids"] == full["output_ids"][: full["output_ids"].index(tok)]


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": -3},
        {"temperature": -1},
        {"top_p": 1.5},
        {"top_p": 0},
        {"top_k": 0},
        {"min_p": 2},
        {"stop": 5},
        {"stop": [""]},
        {"stop_token_ids": ["a"]},
        {"bogus": 1},
        {"max_new_tokens": "8"},
    ],
)
def test_bad_sampling_params(params):
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_any(params)


def test_bad_requests(engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate("", sampling_params={"max_new_tokens": 4})
    with pytest.raises(InvalidRequestError, match="context"):
        engine.generate("hello", sampling_params={"max_new_tokens": engine.config.max_position})
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.generate(
            input_ids=[1, engine.config.vocab_size], sampling_params={"max_new_tokens": 2}
        )
    assert not engine.memory.held  # nothing half-admitted


def test_score_matches_generation_logits(engine):
    """Teacher forcing the greedy continuation gives the log-probs of those tokens, each the row's maximum."""
    ids = engine.tokenize(PROMPTS[0], None)
    cont = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 6})[
        "output_ids"
    ]
    (lp,) = engine.score([ids], [cont])
    assert len(lp) == 6 and all(x <= 0 for x in lp)
    import torch

    first = torch.log_softmax(engine.next_token_logits(ids), -1)
    assert abs(lp[0] - float(first.max())) < 1e-4 and int(first.argmax()) == cont[0]


def test_tokenizing_a_long_prompt_lets_other_threads_run(engine):
    """The server tokenizes on a worker thread while the engine thread steps: encoding must release the GIL."""
    text = "the quick brown fox jumps over the lazy dog. " * 20000  # ~200k tokens
    ids = engine.tokenizer.encode(text)

    def spin(seconds: float) -> int:
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            n += 1
        return n

    def encode_until(done: threading.Event) -> None:
        i = 0
        while not done.is_set():
            # texts that do not extend one another, so that none is tokenized from an earlier one's ids
            engine.tokenizer.encode(f"{i} {text}")
            i += 1

    alone = spin(0.5)
    done = threading.Event()
    worker = threading.Thread(target=encode_until, args=(done,))
    worker.start()
    during = spin(0.5)  # the worker encodes all along
    done.set()
    worker.join()
    assert len(ids) > 100_000 and during > 0.25 * alone  # holding the GIL leaves the spinner ~2%
