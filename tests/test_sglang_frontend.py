"""The SGLang frontend language (sglang installed --no-deps, a test-only dependency) against the live server
through its RuntimeEndpoint backend: select() from the server's prompt logprobs, gen() with a stop string, and
the frontend's cache helpers (max_new_tokens 0, /flush_cache). It runs in a subprocess: importing sglang patches
transformers and redirects caches process-wide."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="sglang (the frontend) is not installed"
)

PROGRAM = """
import json, sys
import sglang as sgl

backend = sgl.RuntimeEndpoint(sys.argv[1])


@sgl.function
def capital(s, country):
    s += f"Q: What is the capital of {country}?\\nA: The capital is"
    s += sgl.select("city", choices=[" Paris", " a banana", " Tuesday"])


@sgl.function
def story(s):
    s += "Once upon a time, in a small village,"
    s += sgl.gen("more", max_tokens=12, temperature=0, stop=".")


city = capital.run(country="France", backend=backend)["city"]
backend.flush_cache()  # gen computes its prompt from scratch, as the test's own request does
more = story.run(backend=backend)["more"]
backend.cache_prefix("A long shared system prompt for every request.")
name = backend.get_server_info()["served_model_name"]
print(json.dumps({"city": city, "more": more, "name": name}))
"""


def test_gen_and_select_through_the_sglang_frontend(live_server):
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM, live_server.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["city"] == " Paris" and out["name"] == "smollm2"
    httpx.post(f"{live_server.url}/flush_cache", timeout=60)
    expected = httpx.post(
        f"{live_server.url}/generate",
        json={
            "text": "Once upon a time, in a small village,",
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "stop": "."},
        },
        timeout=120,
    ).json()["text"]
    assert out["more"] == expected and "." not in expected and len(expected) > 5
