"""The HTTP API against a real server: routes, SSE framing, errors (one JSON shape), auth, and recovery."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS, start_uvicorn

GREEDY = {"max_new_tokens": GREEDY_TOKENS, "temperature": 0}


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


def events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE response, checking the framing and the closing [DONE]."""
    out, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
        else:
            out.append(json.loads(line[len("data: ") :]))
    assert done
    return out


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err
    return err


def test_info_routes(client, live_server):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/get_model_info").json()
    assert (
        info["is_generation"] is True
        and info["max_context_length"] == 8192
        and info["vocab_size"] == 49152
    )
    server = client.get("/get_server_info").json()
    assert server["kv_policy"] == "full" and server["max_running_requests"] == 32
    assert server["enable_torch_compile"] is False
    gpu = server["memory"]["gpu"]
    assert 0 < gpu["free_pages"] <= gpu["total_pages"] and gpu["total_bytes"] > 0
    # requests of 4,000 tokens (1,000 of them answer) the pages hold whole at once: full's 16-token pages
    at = client.get("/get_server_info", params={"context": 4000, "output_len": 1000}).json()
    assert at["max_requests_at_context"] == min(32, gpu["total_pages"] // 250)
    bad = client.get("/get_server_info", params={"context": 4000, "output_len": 4000})
    assert "output_len" in assert_error(bad, 400)["message"]
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2"]


def test_generate_matches_offline(client, live_server):
    prompt = GENERATE_PROMPTS[0]
    out = client.post("/generate", json={"text": prompt, "sampling_params": GREEDY}).json()
    assert out["text"] == live_server.expected[prompt]
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= GREEDY_TOKENS
    assert (
        meta["prompt_tokens"] == len(live_server.engine.tokenizer.encode(prompt))
        and meta["cached_tokens"] == 0
    )
    assert (
        meta["finish_reason"]["type"] in ("stop", "length")
        and 0 <= meta["queue_time"] < meta["e2e_latency"]
    )


def test_generate_batch_and_input_ids(client, live_server):
    prompts = GENERATE_PROMPTS[1:3]
    outs = client.post(
        "/generate", json={"text": prompts, "sampling_params": [GREEDY, GREEDY]}
    ).json()
    assert [o["text"] for o in outs] == [live_server.expected[p] for p in prompts]
    ids = live_server.engine.tokenizer.encode(prompts[0])
    one = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert one["text"] == live_server.expected[prompts[0]]
    two = client.post("/generate", json={"input_ids": [ids, ids], "sampling_params": GREEDY}).json()
    assert [o["output_ids"] for o in two] == [one["output_ids"]] * 2


def test_generate_stream_is_cumulative(client, live_server):
    prompt = GENERATE_PROMPTS[3]
    with client.stream(
        "POST", "/generate", json={"text": prompt, "sampling_params": GREEDY, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == live_server.expected[prompt]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_and_seed(client):
    out = client.post(
        "/generate",
        json={
            "text": "Count: 1, 2, 3,",
            "sampling_params": {"max_new_tokens": GREEDY_TOKENS, "temperature": 0, "stop": [","]},
        },
    ).json()
    assert "," not in out["text"] and out["meta_info"]["finish_reason"] in (
        {"type": "stop", "matched": ","},
        {"type": "length", "matched": None},
    )
    sampled = {"max_new_tokens": 8, "temperature": 0.9, "seed": 1234}
    a, b = (
        client.post(
            "/generate", json={"text": "Once upon a time", "sampling_params": sampled}
        ).json()
        for _ in range(2)
    )
    assert a["output_ids"] == b["output_ids"]


def test_openai_completions_and_chat(client, live_server):
    prompts = GENERATE_PROMPTS[4:6]
    body = client.post(
        "/v1/completions",
        json={"model": "smollm2", "prompt": prompts, "max_tokens": GREEDY_TOKENS, "temperature": 0},
    ).json()
    assert body["object"] == "text_completion" and body["model"] == "smollm2"
    assert [c["text"] for c in body["choices"]] == [live_server.expected[p] for p in prompts]
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    messages = [{"role": "user", "content": "Name a colour and the number 0."}]
    for model in ("default", live_server.engine.config.name):
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": messages,
                "max_tokens": GREEDY_TOKENS,
                "temperature": 0,
            },
        ).json()
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"] == {
            "role": "assistant",
            "content": live_server.expected[live_server.chat_prompt(messages)],
        }
        assert chat["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_chat_stream_with_usage(client, live_server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello!"}]},
    ]
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": messages,
            "max_completion_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        chunks = events(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 0 < usage["completion_tokens"] <= 8
    whole = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}
    )
    assert whole.json()["choices"][0]["message"]["content"] == text


