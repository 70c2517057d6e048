"""Host time per token of `Request.append` (stop checks and incremental text) over a long answer.

    python -m benchmarks.bench_detokenize --label after

The answer is `--tokens` ids of the embedded model's tokenizer from the essay text, appended one by one to a
request with a stop string that never matches (so every token is checked). Prints, for the tokens just before
each of `--at`, the mean microseconds per append; a flat row means the cost does not grow with the answer.
Rows {label, tokens, at, us_per_token, machine, date, commit, command} replace the rows of the same label in
`--output` (the other labels' rows are kept, so a before and an after row sit side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.rows import run_info, write_rows
from tailorkv.engine.request import Request
from tailorkv.engine.sampling import SamplingParams
from tailorkv.engine.tokenizer import Tokenizer
from tailorkv.essays import load_essays
from tailorkv.models.embedded import embedded_tokenizer_source
from tailorkv.scheduler.scheduler import Seq


def append_times(tok: Tokenizer, ids: list[int], stop: list[str]) -> list[float]:
    """Seconds of each `Request.append` call, in answer order."""
    params = SamplingParams(max_new_tokens=len(ids), ignore_eos=True, stop=stop)
    req = Request(0, [1], params, Seq(0, 1, len(ids)))
    times = []
    for t in ids:
        began = time.perf_counter()
        req.append(t, tok)
        times.append(time.perf_counter() - began)
    assert not req.finished or req.finish_reason["type"] == "length"
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--label", required=True, help="names the code measured, e.g. before / after")
    p.add_argument("--tokens", type=int, default=4096, help="length of the answer")
    p.add_argument("--at", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--window", type=int, default=128, help="tokens averaged before each --at")
    p.add_argument("--stop", nargs="*", default=["<|never|>"], help="stop strings checked")
    p.add_argument("--output", default="benchmarks/results/detokenize.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    tok = Tokenizer(embedded_tokenizer_source())
    ids = [t for t in tok.encode(load_essays()[: 40 * args.tokens]) if t not in tok.eos_token_ids]
    ids = ids[: args.tokens]
    times = append_times(tok, ids, args.stop)
    out = []
    print(f"{'label':>10} {'tokens':>7} {'at':>6} {'us/token':>9}")
    for at in args.at:
        window = times[max(0, at - args.window) : at]
        us = sum(window) / len(window) * 1e6
        out.append(
            {
                "label": args.label,
                "tokens": len(ids),
                "at": at,
                "us_per_token": round(us, 1),
                **info,
            }
        )
        print(f"{args.label:>10} {len(ids):>7} {at:>6} {us:>9.1f}", flush=True)
    kept = []
    if os.path.exists(args.output):
        with open(args.output) as f:
            kept = [r for r in json.load(f) if r.get("label") != args.label]
    write_rows(args.output, kept + out)
    return out


if __name__ == "__main__":
    main()
