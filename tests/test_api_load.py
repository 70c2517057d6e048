"""The server under concurrent load: many streaming clients at once, and clients that leave mid-stream."""

from __future__ import annotations

import asyncio
import json

import httpx
from conftest import CHAT_MESSAGES, GENERATE_PROMPTS, GREEDY_TOKENS

LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64)


async def stream_generate(
    client: httpx.AsyncClient, text: str, max_new_tokens: int, leave_after: int | None = None
):
    """Stream /generate; returns the final text, or None after leaving once `leave_after` chunks arrived."""
    body = {
        "text": text,
        "stream": True,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0,
            "ignore_eos": leave_after is not None,
        },
    }
    return await _stream(client, "/generate", body, leave_after, lambda chunk, acc: chunk["text"])


async def stream_chat(
    client: httpx.AsyncClient, messages: list[dict], max_tokens: int, leave_after: int | None = None
):
    body = {
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": leave_after is not None,
    }
    return await _stream(
        client,
        "/v1/chat/completions",
        body,
        leave_after,
        lambda chunk, acc: acc + chunk["choices"][0]["delta"].get("content", ""),
    )


async def _stream(client, path, body, leave_after, fold):
    text, n = "", 0
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return text
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            text, n = fold(chunk, text), n + 1
            if leave_after is not None and n >= leave_after:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


def test_32_concurrent_streams_match_offline(live_server):
    """Through the overlap schedule (the fixture's), whose steps /get_server_info counts."""
    overlapped = live_server.engine.step_log.overlapped_steps

    async def main():
        async with httpx.AsyncClient(
            base_url=live_server.url, timeout=300, limits=LIMITS
        ) as client:
            jobs = [stream_generate(client, p, GREEDY_TOKENS) for p in GENERATE_PROMPTS]
            jobs += [stream_chat(client, m, GREEDY_TOKENS) for m in CHAT_MESSAGES]
            return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    want = [live_server.expected[p] for p in GENERATE_PROMPTS]
    want += [live_server.expected[live_server.chat_prompt(m)] for m in CHAT_MESSAGES]
    assert len(got) == 32
    assert got == want
    info = httpx.get(f"{live_server.url}/get_server_info").json()
    assert info["overlap_schedule"] and info["overlapped_steps"] >= overlapped + GREEDY_TOKENS // 2


def test_96_requests_24_cancelled_return_every_page(live_server):
    """Three times the server's 32 running slots: requests wait, run and leave while others are queued."""
    start = live_server.wait_idle()
    aborted = live_server.async_engine.stats.aborted_requests

    async def main():
        async with httpx.AsyncClient(
            base_url=live_server.url, timeout=300, limits=LIMITS
        ) as client:
            jobs = []
            for i in range(96):
                leave = 1 if i % 4 == 0 else None  # every 4th client leaves after its first chunk
                tokens = (
                    512 if leave else 4
                )  # those that leave would run long: the abort must free them
                if (i // 4) % 2:
                    jobs.append(
                        stream_generate(client, f"Request {i}: once upon a time", tokens, leave)
                    )
                else:
                    jobs.append(
                        stream_chat(
                            client, [{"role": "user", "content": f"Say hi to {i}."}], tokens, leave
                        )
                    )
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert sum(r is None for r in results) == 24
    assert all(isinstance(r, str) for i, r in enumerate(results) if i % 4)
    end = live_server.wait_idle()
    assert end["num_running_reqs"] == 0 and end["num_queued_reqs"] == 0
    assert end["memory"] == start["memory"]  # both tiers: every page back
    assert live_server.async_engine.stats.aborted_requests == aborted + 24


def test_bench_serving(live_server, tmp_path, capsys):
    from benchmarks.bench_serving import main

    out = tmp_path / "rows.jsonl"
    common = ["--base-url", live_server.url, "--output-file", str(out), "--random-output-len", "4"]
    row = main(
        common
        + [
            "--backend",
            "completions",
            "--dataset",
            "random",
            "--num-prompts",
            "6",
            "--random-input-len",
            "16",
            "--max-concurrency",
            "4",
        ]
    )
    assert row["completed"] == 6 and row["policy"] == "full" and row["context"] == 16
    assert row["output_tok_per_s"] > 0 and row["ttft_s_median"] > 0 and row["itl_s_median"] > 0
    chat = main(
        common
        + [
            "--backend",
            "generate",
            "--dataset",
            "doc-chat",
            "--doc-tokens",
            "64",
            "--users",
            "2",
            "--turns",
            "2",
            "--request-rate",
            "20",
            "--seed",
            "1",
        ]
    )
    assert chat["completed"] == 4 and len(chat["turn_ttft_s_median"]) == 2 and chat["context"] > 64
    assert all(0 <= q <= t for q, t in zip(chat["turn_queue_s_median"], chat["turn_ttft_s_median"]))
    mixed = main(
        ["--base-url", live_server.url, "--output-file", str(out), "--dataset", "mixed"]
        + ["--users", "2", "--random-input-len", "16", "--random-output-len", "24"]
        + ["--long-prompts", "2", "--long-prompt-tokens", "64", "--long-prompt-spacing", "0.05"]
    )
    assert mixed["completed"] == 4 and mixed["context"] == 16 and mixed["long_prompt_tokens"] == 64
    assert mixed["itl_s_max_during_prefill"] > 0 and mixed["tpot_s_median"] > 0
    assert len(mixed["long_ttft_s"]) == 2 and all(t > 0 for t in mixed["long_ttft_s"])
    assert "Serving Benchmark Result" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dataset"] for r in rows] == ["random", "doc-chat", "mixed"]
