"""Where a benchmark row came from: every script adds the machine, date, commit and command line of its run to
each JSON row it writes (`run_info`, `write_rows`), so that `python -m benchmarks.report` can say it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The GPU's name (the first visible one), or the CPU model where there is no GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def commit() -> str:
    """$TAILORKV_COMMIT where set (a copy of a working tree whose .git is not its own, as the GPU host's is); else
    HEAD's short hash, with "-dirty" when tracked code differs from it (result files do not count), or "unknown"
    outside a git checkout."""
    if os.environ.get("TAILORKV_COMMIT"):
        return os.environ["TAILORKV_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results").returncode
    except OSError:  # no git
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_info(module: str, argv: list[str] | None) -> dict:
    """{machine, date (UTC, ISO), commit, command} of a run of `python -m module` with `argv` (None: this
    process's own arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": " ".join(["python", "-m", module] + ([shlex.join(args)] if args else [])),
    }


def write_rows(path: str, rows: list[dict]) -> None:
    """The rows as one JSON list (indent 1), the file's folder created if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
