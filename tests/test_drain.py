"""SIGTERM drains a real `tailorkv serve` process: no new work, short requests finish, the rest end with a JSON
error or an SSE error and [DONE] within --shutdown-timeout, and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
from conftest import free_port, wait_healthy

LONG = {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True}


def test_sigterm_drains_streams_and_requests_and_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tailorkv", "serve", "--model", "dummy:tiny", "--port", str(port)]
        + ["--shutdown-timeout", "2", "--max-running-requests", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # the threads share one client: each new one loads the CA bundle (~55 ms of CPU, 16 at once here)
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32))
    try:
        wait_healthy(url, 60, server)
        results: dict[str, object] = {}

        def stream(name: str) -> None:
            body = {"text": f"Story {name}:", "sampling_params": LONG, "stream": True}
            with http.stream("POST", f"{url}/generate", json=body) as r:
                results[name] = [ln for ln in r.iter_lines() if ln.startswith("data:")]

        def plain(name: str, params: dict) -> None:
            body = {"text": f"Note {name}:", "sampling_params": params}
            r = http.post(f"{url}/generate", json=body)
            results[name] = (r.status_code, r.json())

        threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(8)]
        threads += [threading.Thread(target=plain, args=(f"p{i}", LONG)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all are decoding
        began = time.monotonic()
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = http.get(f"{url}/health", timeout=5)
        refused = http.post(f"{url}/generate", json={"text": "late"}, timeout=5)
        for t in threads:
            t.join(timeout=30)
        assert server.wait(timeout=2 + 5) == 0 and time.monotonic() - began < 2 + 5
    finally:
        http.close()
        if server.poll() is None:
            server.kill()
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
    assert refused.status_code == 503
    for i in range(8):
        events = results[f"s{i}"]
        assert events[-1] == "data: [DONE]"
        assert "error" in json.loads(events[-2][len("data:") :])
        status, body = results[f"p{i}"]
        assert status == 500 and "shutting down" in body["error"]["message"]
