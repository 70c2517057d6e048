"""Online serving benchmark against a running server, in the manner of `sglang.bench_serving`.

Streams every request and measures TTFT, TPOT (per request: (latency - TTFT) / (output tokens - 1)) and ITL
(gaps between stream chunks); prints a table and appends one JSON row (with the run's machine, date, commit
and command) to --output-file.

  random:   independent requests of fixed input/output length, Poisson arrivals (--request-rate, inf: at once)
  doc-chat: --users share one long document; each user asks --turns questions in sequence, each prompt being
            the document + the user's previous turns + a new question (the long-context chat of the paper)
  mixed:    --users decode steadily (prompts of --random-input-len, answers of --random-output-len) while
            --long-prompts prompts of --long-prompt-tokens arrive --long-prompt-spacing s apart (the first once every
            user has its first token); the row's tpot/itl stats are the decoders', with itl_s_max_during_prefill
            (their longest gap overlapping a long prompt's prefill: its send to its first token),
            itl_s_median_outside_prefill and the long prompts' TTFTs (long_ttft_s)

  python -m benchmarks.bench_serving --base-url http://127.0.0.1:30000 --num-prompts 64 \\
      --random-input-len 1024 --random-output-len 128 --max-concurrency 16
  python -m benchmarks.bench_serving --dataset doc-chat --doc-tokens 32000 --users 8 --turns 4
  python -m benchmarks.bench_serving --dataset mixed --users 8 --random-input-len 32000 --random-output-len 2048 \
      --long-prompts 2 --long-prompt-tokens 126000 --long-prompt-spacing 25
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.rows import run_info

# Common English words, each about one token: filler text of a predictable length for any tokenizer.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which have had not are but "
    "were one all their there been has when who will more would time can said only new some could people "
    "these two may first then do any like other than now its over such into most years after made world "
    "state water house city river power music light story night field market early school family group "
    "small large public found under where while since between against during without before through"
).split()


@dataclass
class Job:
    prompt: str | list[int]  # text, or token ids (the generate backend with the random dataset)
    output_len: int
    user: int = 0
    turn: int = 0
    long: bool = False  # mixed: a long prompt (else a decoder)
    first_token: asyncio.Event | None = None  # set when its first token arrives


@dataclass
class Result:
    job: Job
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    ttft: float = 0.0
    queue: float | None = (
        None  # the server's meta_info queue_time: arrival to admission (generate backend)
    )
    cached: int | None = None  # meta_info cached_tokens: prompt tokens taken from the prefix cache
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    sent: float = 0.0  # time.perf_counter() when the request was sent
    stamps: list[float] = field(default_factory=list)  # time.perf_counter() of each output chunk

    @property
    def tpot(self) -> float | None:
        return (
            (self.latency - self.ttft) / (self.output_tokens - 1)
            if self.output_tokens > 1
            else None
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument(
        "--backend",
        choices=["generate", "completions"],
        default="generate",
        help="POST /generate (SGLang) or /v1/completions (OpenAI)",
    )
    p.add_argument("--model", default="default", help="model name sent to /v1/completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "doc-chat", "mixed"], default="random")
    p.add_argument("--num-prompts", type=int, default=100, help="random: number of requests")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument(
        "--random-output-len", type=int, default=128, help="also the answer length of doc-chat"
    )
    p.add_argument(
        "--doc-tokens", type=int, default=8000, help="doc-chat: length of the shared document"
    )
    p.add_argument("--users", type=int, default=4, help="doc-chat, mixed: concurrent users")
    p.add_argument("--long-prompts", type=int, default=2, help="mixed: long prompts sent")
    p.add_argument("--long-prompt-tokens", type=int, default=126000, help="mixed: their length")
    p.add_argument(
        "--long-prompt-spacing", type=float, default=25.0, help="mixed: seconds between them"
    )
    p.add_argument("--long-output-len", type=int, default=16, help="mixed: their answers' length")
    p.add_argument(
        "--turns", type=int, default=3, help="doc-chat: questions per user, asked in sequence"
    )
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests (doc-chat: users) per s"
    )
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="at most this many requests in flight"
    )
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-file", default=None, help="append the result row (JSON lines)")
    return p.parse_args(argv)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Client:
    """One streaming request at a time per call; speaks the chosen backend."""

    def __init__(self, args: argparse.Namespace, http: httpx.AsyncClient):
        self.args, self.http = args, http

    async def run(self, job: Job) -> Result:
        a, res = self.args, Result(job)
        ignore_eos = not a.disable_ignore_eos
        if a.backend == "generate":
            key = "input_ids" if isinstance(job.prompt, list) else "text"
            path, body = (
                "/generate",
                {
                    key: job.prompt,
                    "stream": True,
                    "sampling_params": {
                        "max_new_tokens": job.output_len,
                        "temperature": 0,
                        "ignore_eos": ignore_eos,
                    },
                },
            )
        else:
            path, body = (
                "/v1/completions",
                {
                    "model": a.model,
                    "prompt": job.prompt,
                    "max_tokens": job.output_len,
                    "temperature": 0,
                    "ignore_eos": ignore_eos,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
        start = last = res.sent = time.perf_counter()
        try:
            async with self.http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    res.error = (
                        f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                    )
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk, now = json.loads(line[6:]), time.perf_counter()
                    if "error" in chunk:
                        res.error = chunk["error"]["message"]
                        return res
                    if self._absorb(chunk, res):
                        if res.ttft == 0.0:
                            res.ttft = now - start
                            if job.first_token is not None:
                                job.first_token.set()
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.stamps.append(now)
        except httpx.HTTPError as e:
            res.error = f"{type(e).__name__}: {e}"
            return res
        res.latency, res.ok = time.perf_counter() - start, True
        return res

    def _absorb(self, chunk: dict, res: Result) -> bool:
        """Take a stream chunk into `res`; True when it carried generated output (a timing point)."""
        if self.args.backend == "generate":
            meta = chunk["meta_info"]
            res.text, res.prompt_tokens, res.output_tokens = (
                chunk["text"],
                meta["prompt_tokens"],
                meta["completion_tokens"],
            )
            res.queue, res.cached = meta.get("queue_time"), meta.get("cached_tokens")
            return True
        if chunk.get("usage"):
            res.prompt_tokens, res.output_tokens = (
                chunk["usage"]["prompt_tokens"],
                chunk["usage"]["completion_tokens"],
            )
        if not chunk["choices"]:
            return False
        res.text += chunk["choices"][0]["text"]
        return bool(chunk["choices"][0]["text"])


async def arrivals(rate: float, rng: random.Random):
    """Sleeps between arrivals of a Poisson process of `rate` per second (none when inf)."""
    while True:
        yield
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def bench(
    args: argparse.Namespace, http: httpx.AsyncClient, vocab_size: int
) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    client = Client(args, http)
    limit = asyncio.Semaphore(args.max_concurrency or 1 << 30)

    async def limited(job: Job) -> Result:
        async with limit:
            return await client.run(job)

    for _ in range(args.warmup_requests):
        await client.run(Job(words(rng, 16), 4))
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()

    def random_prompt(n: int) -> str | list[int]:
        if args.backend == "generate":
            return [rng.randrange(100, vocab_size) for _ in range(n)]
        return words(rng, n)

    if args.dataset == "mixed":
        decoders = [
            Job(
                random_prompt(args.random_input_len),
                args.random_output_len,
                u,
                0,
                False,
                asyncio.Event(),
            )
            for u in range(args.users)
        ]
        tasks = [asyncio.create_task(limited(job)) for job in decoders]
        for job in decoders:
            await job.first_token.wait()
        for i in range(args.long_prompts):
            if i:
                await asyncio.sleep(args.long_prompt_spacing)
            long = Job(random_prompt(args.long_prompt_tokens), args.long_output_len, i, 0, True)
            tasks.append(asyncio.create_task(limited(long)))
        results = list(await asyncio.gather(*tasks))
    elif args.dataset == "random":
        ticks = arrivals(args.request_rate, rng)
        for _ in range(args.num_prompts):
            await anext(ticks)
            prompt = random_prompt(args.random_input_len)
            tasks.append(asyncio.create_task(limited(Job(prompt, args.random_output_len))))
        results = list(await asyncio.gather(*tasks))
    else:
        document = "Read this document.\n\n" + words(rng, args.doc_tokens)

        async def user(u: int) -> list[Result]:
            history, out = "", []
            for t in range(args.turns):
                question = f"\n\nQuestion {t + 1} of user {u}: what does the text say about {rng.choice(WORDS)}?\n"
                res = await limited(
                    Job(document + history + question + "Answer:", args.random_output_len, u, t)
                )
                out.append(res)
                history += question + "Answer:" + res.text
            return out

        ticks = arrivals(args.request_rate, rng)
        for u in range(args.users):
            await anext(ticks)
            tasks.append(asyncio.create_task(user(u)))
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    return results, time.perf_counter() - start


def prefill_gaps(decoders: list[Result], long: list[Result]) -> tuple[list[float], list[float]]:
    """The decoders' inter-token gaps that overlap a long prompt's prefill (its send to its first token), and the
    others."""
    windows = [(r.sent, r.sent + r.ttft) for r in long]
    during, outside = [], []
    for r in decoders:
        for a, b in zip(r.stamps, r.stamps[1:]):
            hit = any(a < end and b > begin for begin, end in windows)
            (during if hit else outside).append(b - a)
    return during, outside


def summarize(
    args: argparse.Namespace, policy: str, results: list[Result], duration: float
) -> dict:
    ok = [r for r in results if r.ok]
    long = [r for r in ok if r.job.long]
    decoders = [r for r in ok if not r.job.long]

    def stats(name: str, values: list[float]) -> dict:
        v = sorted(values) or [float("nan")]
        return {
            f"{name}_mean": statistics.fmean(v),
            f"{name}_median": statistics.median(v),
            f"{name}_p99": v[min(len(v) - 1, int(0.99 * len(v)))],
        }

    row = {
        "backend": args.backend,
        "dataset": args.dataset,
        "policy": policy,
        "context": statistics.fmean([r.prompt_tokens for r in ok]) if ok else 0,
        "concurrency": args.max_concurrency
        or (args.users if args.dataset == "doc-chat" else args.num_prompts),
        "request_rate": args.request_rate,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_per_s": len(ok) / duration,
        "input_tok_per_s": sum(r.prompt_tokens for r in ok) / duration,
        "output_tok_per_s": sum(r.output_tokens for r in ok) / duration,
        "mean_concurrency": sum(r.latency for r in ok) / duration,
        **stats("ttft_s", [r.ttft for r in ok]),
        **stats("tpot_s", [r.tpot for r in decoders if r.tpot is not None]),
        **stats("itl_s", [x for r in decoders for x in r.itl]),
        **stats("e2e_s", [r.latency for r in ok]),
    }
    if args.dataset == "doc-chat":

        def per_turn(of):
            return [
                statistics.median(
                    [x for r in ok if r.job.turn == t and (x := of(r)) is not None]
                    or [float("nan")]
                )
                for t in range(args.turns)
            ]

        row["turn_ttft_s_median"] = per_turn(lambda r: r.ttft)
        row["turn_queue_s_median"] = per_turn(
            lambda r: r.queue
        )  # of that TTFT, the wait for admission
        row["turn_cached_tokens_median"] = per_turn(lambda r: r.cached)
    if args.dataset == "mixed":
        during, outside = prefill_gaps(decoders, long)
        row |= {
            "decoders": args.users,
            "context": statistics.fmean([r.prompt_tokens for r in decoders] or [0]),
            "long_prompt_tokens": statistics.fmean([r.prompt_tokens for r in long] or [0]),
            "long_prompt_spacing_s": args.long_prompt_spacing,
            "itl_s_max_during_prefill": max(during, default=float("nan")),
            "itl_s_median_outside_prefill": statistics.median(outside or [float("nan")]),
            "long_ttft_s": [r.ttft for r in long],
        }
    if args.request_rate == float("inf"):
        row["request_rate"] = "inf"  # JSON has no infinity
    return row


def print_table(row: dict, results: list[Result]) -> None:
    lines = [
        ("Backend / dataset", f"{row['backend']} / {row['dataset']}"),
        ("KV policy", row["policy"]),
        ("Successful requests", f"{row['completed']} / {row['requests']}"),
        ("Benchmark duration (s)", f"{row['duration_s']:.2f}"),
        ("Mean input tokens", f"{row['context']:.0f}"),
        ("Request throughput (req/s)", f"{row['request_per_s']:.2f}"),
        ("Input token throughput (tok/s)", f"{row['input_tok_per_s']:.2f}"),
        ("Output token throughput (tok/s)", f"{row['output_tok_per_s']:.2f}"),
        ("Mean concurrency", f"{row['mean_concurrency']:.2f}"),
    ]
    if "long_ttft_s" in row:
        lines += [
            ("Long prompt tokens (mean)", f"{row['long_prompt_tokens']:.0f}"),
            ("Max decoder ITL in a prefill (ms)", f"{1000 * row['itl_s_max_during_prefill']:.2f}"),
            (
                "Median decoder ITL outside (ms)",
                f"{1000 * row['itl_s_median_outside_prefill']:.2f}",
            ),
        ]
        lines += [
            (f"TTFT of long prompt {i + 1} (ms)", f"{1000 * t:.2f}")
            for i, t in enumerate(row["long_ttft_s"])
        ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        for stat in ("mean", "median", "p99"):
            lines.append(
                (f"{stat.capitalize()} {label} (ms)", f"{1000 * row[f'{name}_s_{stat}']:.2f}")
            )
    for t, (v, w) in enumerate(
        zip(row.get("turn_ttft_s_median", []), row.get("turn_queue_s_median", []))
    ):
        lines.append((f"Median TTFT of turn {t + 1} (ms)", f"{1000 * v:.2f}"))
        lines.append(("  of it queued (median, ms)", f"{1000 * w:.2f}"))
        lines.append(
            (
                "  prompt tokens from the cache (median)",
                f"{row['turn_cached_tokens_median'][t]:.0f}",
            )
        )
    width = max(len(k) for k, _ in lines) + 2
    print(
        "=" * (width + 14)
        + "\n"
        + " Serving Benchmark Result ".center(width + 14, "=")
        + "\n"
        + "=" * (width + 14)
    )
    for k, v in lines:
        print(f"{k:<{width}}{v:>14}")
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"{len(errors)} failed; first error: {errors[0]}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    info = run_info(__spec__.name, argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=args.base_url, headers=headers, timeout=None, limits=limits
        ) as http:
            vocab = (await http.get("/get_model_info")).raise_for_status().json()["vocab_size"]
            policy = (await http.get("/get_server_info")).raise_for_status().json()["kv_policy"]
            results, duration = await bench(args, http, vocab)
            return policy, results, duration

    policy, results, duration = asyncio.run(run())
    row = {**summarize(args, policy, results, duration), **info}
    print_table(row, results)
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
