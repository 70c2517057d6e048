"""Slow clients are cut loose: a connection that never completes a request header is closed after the header
timeout, and a body that stalls is answered 408, while the server keeps serving everyone else."""

from __future__ import annotations

import json
import socket
import time

import httpx
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS, start_uvicorn

from tailorkv.api.server import create_app
from tailorkv.api.slow_clients import HeaderTimeoutProtocol

GREEDY = {"max_new_tokens": GREEDY_TOKENS, "temperature": 0}


class QuickHeaders(HeaderTimeoutProtocol):
    header_timeout = 0.5


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock` (recv returns b''), failing after `limit`."""
    began = time.monotonic()
    sock.settimeout(limit)
    data = sock.recv(65536)
    while data:  # a response first (the 408), then the close
        data = sock.recv(65536)
    return time.monotonic() - began


def test_idle_and_stalled_connections_are_closed(live_server):
    app = create_app(live_server.async_engine, body_timeout=1.5)
    url, stop = start_uvicorn(app, http=QuickHeaders)
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as idle:
            assert closed_after(idle, 5) < 3
        with socket.create_connection((host, int(port))) as partial:
            partial.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # the header never ends
            assert closed_after(partial, 5) < 3
        with socket.create_connection((host, int(port))) as stalled:
            head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            stalled.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"text": "a')
            stalled.settimeout(5)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = stalled.recv(65536)
                assert chunk, reply
                reply += chunk
            reply = reply.decode()
            assert reply.startswith("HTTP/1.1 408")
            assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        # the arrival hold stops waiting for a body that stalls, long before the body timeout
        with socket.create_connection((host, int(port))) as stalled:
            head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            stalled.sendall(head + b'{"text": "a')
            arrivals = live_server.async_engine.arrivals
            began = time.monotonic()
            while not arrivals.arriving:  # its headers are in: it is arriving
                assert time.monotonic() - began < 0.5
                time.sleep(0.005)
            while arrivals.arriving:  # until it stalls for STALL_S (0.25 s)
                assert time.monotonic() - began < 1.2  # before the 1.5 s body timeout
                time.sleep(0.01)
        # a keep-alive client that sends its requests in time is served on one connection
        with httpx.Client(base_url=url, timeout=60) as c:
            prompt = GENERATE_PROMPTS[3]
            for _ in range(2):
                r = c.post("/generate", json={"text": prompt, "sampling_params": GREEDY})
                assert r.json()["text"] == live_server.expected[prompt]
                time.sleep(0.2)
    finally:
        stop()
