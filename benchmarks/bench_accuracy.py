"""Accuracy of every KV policy on the same offline RULER-style samples, plus decode-time perplexity.

    python -m benchmarks.bench_accuracy --policies full,tailor:longbench,tailor:ruler,kivi,streaming:ruler,quest:ruler \
        --lengths 4096,8192 --samples 20 --device cuda

A policy is `name`, `name:preset` or `name:preset:option=value[:option=value]` (e.g. `tailor:longbench:key_sketch=1`);
streaming and quest take the budget of that tailor preset (equal budget).
Scores are RULER's string_match_all (fraction of references found; QA: string_match_part), averaged per task, in
percent, each row with its per-sample scores, chance (full's completions against other samples' references) and
mean per-step budget. The summary averages the cells where full is above chance (the lower end of its 95% bootstrap
interval), with a paired bootstrap 95% CI of each policy's difference to full on the same samples. Perplexity:
windows of `--ppl-window` essay tokens; the first part is the prompt, the last `--ppl-tokens` tokens are
teacher-forced one decode step at a time through the policy (so decode-time compression is what is measured).
Writes a list of rows {policy, preset, task, length, samples, score, generate_s (the cell's generate call),
engine_start_s (its engine's start), machine, date, commit, command} to --output: where an accuracy run's time goes.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Iterator

import torch
from tqdm import tqdm

from benchmarks.accuracy_stats import chance_score, summary, summary_table
from benchmarks.policy_spec import add_tp_argument, identity, label, spec_engine
from benchmarks.report import accuracy_table
from benchmarks.rows import run_info, write_rows
from benchmarks.ruler_tasks import TASKS, generate, score
from tailorkv import Engine
from tailorkv.essays import load_essays


def engine_for(spec: str, args) -> Engine:
    host = (
        {"host_on_device": True} if args.host_on_device and spec.split(":")[0] == "tailor" else {}
    )
    return spec_engine(
        spec,
        args,
        max_running_requests=args.batch,
        host_kv_gib=args.host_kv_gib,
        chunked_prefill_size=args.chunk,
        kv_cache_gib=args.kv_cache_gib,
        **host,
    )


def step_budget(engine: Engine, context: int) -> float | None:
    """Prompt tokens an S layer (tailor) or the layers (streaming, quest) attend to per decode step at `context`;
    None for full attention and kivi."""
    if engine.kv_settings and engine.policy.s_index:
        return engine.kv_settings(context)["mean_budget"]
    budget = getattr(engine.policy, "budget", None)
    return min(budget, context) if isinstance(budget, int) else None


def run_tasks(engine: Engine, spec: str, args, bar) -> Iterator[dict]:
    """A row per (length, task), as each cell finishes."""
    count = lambda text: len(engine.tokenizer.encode(text))  # noqa: E731
    for length in args.lengths:
        for task in args.tasks:
            # room for the answer: the prompt is sized so prompt + answer fits in `length`
            samples = generate(task, length - 128, args.samples, args.seed, count)
            began = time.perf_counter()
            outs = engine.generate(
                [s.prompt for s in samples],
                sampling_params=[
                    {"max_new_tokens": s.max_new_tokens, "temperature": 0} for s in samples
                ],
            )
            generate_s = time.perf_counter() - began
            texts = [o["text"] for o in outs]
            scores = [100 * score(s, t) for s, t in zip(samples, texts)]
            value = sum(scores) / 100 / len(samples)
            contexts = [count(s.prompt) for s in samples]
            budgets = [step_budget(engine, n) for n in contexts]
            bar.update(1)
            bar.set_postfix_str(f"{spec} {task}@{length}: {100 * value:.1f}")
            yield {
                **identity(spec),
                "task": task,
                "length": length,
                "seed": args.seed,
                "samples": len(samples),
                "score": round(100 * value, 2),
                "scores": scores,
                "chance": round(chance_score(samples, texts, score), 2),
                "context": sum(contexts) / len(contexts),
                "budget": None if None in budgets else sum(budgets) / len(budgets),
                "generate_s": round(generate_s, 2),
            }


def run_perplexity(engine: Engine, spec: str, args) -> dict:
    ids = engine.tokenizer.encode(load_essays()[: args.ppl_window * 6 * args.ppl_windows])
    w, t = args.ppl_window, args.ppl_tokens
    windows = [ids[i * w : (i + 1) * w] for i in range(args.ppl_windows) if len(ids) >= (i + 1) * w]
    logprobs = engine.score([x[: w - t] for x in windows], [x[w - t :] for x in windows])
    nll = -sum(sum(lp) for lp in logprobs) / sum(len(lp) for lp in logprobs)
    return {
        **identity(spec),
        "task": "ppl",
        "length": w,
        "samples": len(windows),
        "score": round(math.exp(nll), 3),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--policies", default="full,tailor:longbench,tailor:ruler,kivi,streaming:ruler,quest:ruler"
    )
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument(
        "--tasks", default=",".join(TASKS), help="comma list, or 'none' (perplexity only)"
    )
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    add_tp_argument(p)
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=64, help="max running requests")
    p.add_argument("--host-kv-gib", type=float, default=8.0)
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="GPU-tier budget (default: most of the GPU)",
    )
    p.add_argument(
        "--host-on-device",
        action="store_true",
        help="tailor: keep the host tier in GPU memory (same math, no PCIe; for accuracy runs)",
    )
    p.add_argument("--chunk", type=int, default=8192, help="chunked prefill size (tokens per step)")
    p.add_argument(
        "--ppl-windows", type=int, default=0, help="essay windows for perplexity (0 = skip)"
    )
    p.add_argument("--ppl-window", type=int, default=8192)
    p.add_argument(
        "--ppl-tokens", type=int, default=4096, help="scored tokens at the end of each window"
    )
    p.add_argument("--output", default="benchmarks/results/accuracy.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t and t != "none"]
    specs = args.policies.split(",")
    rows = []
    bar = tqdm(
        total=len(specs) * len(args.lengths) * len(args.tasks) or None, desc="accuracy", unit="cell"
    )
    for spec in specs:
        t0 = time.time()
        with engine_for(spec, args) as engine:
            start_s = round(time.time() - t0, 2)
            # written as each cell finishes: a run cut off at a time limit keeps its finished cells
            for r in run_tasks(engine, spec, args, bar):
                rows.append({**r, "engine_start_s": start_s, **info})
                write_rows(args.output, rows)
            if args.ppl_windows:
                rows.append(
                    {**run_perplexity(engine, spec, args), "engine_start_s": start_s, **info}
                )
                write_rows(args.output, rows)
        del engine  # free this policy's KV pools before the next engine allocates its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tqdm.write(f"{spec}: {time.time() - t0:.0f} s")
    bar.close()
    print("\n".join(accuracy_table(rows)))
    summaries = summary(rows, label)
    print("\n".join(summary_table(summaries)))
    write_rows(args.output, rows + [{**s, **info} for s in summaries])
    return rows


if __name__ == "__main__":
    main()
