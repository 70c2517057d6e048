"""bench_accuracy's statistics: cells count where full beats chance; paired bootstrap CIs against full; the
benchmarks' policy specs."""

from benchmarks.accuracy_stats import chance_score, counted_cells, paired_difference, summary
from benchmarks.policy_spec import label, parse_policy
from benchmarks.ruler_tasks import Sample, score


def row(policy, task, scores, chance=0.0, budget=None, preset=None, seed=None, options=None):
    return {
        "policy": policy,
        "preset": preset,
        **({} if seed is None else {"seed": seed}),
        **({} if options is None else {"options": options}),
        "task": task,
        "length": 4096,
        "scores": scores,
        "score": sum(scores) / len(scores),
        "chance": chance,
        "context": 4000,
        "budget": budget,
    }


def test_chance_scores_each_completion_against_another_samples_references():
    samples = [Sample("qa_2", 9, "p", [ref], "Answer:", 4, "part") for ref in ("yes", "no", "yes")]
    # answering "yes" to everything matches the next sample's reference 2 times of 3
    assert chance_score(samples, ["yes"] * 3, score) == 100 * 2 / 3


def test_counted_cells_and_paired_interval():
    full = {
        ("easy", 4096): row("full", "easy", [100.0] * 18 + [0.0] * 2),
        ("yesno", 4096): row("full", "yesno", [100.0] * 10 + [0.0] * 10, chance=50.0),
        ("hard", 4096): row("full", "hard", [0.0] * 20),
    }
    assert counted_cells(full) == [("easy", 4096)]
    same = paired_difference(full, full, [("easy", 4096)])
    assert same == (0.0, 0.0, 0.0)  # paired: identical samples have no spread
    worse = {("easy", 4096): row("tailor", "easy", [100.0] * 14 + [0.0] * 6)}
    d, lo, hi = paired_difference(worse, full, [("easy", 4096)])
    assert d == -20.0 and lo < d < hi <= 0.0


def test_summary_averages_counted_cells_with_budget_share():
    rows = [
        row("full", "easy", [100.0] * 9 + [0.0]),
        row("full", "hard", [0.0] * 10),
        row("tailor", "easy", [100.0] * 8 + [0.0] * 2, budget=600.0, preset="auto"),
        row("tailor", "hard", [0.0] * 10, budget=600.0, preset="auto"),
    ]
    full, tailor = summary(rows, label)
    assert full["cells"] == ["easy@4096"] and full["avg"] == 90.0 and full["budget"] is None
    assert tailor["policy"] == "tailor:auto" and tailor["avg"] == 80.0 and tailor["diff"] == -10.0
    assert tailor["budget"] == 600.0 and tailor["budget_share"] == 0.15


def test_seeds_pool_and_pair_against_another_base():
    """fp8 host rows against bf16 over two seeds' samples: the cell holds both seeds' samples, paired seed by seed;
    a seed only one side ran is left out of the pairs; a row without a seed is seed 0."""
    fp8 = {"host_kv_dtype": "fp8"}
    rows = [
        row("tailor", "easy", [100.0] * 8 + [0.0] * 2, preset="ruler"),  # seed 0
        row("tailor", "easy", [100.0] * 10, preset="ruler", seed=1),
        row("tailor", "easy", [100.0] * 7 + [0.0] * 3, preset="ruler", options=fp8, seed=0),
        row("tailor", "easy", [100.0] * 9 + [0.0], preset="ruler", options=fp8, seed=1),
        row("tailor", "easy", [0.0] * 10, preset="ruler", options=fp8, seed=2),  # no bf16 seed 2
    ]
    bf16, fp8_row = summary(rows, label, base="tailor:ruler")
    assert bf16["base"] == "tailor:ruler" and bf16["diff"] == 0.0 and bf16["paired_samples"] == 20
    assert fp8_row["policy"] == "tailor:ruler:host_kv_dtype=fp8" and fp8_row["paired_samples"] == 20
    # (70 + 90) / 2 against (80 + 100) / 2
    assert fp8_row["avg"] == 80.0 and fp8_row["diff"] == -10.0
    assert fp8_row["ci"][0] < -10.0 < fp8_row["ci"][1] <= 0.0
    assert summary(rows, label) == []  # no full among the rows


def test_policy_specs_read_numbers_and_booleans_and_print_back():
    spec = "tailor:longbench:prefix_gpu_gib=0:enable_torch_compile=true:host_kv_dtype=fp8"
    assert parse_policy(spec) == (
        "tailor",
        "longbench",
        {"prefix_gpu_gib": 0, "enable_torch_compile": True, "host_kv_dtype": "fp8"},
    )
    assert parse_policy("full::enable_torch_compile=false") == (
        "full",
        None,
        {"enable_torch_compile": False},
    )
    row = {"policy": "tailor", "preset": "longbench", "options": parse_policy(spec)[2]}
    assert parse_policy(label(row)) == parse_policy(spec)