MALFORMED = [
    # (path, json body or raw bytes, expected status)
    ("/generate", {}, 400),  # neither text nor input_ids
    ("/generate", {"text": "a", "input_ids": [1]}, 400),
    ("/generate", {"text": 5}, 400),
    ("/generate", {"text": ["a", 3]}, 400),
    ("/generate", {"text": ""}, 400),
    ("/generate", {"text": []}, 400),
    ("/generate", {"input_ids": []}, 400),
    ("/generate", {"input_ids": [1, "2"]}, 400),
    ("/generate", {"input_ids": [1, 49152]}, 400),  # outside the vocabulary
    ("/generate", {"input_ids": [-1]}, 400),
    ("/generate", {"input_ids": [True]}, 400),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 10**9}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "8"}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -0.5}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 1.5}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"top_k": 0}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"stop": 7}}, 400),
    ("/generate", {"text": "a", "sampling_params": {"no_such_param": 1}}, 400),
    ("/generate", {"text": "a", "sampling_params": [1]}, 400),
    ("/generate", {"text": "a", "sampling_params": "greedy"}, 400),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400),  # batch and params disagree
    ("/generate", {"text": "a", "stream": "yes"}, 400),
    ("/generate", b"{not json", 400),
    ("/generate", b'{"text": "caf\xe9"}', 400),  # invalid UTF-8
    ("/generate", b"\xff\xfe\x00", 400),
    ("/generate", b"[1, 2]", 400),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404),
    ("/v1/completions", {"model": "smollm2"}, 400),  # no prompt
    ("/v1/completions", {"prompt": "a", "n": 0}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 400),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "a", "top_p": 2}, 400),
    ("/v1/completions", {"prompt": "a", "stop": {"x": 1}}, 400),
    ("/v1/completions", {"prompt": [[1, 2], [999999]]}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": 3, "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 129}, 400),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "model": "nope"},
        404,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        400,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream_options": 1},
        400,
    ),
    ("/no/such/route", {}, 404),
]


def test_malformed_requests_do_not_disturb_running_ones(client, live_server):
    prompt = GENERATE_PROMPTS[6]
    result = {}

    def long_stream():  # a request streaming while the bad ones arrive
        with (
            httpx.Client(base_url=live_server.url, timeout=120) as c,
            c.stream(
                "POST",
                "/generate",
                json={"text": prompt, "sampling_params": GREEDY, "stream": True},
            ) as r,
        ):
            result["chunks"] = events(r)

    t = threading.Thread(target=long_stream)
    t.start()
    for path, body, status in MALFORMED:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert_error(client.post(path, headers={"content-type": "application/json"}, **kw), status)
    assert_error(client.post("/generate", content=b"x" * (10 << 20)), 413)

    def chunked():
        for _ in range(10):
            yield b" " * (1 << 20)

    assert_error(client.post("/generate", content=chunked()), 413)
    assert_error(client.get("/generate"), 405)
    t.join(timeout=120)
    assert result["chunks"][-1]["text"] == live_server.expected[prompt]
    ok = client.post("/generate", json={"text": GENERATE_PROMPTS[7], "sampling_params": GREEDY})
    assert ok.status_code == 200 and ok.json()["text"] == live_server.expected[GENERATE_PROMPTS[7]]


