"""Statistics of bench_accuracy's rows: which cells count (full meaningfully above chance) and each policy's
average over them with a paired bootstrap confidence interval of its difference to full on the same samples.

A cell is one (task, length); its rows carry per-sample `scores` (percent). Chance is full's completions scored
against another sample's references (`chance_score`): what string matching gives without the right answer.
"""

from __future__ import annotations

import random

BOOTSTRAP = 2000


def chance_score(samples, completions, score) -> float:
    """Mean score, in percent, of each completion against the next sample's references."""
    shifted = samples[1:] + samples[:1]
    return 100 * sum(score(s, c) for s, c in zip(shifted, completions)) / len(samples)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _quantiles(xs: list[float], lo: float = 0.025, hi: float = 0.975) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[int(lo * (len(xs) - 1))], xs[int(hi * (len(xs) - 1))]


def counted_cells(full: dict[tuple, dict], seed: int = 0) -> list[tuple]:
    """The cells where the lower end of full's 95% bootstrap interval is above chance."""
    rng, cells = random.Random(seed), []
    for cell, row in full.items():
        s = row["scores"]
        means = [_mean([s[rng.randrange(len(s))] for _ in s]) for _ in range(BOOTSTRAP)]
        if _quantiles(means)[0] > row["chance"]:
            cells.append(cell)
    return cells


def paired_difference(
    policy: dict[tuple, dict], full: dict[tuple, dict], cells: list[tuple], seed: int = 0
) -> tuple[float, float, float]:
    """(average over `cells` of policy - full, 95% CI low, high): each draw resamples every cell's sample indices
    once for both."""
    rng = random.Random(seed)

    def diff(idx: dict[tuple, list[int]]) -> float:
        return _mean(
            [_mean([policy[c]["scores"][i] - full[c]["scores"][i] for i in idx[c]]) for c in cells]
        )

    n = {c: len(full[c]["scores"]) for c in cells}
    point = diff({c: list(range(n[c])) for c in cells})
    draws = [
        diff({c: [rng.randrange(n[c]) for _ in range(n[c])] for c in cells})
        for _ in range(BOOTSTRAP)
    ]
    return (point, *_quantiles(draws))


def summary(rows: list[dict], label) -> list[dict]:
    """One row per policy: its average over the counted cells, the difference to full with its 95% paired bootstrap
    CI, the mean per-step budget and its share of the context. Needs a `full` policy among the rows."""
    by_policy: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        if "scores" in r:
            by_policy.setdefault(label(r), {})[(r["task"], r["length"])] = r
    full = by_policy.get("full")
    if not full:
        return []
    cells = counted_cells(full)
    out = []
    for spec, cellrows in by_policy.items():
        if not cells or not all(c in cellrows for c in cells):
            continue
        avg = _mean([cellrows[c]["score"] for c in cells])
        d, lo, hi = paired_difference(cellrows, full, cells)
        budgets = [cellrows[c].get("budget") for c in cells]
        ctx = _mean([cellrows[c]["context"] for c in cells])
        budget = _mean(budgets) if None not in budgets else None
        out.append(
            {
                "policy": spec,
                "cells": [f"{t}@{n}" for t, n in cells],
                "avg": round(avg, 2),
                "diff": round(d, 2),
                "ci": [round(lo, 2), round(hi, 2)],
                "budget": budget and round(budget, 1),
                "budget_share": budget and round(budget / ctx, 4),
            }
        )
    return out


def summary_table(summaries: list[dict]) -> list[str]:
    lines = [
        "| policy | avg | vs full [95% CI] | mean budget | of context |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        b = "" if s["budget"] is None else f"{s['budget']:.0f}"
        share = "" if s["budget_share"] is None else f"{100 * s['budget_share']:.1f}%"
        ci = f"{s['diff']:+.1f} [{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}]"
        lines.append(f"| {s['policy']} | {s['avg']:.1f} | {ci} | {b} | {share} |")
    if summaries:
        lines.append(f"\ncounted cells (full above chance): {', '.join(summaries[0]['cells'])}")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse
    import json

    from benchmarks.policy_spec import label

    p = argparse.ArgumentParser(
        description="The summary table of bench_accuracy result files merged (e.g. one device call per policy)."
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--output", default=None, help="write the summary rows here (JSON)")
    args = p.parse_args(argv)
    rows = [r for f in args.files for r in json.load(open(f)) if "scores" in r]
    summaries = summary(rows, label)
    print("\n".join(summary_table(summaries)))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summaries, f, indent=1)
    return summaries


if __name__ == "__main__":
    main()
