"""Logprobs end to end on the live server: the raw log-softmax of the engine's own logits for output and prompt
tokens (chunk by chunk, cached prefixes included), in SGLang's meta_info and OpenAI's completions and chat
formats, streaming too."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from conftest import GENERATE_PROMPTS

PROMPT = GENERATE_PROMPTS[5]


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


def log_softmax_after(live_server, ids: list[int]) -> torch.Tensor:
    engine = live_server.engine
    logits = asyncio.run(
        live_server.async_engine.between_steps(lambda: engine.next_token_logits(ids).clone())
    )
    return torch.log_softmax(logits, -1)


def logprob_request(client, **fields) -> dict:
    body = {
        "text": PROMPT,
        "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        "return_logprob": True,
        **fields,
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_output_and_prompt_logprobs_are_the_engines_log_softmax(client, live_server):
    out = logprob_request(
        client, top_logprobs_num=3, logprob_start_len=0, return_text_in_logprobs=True
    )
    meta, prompt, tok = out["meta_info"], live_server.engine.tokenizer.encode(PROMPT), None
    tok = live_server.engine.tokenizer
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    for k, (lp, token, text) in enumerate(meta["output_token_logprobs"]):
        expected = log_softmax_after(live_server, prompt + out["output_ids"][:k])
        assert lp == pytest.approx(expected[token].item(), abs=1e-4)
        assert text == tok.decode([token], skip_special_tokens=False)
        top = meta["output_top_logprobs"][k]
        assert [t for _, t, _ in top] == expected.topk(
            3
        ).indices.tolist()  # greedy: top-1 is chosen
        assert top[0][0] == lp
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt and inputs[0][0] is None
    for j in range(1, len(prompt)):
        expected = log_softmax_after(live_server, prompt[:j])[prompt[j]].item()
        assert inputs[j][0] == pytest.approx(expected, abs=1e-4)
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"][1]) == 3


def test_prompt_logprobs_chunk_by_chunk_and_from_the_cache(client, live_server, monkeypatch):
    from tailorkv.engine import runner

    whole = logprob_request(client, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    monkeypatch.setattr(runner, "SCORE_ROWS", 3)  # a few positions' logits at a time
    monkeypatch.setattr(live_server.engine.scheduler, "chunk_tokens", 5)  # prefill in chunks
    chunked = logprob_request(client, logprob_start_len=0)["meta_info"]
    assert [t for _, t, _ in chunked["input_token_logprobs"]] == [t for _, t, _ in whole]
    assert [x for x, _, _ in chunked["input_token_logprobs"][1:]] == pytest.approx(
        [x for x, _, _ in whole[1:]], abs=1e-4
    )
    monkeypatch.undo()
    long_prompt = PROMPT + " and more words to make several blocks of the cache." * 4
    first = logprob_request(client, text=long_prompt, logprob_start_len=0)["meta_info"]
    again = logprob_request(client, text=long_prompt, logprob_start_len=0)["meta_info"]
    assert again["input_token_logprobs"] == first["input_token_logprobs"]
    start = first["prompt_tokens"] - 2
    tail = logprob_request(client, text=long_prompt, logprob_start_len=start)["meta_info"]
    assert tail["cached_tokens"] > 0  # the prefix before the scored tokens came from the cache
    # computed after cached pages rather than in one pass: the same tokens, logprobs to float rounding
    assert [t for _, t, _ in tail["input_token_logprobs"]] == [
        t for _, t, _ in first["input_token_logprobs"][start:]
    ]
    assert [x for x, _, _ in tail["input_token_logprobs"]] == pytest.approx(
        [x for x, _, _ in first["input_token_logprobs"][start:]], abs=1e-4
    )


def test_prefill_only_and_streaming(client):
    out = logprob_request(client, sampling_params={"max_new_tokens": 0}, logprob_start_len=2)[
        "meta_info"
    ]
    assert out["output_token_logprobs"] == [] and out["completion_tokens"] == 0
    assert len(out["input_token_logprobs"]) == out["prompt_tokens"] - 2
    plain = logprob_request(client)["meta_info"]
    with client.stream(
        "POST",
        "/generate",
        json={
            "text": PROMPT,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
            "return_logprob": True,
            "stream": True,
        },
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [len(c["meta_info"]["output_token_logprobs"]) for c in chunks] == [1, 2, 3, 4]
    assert chunks[-1]["meta_info"]["output_token_logprobs"] == plain["output_token_logprobs"]


def test_openai_completions_logprobs_with_echo(client, live_server):
    prompt = live_server.engine.tokenizer.encode(PROMPT)
    sg = logprob_request(client, top_logprobs_num=2, logprob_start_len=0)
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    choice = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT + sg["text"]
    assert len(lp["tokens"]) == len(prompt) + 4 and lp["token_logprobs"][0] is None
    expected = [x for x, _, _ in sg["meta_info"]["input_token_logprobs"]] + [
        x for x, _, _ in sg["meta_info"]["output_token_logprobs"]
    ]
    assert lp["token_logprobs"] == expected
    assert lp["top_logprobs"][0] is None and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    stream = client.post("/v1/completions", json={**body, "ignore_eos": True, "stream": True})
    pieces = [json.loads(x[6:]) for x in stream.text.splitlines() if x.startswith("data: {")]
    tokens = [t for p in pieces for t in p["choices"][0]["logprobs"]["tokens"]]
    assert (
        tokens == lp["tokens"]
        and "".join(p["choices"][0]["text"] for p in pieces) == (choice["text"])
    )


def test_openai_chat_logprobs(client):
    body = {
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = client.post("/v1/chat/completions", json=body).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"]
    assert "".join(c["token"] for c in content) == full["choices"][0]["message"]["content"]
    assert all(c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)
    assert all(bytes(c["bytes"]).decode() == c["token"] for c in content)
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    pieces = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    streamed = [e for p in pieces for e in (p["choices"][0]["logprobs"] or {}).get("content", [])]
    # the second request reads the prompt's cached pages: the same tokens, logprobs to float rounding
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx(
        [e["logprob"] for e in content], abs=1e-4
    )


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"text": "a", "return_logprob": True, "top_logprobs_num": 21}),
        ("/generate", {"text": "a", "return_logprob": True, "logprob_start_len": -2}),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        ),
    ],
)
def test_logprob_limits(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400 and "logprob" in r.json()["error"]["message"], r.text
