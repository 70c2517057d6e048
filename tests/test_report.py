"""benchmarks.report writes RESULTS.md's tables from the JSON rows (and the committed RESULTS.md is up to date);
benchmarks.rows stamps every row with the run's machine, date, commit and command."""

import datetime
import json
import subprocess

from benchmarks import report, rows

RUN = {
    "machine": "NVIDIA H200",
    "date": "2026-12-05",
    "commit": "abc1234",
    "command": "python -m benchmarks.bench_latency --contexts 131072",
}


def latency(policy: str, preset, ms: float, floor: float, **options) -> dict:
    row = {"policy": policy, "preset": preset, "context": 131072, "batch": 1}
    return row | ({"options": options} if options else {}) | {"ms_per_token": ms, "floor_ms": floor}


def accuracy(policy: str, preset, task: str, score: float) -> dict:  # an old row: no RUN fields
    return {"policy": policy, "preset": preset, "task": task, "length": 4096, "score": score}


LATENCY = [
    latency("full", None, 11.93, 11.08) | RUN,
    latency("tailor", "longbench", 14.45, 6.27, key_sketch=2) | RUN,
]
MIXED = {
    "dataset": "mixed",
    "policy": "tailor",
    "preset": "longbench",
    "decoders": 8,
    "context": 32768,
}
MIXED |= {"long_prompt_tokens": 126000, "long_prompt_spacing_s": 25.0, "tpot_s_median": 0.0261}
MIXED |= {"itl_s_median_outside_prefill": 0.0258, "itl_s_max_during_prefill": 0.21}
MIXED |= {"long_ttft_s": [12.61, 12.93]}
ACCURACY = [
    accuracy("full", None, "niah_single_1", 100.0),
    accuracy("tailor", "ruler", "niah_single_1", 95.0),
    accuracy("full", None, "vt", 0.0),
]


def test_report_tables_hold_the_rows(tmp_path):
    results, out = tmp_path / "results", tmp_path / "RESULTS.md"
    results.mkdir()
    (results / "lat.json").write_text(json.dumps(LATENCY))
    (results / "acc.json").write_text(json.dumps(ACCURACY))
    (results / "mixed.json").write_text(json.dumps([MIXED | RUN]))
    out.write_text(f"# Summary\n\nhand-written\n\n{report.MARKER}\nstale\n")
    args = ["--results", str(results), "--output", str(out), "--plot", str(tmp_path / "p.png")]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    text = out.read_text()
    assert (
        text.startswith(f"# Summary\n\nhand-written\n\n{report.MARKER}\n") and "stale" not in text
    )
    lines = text.splitlines()
    assert "NVIDIA H200, 2026-12-05, commit abc1234:" in lines
    assert "python -m benchmarks.bench_latency --contexts 131072" in lines
    assert "| full | 128k | 1 | 11.93 | 11.08 |" in lines
    assert "| tailor:longbench:key_sketch=2 | 128k | 1 | 14.45 | 6.27 |" in lines
    assert (
        "| tailor:longbench | 8 | 32k | 126000 | 25 | 26.1 | 25.8 | 0.21 | 12.61 / 12.93 |" in lines
    )
    # the mean is over the tasks every policy ran: vt (full only) is left out of it
    assert (
        "full, tailor:ruler: machine not recorded, date not recorded (command not recorded)"
        in lines
    )
    assert "| policy | niah_single_1@4k | vt@4k | avg (common tasks) |" in lines
    assert "| full | 100 | 0 | 100.0 |" in lines and "| tailor:ruler | 95 |  | 95.0 |" in lines
    assert not (tmp_path / "p.png").exists()  # no plotted series among these files
    assert report.main(args + ["--check"]) == 0


def test_committed_results_md_is_up_to_date():
    assert report.main(["--check"]) == 0


def test_run_info_records_machine_date_commit_and_command(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # no GPU to ask: the CPU model
    cpu = [x for x in open("/proc/cpuinfo") if x.startswith("model name")][0].split(":", 1)[1]
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=rows.REPO, capture_output=True, text=True
    ).stdout.strip()
    info = rows.run_info("benchmarks.bench_x", ["--policies", "full", "--note", "two words"])
    assert info["machine"] == cpu.strip()
    assert info["command"] == "python -m benchmarks.bench_x --policies full --note 'two words'"
    assert info["commit"] in (head, head + "-dirty")
    date = datetime.datetime.fromisoformat(info["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date).total_seconds() < 60
    monkeypatch.setattr("sys.argv", ["bench_x.py", "--steps", "4"])
    assert (
        rows.run_info("benchmarks.bench_x", None)["command"]
        == "python -m benchmarks.bench_x --steps 4"
    )
    assert rows.run_info("benchmarks.bench_x", [])["command"] == "python -m benchmarks.bench_x"
    monkeypatch.setattr(rows, "REPO", tmp_path)  # not a git checkout
    assert rows.commit() == "unknown"
    monkeypatch.setenv("TAILORKV_COMMIT", "0123abc")  # the tree a copy holds, as its runner says
    assert rows.commit() == "0123abc"
    monkeypatch.delenv("TAILORKV_COMMIT")
    rows.write_rows(str(tmp_path / "new" / "r.json"), [{"a": 1, **info}])
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == [{"a": 1, **info}]
