"""Statistics of bench_accuracy's rows: which cells count (full, or another base policy, meaningfully above chance)
and each policy's average over them with a paired bootstrap confidence interval of its difference to the base on
the same samples; runs of several seeds pool (`python -m benchmarks.accuracy_stats FILES --base SPEC`).

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


def _pooled(by_seed: dict[int, dict], seeds: list[int]) -> dict:
    """One cell's rows of the given seeds as one row: their samples in seed order, the means weighted by them."""
    rows = [by_seed[s] for s in seeds]
    n = [len(r["scores"]) for r in rows]

    def mean(key):
        values = [r.get(key) for r in rows]
        return None if None in values else sum(v * k for v, k in zip(values, n)) / sum(n)

    scores = [x for r in rows for x in r["scores"]]
    return {
        "scores": scores,
        "score": _mean(scores),
        **{k: mean(k) for k in ("chance", "context", "budget")},
    }


def summary(rows: list[dict], label, base: str = "full") -> list[dict]:
    """One row per policy: its average over the counted cells (where `base` is meaningfully above chance), the
    difference to `base` with its 95% paired bootstrap CI, the mean per-step budget and its share of the context.
    Rows of several seeds (other samples) pool: a cell's samples are those of every seed, and a policy is paired
    with the base on the seeds both ran. Needs the base among the rows."""
    table: dict[str, dict[tuple, dict[int, dict]]] = {}
    for r in rows:
        if "scores" in r:
            cell = (r["task"], r["length"])
            table.setdefault(label(r), {}).setdefault(cell, {})[r.get("seed", 0)] = r
    if base not in table:
        return []
    cells = counted_cells({c: _pooled(b, sorted(b)) for c, b in table[base].items()})
    out = []
    for spec, by_cell in table.items():
        common = {c: sorted(set(by_cell.get(c, ())) & set(table[base][c])) for c in cells}
        if not cells or not all(common.values()):
            continue
        mine = {c: _pooled(by_cell[c], common[c]) for c in cells}
        theirs = {c: _pooled(table[base][c], common[c]) for c in cells}
        d, lo, hi = paired_difference(mine, theirs, cells)
        budgets = [mine[c]["budget"] for c in cells]
        ctx = _mean([mine[c]["context"] for c in cells])
        budget = _mean(budgets) if None not in budgets else None
        out.append(
            {
                "policy": spec,
                "base": base,
                "cells": [f"{t}@{n}" for t, n in cells],
                "paired_samples": sum(len(mine[c]["scores"]) for c in cells),
                "avg": round(_mean([mine[c]["score"] for c in cells]), 2),
                "diff": round(d, 2),
                "ci": [round(lo, 2), round(hi, 2)],
                "budget": budget and round(budget, 1),
                "budget_share": budget and round(budget / ctx, 4),
            }
        )
    return out


def summary_table(summaries: list[dict]) -> list[str]:
    base = summaries[0].get("base", "full") if summaries else "full"
    lines = [
        f"| policy | avg | vs {base} [95% CI] | paired samples | mean budget | of context |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        b = "" if s["budget"] is None else f"{s['budget']:.0f}"
        share = "" if s["budget_share"] is None else f"{100 * s['budget_share']:.1f}%"
        ci = f"{s['diff']:+.1f} [{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}]"
        n = s.get("paired_samples", "")
        lines.append(f"| {s['policy']} | {s['avg']:.1f} | {ci} | {n} | {b} | {share} |")
    if summaries:
        lines.append(f"\ncounted cells ({base} above chance): {', '.join(summaries[0]['cells'])}")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse
    import json

    from benchmarks.policy_spec import label

    p = argparse.ArgumentParser(
        description="The summary table of bench_accuracy result files merged (e.g. one device call per policy)."
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--base", default="full", help="the policy spec the others are paired with")
    p.add_argument("--output", default=None, help="write the summary rows here (JSON)")
    args = p.parse_args(argv)
    rows = [r for f in args.files for r in json.load(open(f)) if "scores" in r]
    summaries = summary(rows, label, args.base)
    print("\n".join(summary_table(summaries)))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summaries, f, indent=1)
    return summaries


if __name__ == "__main__":
    main()
