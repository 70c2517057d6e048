"""The prefill step of a document chat's later turns, offline: rows that continue one cached document, with the
document's pages read from their GPU copies and without (`--prefix-gpu-gib 0`: over PCIe).

    python -m benchmarks.bench_prefix_prefill --model dummy:llama-3.1-8b --doc-tokens 64000 --rows 1,4,16 \\
        --output benchmarks/results/prefix_prefill.json

For each copies setting an Engine (`tailor`, whole prompts, `--gpu-memory-limit` or `--kv-cache-gib`,
`--host-kv-gib`) prefills a document of `--doc-tokens` random tokens, then, `--repeats` times for each number of
rows, that many prompts of the document and `--new-tokens` new random tokens each, in one step (one output token
each). The time is the engine's own for the step (StepLog.prefill_seconds: from the step's start to its tokens
sampled). Prints a table, writes rows {copies, copy_pages, doc_tokens, rows, new_tokens, cached_tokens, step_ms,
step_ms_all, machine, date, commit, command}.
"""

from __future__ import annotations

import argparse
import gc
import random

import torch

from benchmarks.policy_spec import add_tp_argument
from benchmarks.rows import run_info, write_rows
from tailorkv.engine.engine import Engine

GREEDY = {"max_new_tokens": 1, "temperature": 0}


def run(args, copies: float | None) -> list[dict]:
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, 30000) for _ in range(n)]

    doc, out = tokens(args.doc_tokens), []
    with Engine(
        model=args.model,
        kv_policy="tailor",
        tailor_preset="longbench",  # performance runs pin their preset
        device=args.device,
        gpu_memory_limit_gib=args.gpu_memory_limit,
        kv_cache_gib=args.kv_cache_gib,
        host_kv_gib=args.host_kv_gib,
        chunked_prefill_size=args.doc_tokens + 1024,
        prefix_gpu_gib=copies,
        tp_size=args.tp_size,
        progress=False,
    ) as e:
        e.generate(
            input_ids=[doc + tokens(args.new_tokens)], sampling_params=GREEDY
        )  # the document, cached
        spec = e.memory.specs.get("copies")
        for rows in args.rows:
            times, cached = [], []
            for _ in range(args.repeats):
                done = e.generate(
                    input_ids=[doc + tokens(args.new_tokens) for _ in range(rows)],
                    sampling_params=GREEDY,
                )
                times.append(e.step_log.prefill_seconds * 1e3)
                cached += [r["meta_info"]["cached_tokens"] for r in done]
            out.append(
                {
                    "copies": "auto" if copies is None else copies,
                    "copy_pages": spec.num_pages if spec else 0,
                    "doc_tokens": args.doc_tokens,
                    "rows": rows,
                    "new_tokens": args.new_tokens,
                    "cached_tokens": min(cached),
                    "step_ms": sorted(times)[len(times) // 2],
                    "step_ms_all": [round(t, 1) for t in times],
                }
            )
    del e
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--device", default=None)
    add_tp_argument(p)
    p.add_argument("--doc-tokens", type=int, default=64000)
    p.add_argument(
        "--new-tokens", type=int, default=70, help="per row: a chat's last answer and new question"
    )
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--copies",
        default="auto,0",
        help="--prefix-gpu-gib settings: auto (the default) and/or GiB",
    )
    p.add_argument("--gpu-memory-limit", type=float, default=80)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="default: from free GPU memory")
    p.add_argument("--host-kv-gib", type=float, default=80)
    p.add_argument("--output", default="benchmarks/results/prefix_prefill.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    rows = []
    print(f"{'copies':>6} {'pages':>6} {'rows':>5} {'cached':>7} {'step ms':>8}")
    for c in args.copies.split(","):
        for r in run(args, None if c == "auto" else float(c)):
            print(
                f"{r['copies']:>6} {r['copy_pages']:>6} {r['rows']:>5} {r['cached_tokens']:>7} {r['step_ms']:>8.1f}"
            )
            rows.append({**r, **info})
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
