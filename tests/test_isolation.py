"""One request never harms another (issue 20, first part): sampling numbers that would overflow are greedy or
refused, bad text and seeds are 4xx before any work, and a row whose sampling raises ends alone."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS

from tailorkv import Engine
from tailorkv.config import InputLimits
from tailorkv.engine.sampling import SamplingParams
from tailorkv.errors import InvalidRequestError

GREEDY = {"max_new_tokens": GREEDY_TOKENS, "temperature": 0}


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"temperature": float("inf")}, "finite"),
        ({"temperature": float("nan")}, "finite"),
        ({"top_p": float("nan")}, "finite"),
        ({"min_p": float("inf")}, "finite"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x"] * (InputLimits().stop_strings + 1)}, "stop"),
        ({"stop": ["y" * 5000]}, "stop"),
        ({"stop": ["\ud800"]}, "Unicode"),
        ({"stop_token_ids": list(range(5000))}, "stop_token_ids"),
    ],
)
def test_bad_sampling_numbers_are_refused(params, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams.from_any(params)


def test_a_tiny_temperature_is_greedy():
    assert all(SamplingParams.from_any({"temperature": t}).greedy for t in (1e-40, 1e-45, 1e-6))
    assert not SamplingParams.from_any({"temperature": 1e-3}).greedy
    assert SamplingParams.from_any({"seed": 2**63 - 1}).seed == 2**63 - 1


@pytest.fixture(scope="module")
def tiny():
    with Engine(model="dummy:tiny", progress=False) as e:
        yield e


def test_bad_prompts_are_refused_before_tokenizing(tiny, monkeypatch):
    def never(_):
        raise AssertionError("tokenized")

    monkeypatch.setattr(tiny.tokenizer, "encode", never)
    with pytest.raises(InvalidRequestError, match="Unicode"):
        tiny.tokenize("hello \ud800", None)
    with pytest.raises(InvalidRequestError, match="characters"):
        tiny.tokenize("a" * (tiny.config.max_position * 256 + 1), None)


def test_a_row_whose_sampling_raises_ends_alone(tiny):
    prompts = ["The capital of France is", "Once upon a time", "In 1969, Neil Armstrong"]
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    want = [r["output_ids"] for r in tiny.generate(prompts, sampling_params=sp)]
    before = tiny.memory.usage()
    reqs = [tiny.add_request(tiny.tokenize(p, None), SamplingParams.from_any(sp)) for p in prompts]
    calls = []

    def fault(logits):
        calls.append(1)
        if len(calls) >= 3:  # from the third step of the middle row on
            raise RuntimeError("injected")
        return logits

    reqs[1].logits_processors.append(fault)
    while not all(r.finished for r in reqs):
        tiny.step()
    assert [reqs[0].output_ids, reqs[2].output_ids] == [want[0], want[2]]
    assert (
        reqs[1].error == "sampling failed: RuntimeError: injected" and len(reqs[1].output_ids) == 2
    )
    assert reqs[1].result()["meta_info"]["finish_reason"]["type"] == "abort"
    assert tiny.memory.usage() == before and not tiny.requests


def test_bad_requests_among_good_ones_on_a_live_server(live_server):
    """Good requests keep their tokens while bad ones arrive; each bad one is a 4xx or completes; none is a 500."""
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        prompt = GENERATE_PROMPTS[5]
        bad = [
            ({"temperature": 1e-40}, 200),
            ({"temperature": 1e-45}, 200),
            ({"top_p": 1e-30, "temperature": 0.7}, 200),
            ({"seed": 2**64, "temperature": 0.7}, 400),
            ({"stop": [f"s{i}" for i in range(100_000)]}, 400),
            ({"temperature": "Infinity"}, 400),
        ]
        for extra, status in bad:
            r = c.post(
                "/generate",
                json={"text": prompt, "sampling_params": {**GREEDY, **extra}},
            )
            assert r.status_code == status, (extra, r.text[:200])
            if status == 200 and "top_p" not in extra:  # greedy
                assert r.json()["text"] == live_server.expected[prompt]
        body = json.dumps({"text": "hi \ud800", "sampling_params": GREEDY})  # ASCII: "\\ud800"
        r = c.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]
        body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "\udfff"}]})
        r = c.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert (
            c.post("/generate", json={"text": prompt, "sampling_params": GREEDY}).json()["text"]
            == live_server.expected[prompt]
        )
    assert live_server.wait_idle()["num_running_reqs"] == 0


def test_input_limits_are_settings(tiny, monkeypatch):
    """EngineConfig.input_limits (--input-limits): a tighter limit refuses what the default takes, and the CLI
    checks the JSON before any model loads."""
    import dataclasses

    from tailorkv.cli import engine_config
    from tailorkv.cli import main as cli_main
    from tailorkv.errors import ConfigError

    params = {"max_new_tokens": 1, "stop": ["a", "b", "c"], "n": 3}
    tiny.generate("hi", sampling_params=params)  # the defaults take it
    tight = InputLimits(stop_strings=2, n=2)
    monkeypatch.setattr(tiny, "options", dataclasses.replace(tiny.options, input_limits=tight))
    with pytest.raises(InvalidRequestError, match="stop takes at most 2 strings"):
        tiny.generate("hi", sampling_params=params)
    with pytest.raises(InvalidRequestError, match=r"n must be an integer in \[1, 2\]"):
        SamplingParams.from_any({"n": 3}, tight)
    from tailorkv.cli import build_parser

    args = build_parser().parse_args(["serve", "--input-limits", '{"logit_bias": 8}'])
    assert engine_config(args).input_limits == InputLimits(logit_bias=8)
    with pytest.raises(ConfigError, match="unknown input limit"):
        engine_config(build_parser().parse_args(["serve", "--input-limits", '{"x": 1}']))
    assert cli_main(["serve", "--input-limits", "[1]"]) == 2
