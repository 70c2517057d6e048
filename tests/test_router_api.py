"""What routers and clients ask besides generation (SGLang's answers): model and server info with the exported
tokenizer, load, cache flush, abort, health_generate, tokenize / detokenize, /v1/models/{id}, cached tokens."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

LONG_PROMPT = "The history of the city begins with a small settlement by the river. " * 8


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


def test_model_and_server_info_name_the_model_and_its_tokenizer(client, live_server):
    for route in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
        info = client.get(route).json()
        assert info["served_model_name"] == "smollm2" and info["is_generation"] is True
        assert info["model_path"] == "SmolLM2-135M-Instruct"  # the embedded model's clean name
    server = client.get("/server_info").json()
    # the full policy's 16-token pages of the 0.25 GiB fixture
    assert server["max_total_num_tokens"] == server["memory"]["gpu"]["total_pages"] * 16 > 5000
    assert server["kv_policy"] == "full" and server["memory"]["gpu"]["total_bytes"] > 0
    assert server["host_kv_gib"] == 4.0 and server["step_budget_ms"] == 0.0  # the CPU defaults
    assert server["step_cost"] is None
    assert (
        server["tailorkv"] is None
    )  # TailorKV settings: only under the tailor policy (test_serve_tailor)
    for bad in ("0", "x", "8193", "-5"):
        r = client.get(f"/get_server_info?context={bad}")
        assert (
            r.status_code == 400
            and "context must be an integer in [1, 8192]" in r.json()["error"]["message"]
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server["tokenizer_path"])
    for text in ("Hello world  123 <|im_start|>user\nhi", " héllo\n\n  x 😀"):
        assert tok.encode(text, add_special_tokens=False) == live_server.engine.tokenizer.encode(
            text
        )
    assert tok.eos_token == "<|im_end|>"


def test_models_by_id(client):
    assert client.get("/v1/models/smollm2").json()["id"] == "smollm2"
    r = client.get("/v1/models/unknown")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_tokenize_and_detokenize(client, live_server):
    ids = live_server.engine.tokenizer.encode("Paris is lovely")
    assert client.post("/tokenize", json={"prompt": "Paris is lovely"}).json() == {
        "tokens": ids,
        "count": len(ids),
        "max_model_len": 8192,
    }
    assert client.post("/tokenize", json={"prompt": ["a b", "c"]}).json()["count"] == [2, 1]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"text": "Paris is lovely"}
    r = client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_health_generate(client):
    assert client.get("/health_generate").json() == {"status": "ok"}


def test_flush_cache_drops_unreferenced_prefix_blocks(client):
    body = {"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    client.post("/generate", json=body)
    assert client.post("/generate", json=body).json()["meta_info"]["cached_tokens"] > 0
    assert client.post("/flush_cache").json()["flushed_blocks"] > 0
    assert client.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0
    chat = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1}
    client.post("/v1/chat/completions", json=chat)
    usage = client.post("/v1/chat/completions", json=chat).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_load_and_abort_request(client, live_server):
    body = {
        "text": "Count slowly:",
        "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0},
        "stream": True,
        "rid": "slow-counter",
    }
    first, last = threading.Event(), {}

    def stream():
        with httpx.stream("POST", f"{live_server.url}/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    last.update(json.loads(line[6:]))
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    load = client.get("/get_load").json()
    assert load["load"] >= 1 and load["num_reqs"] >= 1
    assert last["meta_info"]["id"] == "slow-counter"
    assert client.post("/abort_request", json={"rid": "slow-counter"}).json() == {"aborted": 1}
    t.join(60)
    assert not t.is_alive() and last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < last["meta_info"]["completion_tokens"] < 2000
    r = client.post("/abort_request", json={})
    assert r.status_code == 400
