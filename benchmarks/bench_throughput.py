"""Throughput sweep: for each KV policy, start a server on the model, run bench_serving's random dataset at each
maximum concurrency, stop the server. Every row is bench_serving's (output_tok_per_s, ttft_s_median, ...) plus
`decode_tok_per_s` = concurrency / median ITL: the steady decode rate of a full batch, prefill left out. Each
point draws its own random prompts (seed = concurrency), so none hits the prefix cache of the points before it.

    python -m benchmarks.bench_throughput --model dummy:llama-3.1-8b --context 32768 --output-len 256 \\
        --policies full,tailor:longbench,tailor:longbench:key_sketch=1 --concurrency 4,8,16,32 \\
        --output benchmarks/results/throughput_32k.json

`--waves` requests per concurrency slot (num_prompts = waves * concurrency). Server flags beyond the policy go in
`--server-args` (e.g. "--gpu-memory-limit 80 --host-kv-gib 90").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import httpx

from benchmarks import bench_serving
from benchmarks.policy_spec import identity, label, parse_policy
from benchmarks.rows import run_info, write_rows
from tailorkv.cli import option_flag


def server_command(args, spec: str) -> list[str]:
    name, preset, options = parse_policy(spec)
    cmd = [
        sys.executable,
        "-m",
        "tailorkv",
        "serve",
        "--model",
        args.model,
        "--kv-policy",
        name,
        "--port",
        str(args.port),
        "--max-running-requests",
        str(max(args.concurrency)),
        "--chunked-prefill-size",
        str(args.context + 64),
    ]
    if preset:
        cmd += ["--tailor-preset", preset]
    for k, v in options.items():
        cmd += [option_flag(k), str(v)]
    return cmd + shlex.split(args.server_args)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("server did not become ready")


def sweep(args, spec: str, info: dict) -> list[dict]:
    url = f"http://127.0.0.1:{args.port}"
    log = open(
        os.path.splitext(args.output)[0] + f"_{spec.replace(':', '-').replace('=', '')}.server.log",
        "w",
    )
    proc = subprocess.Popen(server_command(args, spec), stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_ready(url, proc, args.ready_timeout)
        for c in args.concurrency:
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as tmp:
                bench_serving.main(
                    [
                        "--base-url",
                        url,
                        "--num-prompts",
                        str(c * args.waves),
                        "--random-input-len",
                        str(args.context - args.output_len),
                        "--random-output-len",
                        str(args.output_len),
                        "--max-concurrency",
                        str(c),
                        "--output-file",
                        tmp.name,
                        "--seed",
                        str(c),
                    ]
                )  # other prompts than the points before: no prefix-cache hits
                row = json.loads(tmp.read().splitlines()[-1])
            row.update(
                identity(spec),
                concurrency=c,
                context=args.context,
                decode_tok_per_s=c / row["itl_s_median"] if row["itl_s_median"] > 0 else None,
                **info,  # this sweep's command, not the bench_serving call inside it
            )
            rows.append(row)
            print(
                f"{spec} context {args.context} concurrency {c}: {row['output_tok_per_s']:.1f} output tok/s, "
                f"{row['decode_tok_per_s'] or 0:.1f} decode tok/s, TTFT median {row['ttft_s_median']:.2f} s, "
                f"{row['failed']} failed",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--policies", default="full,tailor:longbench,tailor:longbench:key_sketch=1")
    p.add_argument("--context", type=int, default=32768, help="prompt + output tokens per request")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--waves", type=int, default=1)
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--server-args", default="")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--output", default="benchmarks/results/throughput.json")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    info = run_info(__spec__.name, argv)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)  # server logs go beside it
    rows = []
    for spec in args.policies.split(","):
        rows += sweep(args, spec, info)
        write_rows(args.output, rows)
    print(
        f"{'policy':<32} {'context':>8} {'conc':>5} {'output tok/s':>12} {'decode tok/s':>12} {'TTFT med s':>10}"
    )
    for r in rows:
        print(
            f"{label(r):<32} {r['context']:>8} {r['concurrency']:>5} {r['output_tok_per_s']:>12.1f} "
            f"{r['decode_tok_per_s'] or 0:>12.1f} {r['ttft_s_median']:>10.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
