"""Each KV policy's largest batch at long contexts, and its decode and output throughput there.

    python -m benchmarks.bench_throughput --model dummy:llama-3.1-8b --contexts 32768,65536,131072 \\
        --policies full,tailor:longbench --output-len 1024 \\
        --server-args "--gpu-memory-limit 80 --host-kv-gib 100" --output benchmarks/results/throughput.json

One server per policy, every one with the same flags (--server-args; a tailor spec without a preset gets the default
one written out, so its rows and command name it). A spec's options may be engine settings too, for rows side by
side in one run (`full::overlap_schedule=false`: the server gets --disable-overlap-schedule, stepping as off CUDA).
Per context, the server's estimate of the largest batch (/get_server_info's max_requests_at_context: the pages a
request of that context holds) and the size after it are probed first; where the estimate is off, or with
--start, batch sizes double until one does not fit, then bisect until the size after the largest that fits is one
that did not: every probe is a row (`fits`), the largest fitting one marked `largest`. --sizes probes given sizes
only (a 128k probe of 11 requests takes ~4 minutes: one a device call). A probe
sends B requests at once (prompt = context - output_len random tokens, answers of --output-len tokens, EOS
ignored); it fits when the server ran all B at once (its running count, polled) and retracted none. Rows add
bench_serving's (output_tok_per_s, ttft_s_median, itl_s_median, ...) and decode_tok_per_s = B / median ITL (a full
batch's decode rate, prefill left out). Draws decode tok/s against batch size, a line per policy and context, to
--plot (PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx

from benchmarks import bench_serving
from benchmarks.policy_spec import add_tp_argument, identity, label, parse_policy
from benchmarks.rows import run_info, write_rows
from tailorkv.cli import option_args
from tailorkv.kvcache.tailor_config import DEFAULT_PRESET


def pinned(spec: str) -> str:
    """The spec with tailor's default preset written out."""
    name, preset, options = parse_policy(spec)
    if name != "tailor" or preset:
        return spec
    return ":".join([name, DEFAULT_PRESET, *(f"{k}={v}" for k, v in options.items())])


def server_command(args, spec: str) -> list[str]:
    name, preset, options = parse_policy(spec)
    cmd = [sys.executable, "-m", "tailorkv", "serve", "--model", args.model, "--kv-policy", name]
    cmd += ["--port", str(args.port), "--max-running-requests", str(args.max_batch)]
    # the server's own chunk size: a whole 128k prompt a step reserved 9.9 GiB of activations on the H100
    # (2026-12-05), which cost full one of its three 128k requests
    cmd += ["--tp", str(args.tp_size)]
    if preset:
        cmd += ["--tailor-preset", preset]
    for k, v in options.items():
        cmd += option_args(k, v)
    return cmd + shlex.split(args.server_args)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    # one client: each new one loads the CA bundle (~55 ms of CPU)
    with httpx.Client(timeout=2) as http:
        while time.time() < end:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with code {proc.returncode}")
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise SystemExit("server did not become ready")


def search(fits: Callable[[int], bool], start: int, cap: int, estimate: int | None = None) -> None:
    """Probe batch sizes from `start` (doubling, at most `cap`), then bisect, until the largest that fits is
    followed by a probed size that does not (or is `cap`). With an `estimate` of the largest (the server's), that
    and the size after it are probed first: two probes when it is right."""
    lo, hi, b = 0, None, start
    if estimate:
        e = min(estimate, cap)
        if not fits(e):
            hi = e
        elif e == cap:
            return
        else:
            lo, b = e, e + 1
    while hi is None and b <= cap:
        if not fits(b):
            hi = b
            break
        lo, b = b, min(2 * b, cap) if b < cap else cap + 1
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)


def largest(rows: list[dict], exact: bool) -> dict | None:
    """The row of the largest batch that fit among one policy's probes at one context: after a search, the
    largest fitting one; of probes of given sizes (`exact`), only one whose next size was probed and did not fit."""
    ok = [r for r in rows if r["fits"]]
    if exact:
        failed = {r["batch"] for r in rows if not r["fits"]}
        ok = [r for r in ok if r["batch"] + 1 in failed]
    return max(ok, key=lambda r: r["batch"]) if ok else None


class RunningPeak:
    """Polls the server's running count in a thread: the most requests it ran at once."""

    def __init__(self, url: str):
        self.url, self.peak, self._stop = url, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self._stop.is_set():
                self.peak = max(self.peak, http.get("/get_load").json()["num_reqs"])
                time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def probe(args, url: str, spec: str, context: int, batch: int) -> dict:
    """One run of `batch` requests at once: bench_serving's row with fits, peak running and retractions."""
    retracted = httpx.get(f"{url}/get_server_info").json()["num_retracted_reqs"]
    peak = RunningPeak(url)
    try:
        row = bench_serving.main(
            [
                *("--base-url", url, "--num-prompts", str(batch), "--max-concurrency", str(batch)),
                *("--random-input-len", str(context - args.output_len)),
                *("--random-output-len", str(args.output_len), "--warmup-requests", "0"),
                *("--seed", str(context * 1000 + batch)),  # no prefix-cache hits across probes
            ]
        )
    finally:
        running = peak.stop()
    info = httpx.get(f"{url}/get_server_info").json()
    retracted = info["num_retracted_reqs"] - retracted
    ok = running == batch and retracted == 0 and row["failed"] == 0
    itl = row["itl_s_median"]
    return {
        **row,
        **identity(spec),
        "context": context,
        "batch": batch,
        "output_len": args.output_len,
        "fits": ok,
        "peak_running": running,
        "retracted": retracted,
        "decode_tok_per_s": batch / itl if ok and itl > 0 else None,
        # the chunk sizing's model after the probe (decode and fixed ms, TFLOP/s): why prefill took what it did
        "step_cost": info.get("step_cost"),
    }