def test_full_queue_answers_503_and_too_big_400(client, live_server, monkeypatch):
    monkeypatch.setattr(live_server.engine.scheduler, "max_queued", 0)
    busy = client.post("/generate", json={"text": "a", "sampling_params": GREEDY})
    assert assert_error(busy, 503) and busy.headers["retry-after"] == "1"
    with client.stream("POST", "/generate", json={"text": "a", "stream": True}) as r:
        assert r.status_code == 503
    monkeypatch.undo()
    # fits the 8k context but not this engine's 0.25 GiB of KV pages: can never be served, a client error that
    # names the pool too small
    too_big = client.post(
        "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 8000}}
    )
    assert "pages of its gpu pool" in assert_error(too_big, 400)["message"]
    assert (
        client.post(
            "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 2}}
        ).status_code
        == 200
    )


def test_engine_failure_fails_running_requests_and_keeps_serving(client, live_server, monkeypatch):
    start = live_server.wait_idle()["memory"]
    runner = live_server.engine.runner
    real = runner.run
    calls = []

    def broken_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run", broken_once)
    err = assert_error(client.post("/generate", json={"text": "a", "sampling_params": GREEDY}), 500)
    assert "injected fault" in err["message"] and err["type"] == "server_error"
    ok = client.post(
        "/generate", json={"text": GENERATE_PROMPTS[8], "sampling_params": GREEDY}
    ).json()
    assert ok["text"] == live_server.expected[GENERATE_PROMPTS[8]]
    assert live_server.wait_idle()["memory"] == start


def test_non_streaming_disconnect_aborts(client, live_server):
    start = live_server.wait_idle()["memory"]
    aborted = live_server.async_engine.stats.aborted_requests
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live_server.url}/generate",
            json={
                "text": "Tell me a long story.",
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
            },
            timeout=1.0,
        )
    assert live_server.wait_idle(timeout=30)["memory"] == start
    assert live_server.async_engine.stats.aborted_requests == aborted + 1


def test_metrics(client):
    client.post("/generate", json={"text": "metrics", "sampling_params": {"max_new_tokens": 3}})
    text = client.get("/metrics").text
    for name in (
        "tailorkv:prompt_tokens_total",
        "tailorkv:generation_tokens_total",
        "tailorkv:num_running_reqs",
        "tailorkv:num_queue_reqs",
        'tailorkv:kv_usage{tier="gpu"}',
        "tailorkv:time_to_first_token_seconds_count",
        "tailorkv:inter_token_latency_seconds_count",
    ):
        assert name in text, name
    generated = [
        line for line in text.splitlines() if line.startswith("tailorkv:generation_tokens_total")
    ]
    assert float(generated[0].split()[-1]) >= 3


def test_api_key(live_server):
    from tailorkv.api.server import create_app

    url, stop = start_uvicorn(create_app(live_server.async_engine, api_key="sekret"))
    try:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
        assert_error(httpx.post(f"{url}/generate", json=body), 401)
        assert_error(
            httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer wrong"}), 401
        )
        assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "sekret"}), 401)
        assert httpx.get(f"{url}/health").status_code == 200
        assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sekre"}), 401)
        good = {"Authorization": "Bearer sekret"}
        assert httpx.post(f"{url}/generate", json=body, headers=good, timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=good).status_code == 200
        # the scheme is case-insensitive (RFC 9110)
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer sekret"}).is_success
        assert httpx.head(f"{url}/health").status_code == 200
    finally:
        stop()


def test_a_chunked_body_over_the_limit_is_413_with_its_code(live_server):
    from tailorkv.api.limits import HttpLimits

    def body():  # no Content-Length: chunked, refused once what arrived goes over
        yield b'{"text": "'
        for _ in range(HttpLimits.max_body_bytes // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{live_server.url}/generate", content=body(), timeout=60)
    assert assert_error(r, 413)["code"] == "request_too_large"
