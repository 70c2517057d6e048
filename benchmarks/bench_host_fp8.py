"""The fp8 host tier next to the full-precision one on the same samples (a paired measure): windows of essay text,
the first part the prompt, the rest teacher-forced one decode step at a time through tailor with each
--host-kv-dtype, the top-N logprobs of every step kept.

    python -m benchmarks.bench_host_fp8 --model dummy:llama-3.1-8b --prompt-tokens 32768 --samples 8 --device cuda

Per step, between the "auto" (compute dtype) and the "fp8" tier: top-1 agreement, top-10 overlap, KL(auto || fp8)
over auto's top-N (a token missing from fp8's top-N counted at fp8's N-th logprob: an estimate from above when N is
large), |delta| of the forced token's logprob; and each tier's perplexity of the forced tokens. Writes one row per
measure {measure, value, samples, steps, ..., machine, date, commit, command} to --output.
"""

from __future__ import annotations

import argparse
import gc
import math

import torch

from benchmarks.policy_spec import add_tp_argument
from benchmarks.rows import run_info, write_rows
from tailorkv import Engine
from tailorkv.essays import load_essays


def forced_top_logprobs(
    engine: Engine, prompts: list[list[int]], forced: list[list[int]], top: int
) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """Per sample: (the forced tokens' logprobs, each step's top-`top` (token, logprob) pairs), decoded step by step
    through the KV policy as Engine.score does."""
    return [(r.output_logprobs, r.output_top_logprobs) for r in engine.forced(prompts, forced, top)]


def paired(base: list, other: list, top: int) -> dict:
    """The paired measures of two forced_top_logprobs results on the same samples."""
    agree = overlap = kl = delta = 0.0
    nll = [0.0, 0.0]
    steps = 0
    for (lp_a, top_a), (lp_b, top_b) in zip(base, other):
        for a, b, la, lb in zip(top_a, top_b, lp_a, lp_b):
            da, db = dict(a), dict(b)
            agree += a[0][0] == b[0][0]
            overlap += len(set(list(da)[:10]) & set(list(db)[:10])) / min(10, len(da))
            floor = min(db.values())
            kl += sum(math.exp(x) * (x - db.get(t, floor)) for t, x in da.items())
            delta += abs(la - lb)
            nll[0] -= la
            nll[1] -= lb
            steps += 1
    n = max(steps, 1)
    return {
        "top1_agreement": agree / n,
        "top10_overlap": overlap / n,
        f"kl_top{top}": kl / n,
        "mean_abs_delta_logprob": delta / n,
        "ppl_auto": math.exp(nll[0] / n),
        "ppl_fp8": math.exp(nll[1] / n),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    add_tp_argument(p)
    p.add_argument("--dtype", default=None)
    p.add_argument("--samples", type=int, default=4, help="essay windows")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--forced-tokens", type=int, default=64, help="teacher-forced decode steps")
    p.add_argument("--top", type=int, default=100, help="logprobs kept per step (KL's support)")
    p.add_argument("--top-k", type=int, default=None, help="tailor's top_k (default: the preset's)")
    p.add_argument("--tailor-preset", default=None)
    p.add_argument("--chunk", type=int, default=8192, help="chunked prefill size")
    p.add_argument("--host-kv-gib", type=float, default=8.0)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--output", default="benchmarks/results/host_fp8.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    results = {}
    for dtype in ("auto", "fp8"):
        with Engine(
            model=args.model,
            kv_policy="tailor",
            device=args.device,
            dtype=args.dtype,
            progress=False,
            host_kv_dtype=dtype,
            top_k=args.top_k,
            tailor_preset=args.tailor_preset,
            chunked_prefill_size=args.chunk,
            host_kv_gib=args.host_kv_gib,
            kv_cache_gib=args.kv_cache_gib,
            max_running_requests=args.samples,
            tp_size=args.tp_size,
        ) as engine:
            w = args.prompt_tokens + args.forced_tokens
            ids = engine.tokenizer.encode(load_essays()[: w * 6 * args.samples])
            windows = [
                ids[i * w : (i + 1) * w] for i in range(args.samples) if len(ids) >= (i + 1) * w
            ]
            prompts = [x[: args.prompt_tokens] for x in windows]
            forced = [x[args.prompt_tokens :] for x in windows]
            results[dtype] = forced_top_logprobs(engine, prompts, forced, args.top)
        del engine  # free this tier's pools before the next engine allocates its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    measures = paired(results["auto"], results["fp8"], args.top)
    common = {
        "model": args.model or "embedded",
        "prompt_tokens": args.prompt_tokens,
        "forced_tokens": args.forced_tokens,
        "samples": len(windows),
        "top_k": args.top_k,
        "preset": args.tailor_preset,
    }
    rows = [
        {"measure": k, "value": round(v, 5), **common, **info}
        for k, v in measures.items()
        if k != "steps"
    ]
    print(f"{'measure':<24} value   ({measures['steps']} paired steps)")
    for r in rows:
        print(f"{r['measure']:<24} {r['value']}")
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
