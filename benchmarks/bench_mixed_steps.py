"""Chunked prefill beside decoding users, step by step in one engine (no server): --users requests of --user-len
tokens decode while one --long-len prompt prefills; then that prompt's length alone. Rows: the users' longest
inter-token gap while the long prompt prefilled, their median gap before and after it, the long prompt's TTFT
there and alone, peak GPU memory, and each step while it prefilled (`prefill_steps`: its prompt tokens, the tokens
before them, its seconds and what the step-cost model predicted, the CUDA graphs it captured and whether its decode
rows ran eagerly for want of one, to see what a gap over the budget was made of). With --profile-at, the profiler's
start and its table (~1.3 s on the H100) are left out of the gaps and the TTFT (`profile_s` says how long they took).
On a GPU the engine warms up first, as a server does (without it the first chunk of a lone prompt compiled kernels
for ~5 s).

  python -m benchmarks.bench_mixed_steps --model dummy:llama-3.1-8b --policy tailor --users 8 --user-len 32768 \\
      --long-len 126000 --engine-args '{"tailor_preset": "longbench", "host_kv_gib": 60}' --out FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from benchmarks.bench_latency import profiled
from benchmarks.policy_spec import add_tp_argument
from tailorkv.engine.engine import Engine
from tailorkv.engine.sampling import SamplingParams
from tailorkv.engine.warm_up import warm_up

from .rows import run_info, write_rows


def run(args) -> dict:
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    options = {"tp_size": args.tp_size, **args.engine_args}
    with Engine(model=args.model, kv_policy=args.policy, progress=False, **options) as e:
        # as `tailorkv serve` starts: the first prompt's kernels compiled already
        if e.device.type == "cuda":
            warm_up(e)
        return measure(e, args, sync)


def measure(e: Engine, args, sync) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(100, 30000, (n,), generator=g).tolist()  # noqa: E731
    sp = SamplingParams(max_new_tokens=args.user_output, temperature=0, ignore_eos=True)
    users = [e.add_request(prompt(args.user_len), sp) for _ in range(args.users)]
    stamps: dict[int, list[float]] = {u.rid: [] for u in users}
    steps: list[dict] = []  # the steps that computed the long prompt
    paused = [0.0]  # the profiler's own time, left out of every stamp after it
    clock = lambda: time.perf_counter() - paused[0]  # noqa: E731
    long_added = False
    cost, graphs = e.scheduler.cost, e.runner.graphs

    def graph_counts() -> tuple[int, int]:
        return (len(graphs.shapes), graphs.eager_steps) if graphs else (0, 0)

    def step():
        fit = cost and cost.fit()
        before = graph_counts()
        t = clock()
        done = e.step()
        sync()
        now = clock()
        captured, eager = (b - a for a, b in zip(before, graph_counts()))
        for r in done:
            stamps.get(r.rid, []).append(now)
        chunks = e.step_log.chunks
        if chunks and long_added:
            flops = sum(cost.flops(*c) for c in chunks) if cost else 0.0
            steps.append(
                {
                    "new": chunks[0][0],
                    "prefix": chunks[0][1],
                    "s": now - t,
                    "predicted_s": fit and (cost.decode_s or 0.0) + fit[0] + fit[1] * flops,
                    # CUDA graphs: shapes captured in the step, its decode rows run eagerly for want of one
                    "captured": captured,
                    "eager_decode": bool(eager),
                }
            )

    while not all(len(u.output_ids) >= 2 for u in users):
        step()
    marks = [{k: len(v) for k, v in stamps.items()}]
    for _ in range(args.steps):
        step()
    marks.append({k: len(v) for k, v in stamps.items()})
    t0, long_added = clock(), True
    long = e.add_request(
        prompt(args.long_len), SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    )
    while not long.output_ids:
        if args.profile_at is not None and long.seq.num_computed >= args.profile_at:
            args.profile_at = None  # one step
            # one step under torch.profiler, to OUT's name with .prof.txt
            path = f"{os.path.splitext(args.out or 'mixed_steps')[0]}.prof.txt"
            called, ended = time.perf_counter(), []

            def timed():
                paused[0] += time.perf_counter() - called  # the profiler's start
                step()
                ended.append(time.perf_counter())

            profiled(timed, path, torch.cuda.is_available(), rows=30)
            paused[0] += time.perf_counter() - ended[0]  # its table
        else:
            step()
    ttft = clock() - t0
    marks.append({k: len(v) for k, v in stamps.items()})
    prefill_steps = list(steps)
    for _ in range(args.steps):
        step()
    marks.append({k: len(v) for k, v in stamps.items()})
    during, outside = [], []
    for rid, v in stamps.items():
        gaps = [b - a for a, b in zip(v, v[1:])]
        a, b, c, d = (m[rid] - 1 for m in marks)
        outside += gaps[a:b] + gaps[c:d]
        during += gaps[b:c]
    for r in [*users, long]:
        e.abort(r.rid)
    sync()
    t0 = clock()
    alone = e.add_request(prompt(args.long_len), SamplingParams(max_new_tokens=1, temperature=0))
    while not alone.finished:
        step()
    row = {
        "policy": args.policy,
        "model": args.model,
        "users": args.users,
        "user_len": args.user_len,
        "long_len": args.long_len,
        "engine_args": args.engine_args,
        # the engine's schedule and compile in force (their defaults differ by device)
        "overlap_schedule": e.options.overlap_schedule,
        "torch_compile": e.options.enable_torch_compile,
        "step_budget_ms": e.scheduler.cost.budget_s * 1e3 if e.scheduler.cost else 0.0,
        "itl_s_max_during_prefill": max(during) if during else None,
        "tpot_s_median": statistics.median(outside) if outside else None,
        "ttft_s": ttft,
        "ttft_alone_s": clock() - t0,
        "profile_s": paused[0],
        "prefill_steps": prefill_steps,
        "prefill_steps_alone": steps[len(prefill_steps) :],
    }
    # the chunk sizing's model at the end (decode, fixed and opening ms, TFLOP/s)
    row["step_cost"] = e.scheduler.cost and e.scheduler.cost.describe()
    row["gpu_kv_gib"] = e.memory.usage()["gpu"]["total_bytes"] / 2**30
    if torch.cuda.is_available():
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--policy", default="tailor")
    add_tp_argument(p)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--user-len", type=int, default=32768)
    p.add_argument("--long-len", type=int, default=126000)
    p.add_argument(
        "--user-output", type=int, default=4096, help="the users' answer length (at most)"
    )
    p.add_argument(
        "--steps", type=int, default=20, help="decode steps before and after the long prompt"
    )
    p.add_argument(
        "--engine-args", type=json.loads, default={}, help="Engine keyword arguments (JSON)"
    )
    p.add_argument("--out", default=None, help="JSON file the row is written to")
    p.add_argument(
        "--profile-at",
        type=int,
        default=None,
        metavar="TOKENS",
        help="profile the long prompt's first step beside the users after TOKENS of it (to OUT.prof.txt)",
    )
    args = p.parse_args(argv)
    rows = [{**run(args), **run_info("benchmarks.bench_mixed_steps", argv)}]
    print(json.dumps(rows, indent=1))
    if args.out:
        write_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    # the engine's INFO lines (its KV budget and how it came about); set here, not in main(), which tests call
    logging.basicConfig(format="%(message)s")
    logging.getLogger("tailorkv").setLevel(logging.INFO)
    main()
