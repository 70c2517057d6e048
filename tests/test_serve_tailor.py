"""The server on the tailor policy: concurrent streams equal the offline engine, both tiers end with every page
free, /get_server_info reports the host tier and the TailorKV settings in force, the start-up log those."""

import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import start_uvicorn

from tailorkv.api.server import create_app
from tailorkv.engine.async_engine import AsyncEngine
from tailorkv.engine.engine import Engine
from tailorkv.essays import load_essays
from tailorkv.kvcache.plans import budget_plan

GREEDY = {"max_new_tokens": 8, "temperature": 0}


def test_tailor_server_streams_equal_offline_and_frees_both_tiers(caplog):
    with caplog.at_level(logging.INFO, logger="tailorkv.engine"):
        engine = Engine(kv_policy="tailor", progress=False, kv_cache_gib=0.4, host_kv_gib=0.5)
    budget = budget_plan("SmolLM2-135M-Instruct")[0]  # the shipped one
    s_layers = range(1, 30)
    ks = {str(i): budget.top_k(i, 8192) for i in s_layers}
    assert (
        "TailorKV auto: Q layers [0] (shipped plan) at 2 bits; S layers: key sketch 2 bits, d_s 12, sink 64 + "
        f"recent 64 + top_k at 8192 tokens {{{', '.join(f'{i}: {k}' for i, k in ks.items())}}} (mean budget "
        f"{128 + sum(ks.values()) / 29:.0f}; shipped plan)" in caplog.messages
    )
    text = load_essays()
    prompts = [
        text[i * 900 : (i + 1) * 900] + "\nIn one sentence, the author says" for i in range(6)
    ]
    expected = [o["text"] for o in engine.generate(prompts, sampling_params=GREEDY)]
    async_engine = AsyncEngine(engine)
    url, stop = start_uvicorn(create_app(async_engine))
    try:
        info = httpx.get(f"{url}/get_server_info?context=4096").json()
        start = info["memory"]
        assert set(start) == {"gpu", "host"} and start["host"]["total_pages"] > 0
        ks = {str(i): budget.top_k(i, 4096) for i in s_layers}
        assert info["tailorkv"] == {
            "preset": "auto",
            "quant_layers": [0],
            "quant_layers_source": "shipped plan",
            "quant_bits": 2,
            "key_sketch": 2,
            "d_s": 12,
            "sink": 64,
            "recent": 64,
            "context": 4096,
            "top_k": ks,
            "mean_budget": 128 + sum(ks.values()) / 29,
            "budget_source": "shipped plan",
            "mass_target": 0.975,
        }
        assert httpx.get(f"{url}/get_server_info").json()["tailorkv"]["context"] == 8192

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
