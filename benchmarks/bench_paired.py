"""Policies next to a base policy on the same samples (a paired measure): windows of essay text, the first part the
prompt, the rest teacher-forced one decode step at a time through each policy, the top-N logprobs of every step kept.

    python -m benchmarks.bench_paired --base full --policies tailor,tailor::speculative_fetch=1 --samples 3 \
        --prompt-tokens 3900 --forced-tokens 48 --top 20
    python -m benchmarks.bench_paired --model dummy:llama-3.1-8b --device cuda --prompt-tokens 32768 --samples 8 \
        --base tailor --policies tailor::host_kv_dtype=fp8

Per step, between the base and each policy: top-1 agreement, top-10 overlap, KL(base || policy) over the base's
top-N (a token missing from the policy's top-N counted at its N-th logprob: an estimate from above when N is large),
|delta| of the forced token's logprob; and both perplexities of the forced tokens. Policies are benchmark specs
(policy_spec.py). Writes one row per policy {base, policy, preset, options, top1_agreement, ..., machine, date,
commit, command} to --output.
"""

from __future__ import annotations

import argparse
import gc
import math

import torch

from benchmarks.policy_spec import add_tp_argument, identity, spec_engine
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
        "ppl_base": math.exp(nll[0] / n),
        "ppl": math.exp(nll[1] / n),
        "steps": steps,
    }


def essay_windows(engine, prompt_tokens: int, forced_tokens: int, samples: int) -> list[list[int]]:
    """Up to `samples` consecutive windows of prompt_tokens + forced_tokens essay tokens."""
    w = prompt_tokens + forced_tokens
    ids = engine.tokenizer.encode(load_essays()[: w * 6 * samples])
    return [ids[i * w : (i + 1) * w] for i in range(samples) if len(ids) >= (i + 1) * w]


def measure(spec: str, args) -> tuple[list, int]:
    """forced_top_logprobs of one policy spec on the essay windows, and how many windows there were."""
    with spec_engine(
        spec,
        args,
        chunked_prefill_size=args.chunk,
        host_kv_gib=args.host_kv_gib,
        kv_cache_gib=args.kv_cache_gib,
        max_running_requests=args.samples,
    ) as engine:
        windows = essay_windows(engine, args.prompt_tokens, args.forced_tokens, args.samples)
        prompts = [x[: args.prompt_tokens] for x in windows]
        forced = [x[args.prompt_tokens :] for x in windows]
        out = forced_top_logprobs(engine, prompts, forced, args.top)
    del engine  # free this engine's pools before the next allocates its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, len(windows)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    add_tp_argument(p)
    p.add_argument("--dtype", default=None)
    p.add_argument("--base", default="full", help="the policy spec the others are paired with")
    p.add_argument("--policies", default="tailor", help="comma-separated policy specs")
    p.add_argument("--samples", type=int, default=4, help="essay windows")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--forced-tokens", type=int, default=64, help="teacher-forced decode steps")
    p.add_argument("--top", type=int, default=100, help="logprobs kept per step (KL's support)")
    p.add_argument("--chunk", type=int, default=8192, help="chunked prefill size")
    p.add_argument("--host-kv-gib", type=float, default=8.0)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--output", default="benchmarks/results/paired.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    base, samples = measure(args.base, args)
    common = {
        "base": args.base,
        "model": args.model or "embedded",
        "prompt_tokens": args.prompt_tokens,
        "forced_tokens": args.forced_tokens,
        "samples": samples,
    }
    rows = []
    print(
        f"{'policy':<40} {'top-1':>6} {'top-10':>6} {'KL':>8} {'|d lp|':>7} {'ppl':>7} (base {args.base})"
    )
    for spec in args.policies.split(","):
        m = paired(base, measure(spec, args)[0], args.top)
        rows.append({**identity(spec), **common, **{k: round(v, 5) for k, v in m.items()}, **info})
        print(
            f"{spec:<40} {m['top1_agreement']:>6.3f} {m['top10_overlap']:>6.3f} "
            f"{m[f'kl_top{args.top}']:>8.4f} {m['mean_abs_delta_logprob']:>7.3f} {m['ppl']:>7.2f} "
            f"(base ppl {m['ppl_base']:.2f}, {m['steps']} steps)",
            flush=True,
        )
        write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
