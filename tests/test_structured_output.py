"""Structured output against the live server: json_schema / regex / ebnf on /generate, response_format on /v1
through the openai SDK, and the 400s for bad grammars and for tools."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS

# bounded: at most 10 characters of name (each at most a 6-character escape), so 128 tokens always reach the end
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["name", "colour", "size"],
}


def generate(url: str, body: dict, status: int = 200):
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def test_json_schema_sampled_completions_all_validate(live_server):
    params = {"json_schema": json.dumps(PERSON), "temperature": 1.0, "max_new_tokens": 128}
    outs = generate(
        live_server.url,
        {"text": ["Describe a person as JSON."] * 20, "sampling_params": params},
    )
    assert len(outs) == 20
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), PERSON)
    assert len({out["text"] for out in outs}) > 1  # sampled, not one greedy answer


def test_regex_and_ebnf(live_server):
    pattern = r"(yes|no), [0-9]{3}-[a-z]{2,4}\."
    out = generate(
        live_server.url,
        {
            "text": "Answer, then give a code:",
            "sampling_params": {"regex": pattern, "temperature": 1.0, "max_new_tokens": 32},
        },
    )
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert re.fullmatch(pattern, out["text"]), out["text"]

    ebnf = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'
    out = generate(
        live_server.url,
        {"text": "Question: is it?", "sampling_params": {"ebnf": ebnf, "max_new_tokens": 16}},
    )
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["text"] in {f"The answer is {a}." for a in ("yes", "no", "maybe")}


def test_plain_rows_beside_a_grammar_row_keep_their_greedy_tokens(live_server):
    plain = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS}
    prompts = [GENERATE_PROMPTS[3], "Pick a colour:", GENERATE_PROMPTS[5]]
    outs = generate(
        live_server.url,
        {
            "text": prompts,
            "sampling_params": [plain, {"regex": "(red|green|blue)!", "temperature": 0}, plain],
        },
    )
    assert outs[0]["text"] == live_server.expected[prompts[0]]
    assert outs[2]["text"] == live_server.expected[prompts[2]]
    assert outs[1]["text"] in {"red!", "green!", "blue!"}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"json_schema": '{"type": "nonsense"}'}, "invalid json_schema: Unsupported type"),
        ({"json_schema": "{not json"}, "invalid json_schema"),
        ({"json_schema": {"type": "object"}}, "json_schema must be a non-empty string"),
        ({"regex": "[a-"}, "invalid regex"),
        ({"ebnf": 'start ::= "a"'}, "invalid ebnf"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one of regex, ebnf"),
        ({"regex": "a" * 40000}, "at most 32768"),
    ],
)
def test_bad_grammars_are_400(live_server, params, message):
    err = generate(live_server.url, {"text": "hi", "sampling_params": params}, 400)["error"]
    assert message in err["message"]


def test_a_compile_past_the_timeout_is_400(live_server, monkeypatch):
    fields = {
        f"f{i}": {"type": "string", "pattern": f"[a-z]{{{i % 5 + 1},9}}[0-9]+"} for i in range(40)
    }
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    monkeypatch.setattr(live_server.engine.grammars, "timeout_s", 0.001)
    params = {"json_schema": json.dumps(schema)}
    err = generate(live_server.url, {"text": "hi", "sampling_params": params}, 400)["error"]
    assert "took longer than 0.001 s to compile" in err["message"]


@pytest.fixture(scope="module")
def sdk(live_server):
    import openai  # here, not at collection: 0.8 s on every worker

    return openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key="unused", timeout=120, max_retries=0
    )


def test_response_format_json_schema_and_json_object(sdk):
    chat = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=128,
        temperature=1.0,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    r = sdk.chat.completions.create(**chat)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = list(sdk.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"

    r = sdk.completions.create(
        model="smollm2",
        prompt="A JSON object:",
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_bad_response_format_and_tools_are_400(sdk):
    import openai

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="invalid json_schema"):
        sdk.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        sdk.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=4,
            response_format={"type": "json_schema"},
        )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools are not supported yet"):
        sdk.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, tools=[tool])
