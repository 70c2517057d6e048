"""The unmodified openai SDK against the server's /v1 routes, with and without streaming."""

from __future__ import annotations

import pytest
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS


@pytest.fixture(scope="module")
def sdk(live_server):
    import openai  # here, not at collection: 0.8 s on every worker

    return openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key="unused", timeout=120, max_retries=0
    )


def test_models(sdk):
    assert [m.id for m in sdk.models.list()] == ["smollm2"]


def test_chat(sdk, live_server):
    messages = [{"role": "user", "content": "Name a colour and the number 1."}]
    r = sdk.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=GREEDY_TOKENS, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == live_server.expected[live_server.chat_prompt(messages)]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0

    stream = sdk.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(sdk, live_server):
    prompt = GENERATE_PROMPTS[9]
    r = sdk.completions.create(
        model="smollm2", prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, seed=1
    )
    assert r.choices[0].text == live_server.expected[prompt]
    stream = sdk.completions.create(
        model="smollm2", prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_sdk_errors(sdk):
    import openai

    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="smollm2", prompt="hi", max_tokens=2, suffix="!")
    assert "suffix" in e.value.message
