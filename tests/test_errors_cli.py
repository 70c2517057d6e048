"""Bad input gives one clear error: a typed exception in Python, one line and exit code 2 in the CLI."""

import json
import subprocess
import sys

import pytest

from tailorkv import Engine
from tailorkv.cli import main
from tailorkv.errors import ConfigError, ModelLoadError


def run_cli(*args):
    """The CLI as a real process (one smoke test: the entry point, stdout, exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "tailorkv", *args], capture_output=True, text=True, timeout=120
    )


def main_in_process(capsys, *args) -> tuple[int, str]:
    """`tailorkv ARGS` through cli.main in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def no_config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("noconfig")
    (d / "weights.safetensors").write_bytes(b"")
    return str(d)


@pytest.fixture
def unsupported_arch_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("badarch")
    (d / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10})
    )
    return str(d)


def test_python_errors(no_config_dir, unsupported_arch_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(model=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine(model=no_config_dir)
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        Engine(model=unsupported_arch_dir)
    with pytest.raises(ModelLoadError, match="unknown dummy"):
        Engine(model="dummy:nope")
    with pytest.raises(ConfigError, match="kv_policy"):
        Engine(kv_policy="nope")
    with pytest.raises(ConfigError, match="max_running_requests"):
        Engine(max_running_requests=0)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/definitely/missing"], "does not exist"),
        (["--model", "NOCONFIG"], "config.json"),
        (["--model", "BADARCH"], "unsupported architecture"),
        (["--prompt-override", ""], "prompt is empty"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
        (["--max-new-tokens", "9000"], "exceeds the model's context"),
        (["--kv-policy", "nope"], "kv_policy"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, needle, no_config_dir, unsupported_arch_dir, capsys):
    args = [{"NOCONFIG": no_config_dir, "BADARCH": unsupported_arch_dir}.get(a, a) for a in args]
    prompt = "hello"
    if args[0] == "--prompt-override":
        prompt, args = args[1], []
    code, err = main_in_process(capsys, "generate", "--prompt", prompt, *args)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tailorkv: error")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_cli_generate_paris():
    r = run_cli(
        "generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_cli_serve_refuses_a_negative_delay_factor(capsys):
    code, err = main_in_process(capsys, "serve", "--scheduler-delay-factor", "-1")
    assert (
        code == 2
        and err.strip() == "tailorkv: error: scheduler_delay_factor must be >= 0, got -1.0"
    )
