"""The server on the tailor policy: concurrent streams equal the offline engine, both tiers end with every page
free, and /get_server_info reports the host tier."""

from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import start_uvicorn

from tailorkv.api.server import create_app
from tailorkv.engine.async_engine import AsyncEngine
from tailorkv.engine.engine import Engine
from tailorkv.essays import load_essays

GREEDY = {"max_new_tokens": 8, "temperature": 0}


def test_tailor_server_streams_equal_offline_and_frees_both_tiers():
    engine = Engine(kv_policy="tailor", progress=False, kv_cache_gib=0.25, host_kv_gib=0.5)
    text = load_essays()
    prompts = [
        text[i * 900 : (i + 1) * 900] + "\nIn one sentence, the author says" for i in range(6)
    ]
    expected = [o["text"] for o in engine.generate(prompts, sampling_params=GREEDY)]
    async_engine = AsyncEngine(engine)
    url, stop = start_uvicorn(create_app(async_engine))
    try:
        start = httpx.get(f"{url}/get_server_info").json()["memory"]
        assert set(start) == {"gpu", "host"} and start["host"]["total_pages"] > 0

        def ask(prompt: str) -> str:
            r = httpx.post(
                f"{url}/generate", json={"text": prompt, "sampling_params": GREEDY}, timeout=300
            )
            return r.json()["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(ask, prompts)) == expected
        assert httpx.get(f"{url}/get_server_info").json()["memory"] == start
    finally:
        stop()
        async_engine.shutdown()
