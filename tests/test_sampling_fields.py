"""SGLang's and OpenAI's sampling fields against the live server: each one works (penalties and logit bias held
against the engine's own logits) or is a 400 naming it."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from conftest import GENERATE_PROMPTS

PROMPT = GENERATE_PROMPTS[3]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


def generate(client, text=PROMPT, **params) -> dict:
    r = client.post("/generate", json={"text": text, "sampling_params": {**GREEDY, **params}})
    assert r.status_code == 200, r.text
    return r.json()


def engine_logits(live_server, ids: list[int]) -> torch.Tensor:
    """The engine's float32 logits after `ids`, computed on its own thread between steps."""
    engine = live_server.engine
    return asyncio.run(
        live_server.async_engine.between_steps(lambda: engine.next_token_logits(ids).clone())
    )


def test_penalties_follow_the_engines_logits(client, live_server):
    params = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    out = generate(client, **params)["output_ids"]
    prompt = live_server.engine.tokenizer.encode(PROMPT)
    expected = []
    for _ in range(len(out)):
        x = engine_logits(live_server, prompt + expected)
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=x.numel())
        seen = counts > 0
        seen[prompt] = True
        x = torch.where(seen, torch.where(x > 0, x / 1.3, x * 1.3), x)
        x = x - 1.5 * counts - 0.5 * (counts > 0).float()
        expected.append(int(x.argmax()))
    assert out == expected
    assert out != generate(client)["output_ids"]  # the penalties changed the answer


def test_logit_bias(client, live_server):
    assert generate(client, logit_bias={"42": 100})["output_ids"] == [42] * 6
    plain = generate(client, max_new_tokens=1)["output_ids"][0]
    x = engine_logits(live_server, live_server.engine.tokenizer.encode(PROMPT))
    x[plain] -= 100
    assert generate(client, max_new_tokens=1, logit_bias={str(plain): -100})["output_ids"] == [
        int(x.argmax())
    ]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**chat, "logit_bias": {"42": 100}})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_min_new_tokens_holds_back_eos(client):
    chat = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    short = generate(client, chat, ignore_eos=False, max_new_tokens=32)
    assert short["meta_info"]["finish_reason"]["type"] == "stop"
    n = short["meta_info"]["completion_tokens"] + 3
    longer = generate(client, chat, ignore_eos=False, max_new_tokens=32, min_new_tokens=n)
    assert longer["meta_info"]["completion_tokens"] >= n
    assert longer["output_ids"][: n - 3] == short["output_ids"]


def test_n_copies_prefill_the_prompt_once(client):
    """The n copies of a prompt wait for the first one's prefill, then take its pages from the prefix cache."""
    text = "A prompt nobody sent before, for n copies: " + " ".join(str(7 * i) for i in range(40))
    many = client.post(
        "/generate", json={"text": text, "sampling_params": {**GREEDY, "n": 3, "max_new_tokens": 2}}
    ).json()
    cached = [m["meta_info"]["cached_tokens"] for m in many]
    prompt = many[0]["meta_info"]["prompt_tokens"]
    assert cached[0] == 0 and cached[1] == cached[2] == (prompt - 1) // 16 * 16 > 0
    assert many[0]["output_ids"] == many[1]["output_ids"] == many[2]["output_ids"]  # greedy


def test_n_completions(client):
    many = client.post(
        "/generate",
        json={"text": PROMPT, "sampling_params": {**GREEDY, "temperature": 1, "seed": 5, "n": 3}},
    ).json()
    assert len(many) == 3 and len({tuple(m["output_ids"]) for m in many}) == 3
    again = client.post(
        "/generate",
        json={"text": PROMPT, "sampling_params": {**GREEDY, "temperature": 1, "seed": 5, "n": 3}},
    ).json()
    assert [m["output_ids"] for m in again] == [m["output_ids"] for m in many]
    batch = client.post(
        "/generate", json={"text": [PROMPT, "Hi"], "sampling_params": {"n": 2, "max_new_tokens": 2}}
    )
    assert len(batch.json()) == 4
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "n": 2, "best_of": 2, "max_tokens": 2}
    )
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    chat = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "n": 2,
        "stream": True,
    }
    with client.stream("POST", "/v1/chat/completions", json=chat) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(roles) == [0, 1] and sorted(finished) == [0, 1]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "n": 1, "best_of": 3})
    assert r.status_code == 400 and "best_of" in r.json()["error"]["message"]


def test_skip_special_tokens(client):
    forced = {"logit_bias": {"1": 100}, "max_new_tokens": 2}  # <|im_start|>
    assert generate(client, **forced)["text"] == ""
    assert generate(client, **forced, skip_special_tokens=False)["text"] == "<|im_start|>" * 2
    r = client.post(
        "/generate",
        json={"text": "a", "sampling_params": {"spaces_between_special_tokens": False}},
    )
    assert r.status_code == 400 and "spaces_between_special_tokens" in r.text


def test_stop_strings_regex_and_no_stop_trim(client):
    full = generate(client, max_new_tokens=12)["text"]
    word = full.split()[2]
    cut = generate(client, max_new_tokens=12, stop=[word])
    assert cut["text"] == full[: full.index(word)]
    kept = generate(client, max_new_tokens=12, stop=[word], no_stop_trim=True)
    assert kept["text"] == full[: full.index(word) + len(word)]
    pattern = r"\s" + word[:2]
    by_regex = generate(client, max_new_tokens=12, stop_regex=pattern)
    assert by_regex["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert full.startswith(by_regex["text"]) and not by_regex["text"].endswith(" ")


def test_rid_and_prefill_only(client, live_server):
    out = client.post(
        "/generate", json={"text": PROMPT, "rid": "mine", "sampling_params": {"max_new_tokens": 0}}
    ).json()
    assert out["output_ids"] == [] and out["text"] == "" and out["meta_info"]["id"] == "mine"
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["prompt_tokens"] == len(live_server.engine.tokenizer.encode(PROMPT))
    r = client.post("/generate", json={"text": ["a", "b"], "rid": ["x"]})
    assert r.status_code == 400 and "rid" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),
        ({"n": 129}, "n must"),
        ({"stop_regex": ["a"] * 17}, "stop_regex"),
        ({"stop_regex": "(unclosed"}, "stop_regex"),
        ({"stop_regex": "x" * 257}, "stop_regex"),
        ({"no_stop_trim": 1}, "no_stop_trim"),
    ],
)
def test_limits_are_a_400_naming_the_field(client, params, named):
    r = client.post("/generate", json={"text": "a", "sampling_params": params})
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


def test_v1_unknown_fields_are_a_400_naming_them(client):
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for field, value in (("tools", [{"type": "function"}]), ("suffix", "x"), ("frobnicate", 1)):
        r = client.post("/v1/chat/completions", json={**base, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    ok = {**base, "user": "u1", "parallel_tool_calls": False, "presence_penalty": 0.1}
    assert client.post("/v1/chat/completions", json=ok).status_code == 200
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "best_of": 1})
    assert r.status_code == 200  # sglang.bench_serving sends best_of 1


def test_generate_unknown_fields_are_a_400_unless_null_or_no_op(client):
    # what sglang.bench_serving sends besides the prompt
    extras = {"lora_path": None, "return_routed_experts": False, "logprob_start_len": -1}
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}, **extras}
    assert client.post("/generate", json=body).status_code == 200
    for field, value in (
        ("token_ids_logprob", [1]),
        ("image_data", "x"),
        ("return_hidden_states", True),
    ):
        r = client.post("/generate", json={**body, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