def sweep(args, spec: str, info: dict, rows: list[dict]) -> None:
    """Start the policy's server, search each context's largest batch into `rows` (written to --output after each
    probe: a run cut short keeps what it measured), stop the server."""
    url = f"http://127.0.0.1:{args.port}"
    name = spec.replace(":", "-").replace("=", "")
    log = open(f"{os.path.splitext(args.output)[0]}_{name}.server.log", "w")
    proc = subprocess.Popen(server_command(args, spec), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, args.ready_timeout)
        for context in args.contexts:

            def fits(batch: int) -> bool:
                row = {**probe(args, url, spec, context, batch), **info}
                rows.append(row)
                write_rows(args.output, rows)
                print(
                    f"{spec} context {context} batch {batch}: fits {row['fits']} (ran "
                    f"{row['peak_running']} at once, {row['retracted']} retracted), "
                    f"{row['decode_tok_per_s'] or 0:.1f} decode tok/s, "
                    f"{row['output_tok_per_s']:.1f} output tok/s",
                    flush=True,
                )
                return row["fits"]

            if args.sizes:
                for b in args.sizes:
                    fits(b)
            else:
                estimate = None
                if args.start is None:  # from the pages a request of this context holds
                    estimate = httpx.get(
                        f"{url}/get_server_info",
                        params={"context": context, "output_len": args.output_len},
                    ).json()["max_requests_at_context"]
                search(fits, args.start or 1, args.max_batch, estimate)
            mine = [
                r for r in rows if r["context"] == context and label(r) == label(identity(spec))
            ]
            top = largest(mine, exact=bool(args.sizes))
            if top is not None:
                top["largest"] = True
                write_rows(args.output, rows)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def plot(rows: list[dict], path: str) -> None:
    """Decode tok/s against batch size: a line per policy and context (fitting batches only)."""
    try:
        import matplotlib
    except ImportError:  # a GPU host without it: --plot-rows draws it later
        print(
            f"no plot: matplotlib is not installed (draw it from the rows with --plot-rows {path})"
        )
        return

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if r["fits"] and r["decode_tok_per_s"]:
            lines.setdefault((label(r), r["context"]), []).append(
                (r["batch"], r["decode_tok_per_s"])
            )
    for (spec, context), points in sorted(lines.items()):
        ax.plot(*zip(*sorted(points)), marker="o", label=f"{spec}, {context // 1024}k")
    machines = {r.get("machine") for r in rows}
    where = f", {machines.pop()}" if len(machines) == 1 and None not in machines else ""
    ax.set(xlabel="batch size (requests decoding at once)", ylabel="decode tok/s")
    ax.set_title(f"Decode throughput up to each policy's largest batch{where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    add_tp_argument(p)
    p.add_argument("--policies", default="full,tailor:longbench")
    p.add_argument("--contexts", default="32768,65536,131072", help="prompt + answer tokens")
    p.add_argument("--output-len", type=int, default=1024, help="answer tokens per request")
    p.add_argument(
        "--start",
        type=int,
        default=None,
        help="the first batch size probed (default: the server's estimate of the largest, then the next size)",
    )
    p.add_argument(
        "--sizes",
        default="",
        help="probe these batch sizes only, no search (a long context's probes split over calls: the estimate "
        "in one, the size after it in the next); `largest` marks a size only beside its next size failing",
    )
    p.add_argument("--max-batch", type=int, default=64, help="the server's max running requests")
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--server-args", default="", help='e.g. "--gpu-memory-limit 80"')
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--output", default="benchmarks/results/throughput.json")
    p.add_argument("--plot", default=None, help="PNG (default: --output with .png)")
    p.add_argument(
        "--plot-rows", default=None, help="only draw the plot of rows written earlier (JSON)"
    )
    args = p.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    info = run_info(__spec__.name, argv)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)  # server logs go beside it
    if args.plot_rows:
        with open(args.plot_rows) as f:
            plot(json.load(f), args.plot or os.path.splitext(args.plot_rows)[0] + ".png")
        return []
    rows: list[dict] = []
    for spec in map(pinned, args.policies.split(",")):
        sweep(args, spec, info, rows)
    plot(rows, args.plot or os.path.splitext(args.output)[0] + ".png")
    print(
        f"{'policy':<32} {'context':>8} {'batch':>5} {'fits':>5} {'decode tok/s':>12} "
        f"{'output tok/s':>12} {'TTFT med s':>10}"
    )
    for r in rows:
        mark = " <- largest" if r.get("largest") else ""
        print(
            f"{label(r):<32} {r['context']:>8} {r['batch']:>5} {r['fits']!s:>5} "
            f"{r['decode_tok_per_s'] or 0:>12.1f} {r['output_tok_per_s']:>12.1f} "
            f"{r['ttft_s_median']:>10.2f}{mark}"
        )
    return rows


if __name__ == "__main__":
    main()
