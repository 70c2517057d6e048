"""EngineConfig: every setting checked, the KV policy's options included, before a model loads."""

import pytest

from tailorkv.cli import build_parser, engine_config, main
from tailorkv.config import EngineConfig
from tailorkv.engine import engine_rank as engine_module
from tailorkv.engine.engine import Engine
from tailorkv.errors import ConfigError


@pytest.fixture
def no_model_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_module, "load_model", load)


@pytest.mark.parametrize(
    "kv_policy,options,needle",
    [
        ("tailor", {"key_sketch": 3}, "key_sketch must be 0"),
        ("tailor", {"tailor_preset": "nope"}, "unknown tailor_preset"),
        ("tailor", {"d_s": 0}, "d_s must be a positive integer, got 0$"),
        ("tailor", {"quant_bits": 3}, "quant_bits must be"),
        (
            "tailor",
            {"quant_layers": [-1]},
            r"quant_layers must be layer indices \(>= 0\), got \[-1\]$",
        ),
        ("tailor", {"topk": 5}, "unknown tailor option"),
        ("kivi", {"quant_layers": [0]}, "kivi quantizes every layer"),
        ("kivi", {"sink": -1}, "sink must be"),
        ("streaming", {"budget": 0}, "need budget >= 1"),
        ("streaming", {"tailor_preset": "auto"}, r"streaming: give budget= \(auto is tailor's"),
        ("quest", {"budget": 8, "sink": 8}, "0 <= sink < budget"),
        ("quest", {"top_k": 8}, "takes no option"),
        ("full", {"sink": 8}, "kv_policy 'full' takes no option"),
        ("offload", {"tailor_preset": "ruler"}, "takes no option"),
        ("nope", {}, "unknown kv_policy"),
        ("full", {"max_running_requests": 0}, "max_running_requests must be a positive"),
        ("full", {"cuda_graph": "no"}, "cuda_graph must be true or false"),
        ("full", {"host_kv_gib": -1.0}, "host_kv_gib must be >= 0"),
        ("full", {"scheduler_delay_factor": -0.5}, "scheduler_delay_factor must be >= 0"),
    ],
)
def test_a_bad_setting_fails_before_the_model_loads(no_model_load, kv_policy, options, needle):
    with pytest.raises(ConfigError, match=needle):
        Engine(kv_policy=kv_policy, **options)


def test_good_policy_options_pass_validation():
    for kv_policy, options in [
        ("tailor", {"tailor_preset": "ruler", "key_sketch": 0, "d_s": 16, "quant_layers": [0]}),
        ("kivi", {"quant_bits": 4}),
        ("streaming", {"budget": 64, "sink": 4}),
        ("quest", {"tailor_preset": "ruler"}),
        ("full", {}),
    ]:
        assert EngineConfig(kv_policy=kv_policy, policy_options=options).policy_options == options


def test_engine_keywords_split_into_settings_and_policy_options():
    config = EngineConfig.from_kwargs(
        "dummy:tiny", "tailor", "cpu", None, kv_cache_gib=0.5, host_kv_gib=None, top_k=64
    )
    assert config == EngineConfig(
        model="dummy:tiny",
        kv_policy="tailor",
        device="cpu",
        kv_cache_gib=0.5,
        policy_options={"top_k": 64},
    )


def test_cli_arguments_build_the_config():
    args = build_parser().parse_args(
        "serve --model dummy:tiny --kv-policy tailor --key-sketch 1 --max-running-requests 4 "
        "--disable-cuda-graph --disable-prefix-caching --scheduler-delay-factor 0 --enable-torch-compile "
        "--disable-overlap-schedule".split()
    )
    assert engine_config(args) == EngineConfig(
        model="dummy:tiny",
        kv_policy="tailor",
        max_running_requests=4,
        cuda_graph=False,
        enable_torch_compile=True,
        overlap_schedule=False,
        enable_prefix_caching=False,
        scheduler_delay_factor=0.0,
        policy_options={"key_sketch": 1},
    )
    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert engine_config(args, kv_cache_gib=0.01) == EngineConfig(kv_cache_gib=0.01)
    # on by default on CUDA (None until the engine knows its device), off when asked
    args = build_parser().parse_args("serve --disable-torch-compile".split())
    assert engine_config(args).enable_torch_compile is False
    assert EngineConfig().enable_torch_compile is None


def test_cli_tailor_knobs_become_policy_options():
    args = build_parser().parse_args(
        "generate --prompt hi --kv-policy tailor --tailor-preset ruler --tailor-top-k 300 --tailor-sink 4 "
        "--tailor-recent 32 --tailor-d-s 16 --tailor-quant-bits 4 --tailor-key-sketch 1 "
        "--tailor-speculative-fetch 1 --tailor-topk-chunk 4096 --tailor-radix-topk 0".split()
    )
    assert engine_config(args).policy_options == {
        "tailor_preset": "ruler",
        "top_k": 300,
        "sink": 4,
        "recent": 32,
        "d_s": 16,
        "quant_bits": 4,
        "key_sketch": 1,
        "speculative_fetch": 1,
        "topk_chunk": 4096,
        "radix_topk": 0,
    }


@pytest.mark.parametrize(
    "flags,line",
    [
        ("--tailor-top-k -5", "top_k must be a non-negative integer, got -5"),
        ("--tailor-sink x", "--tailor-sink must be an integer, got 'x'"),
        ("--tailor-recent -1", "recent must be a non-negative integer, got -1"),
        ("--tailor-d-s 0", "d_s must be a positive integer, got 0"),
        ("--tailor-quant-bits 3", "quant_bits must be 1, 2 or 4, got 3"),
        ("--tailor-key-sketch 5", "key_sketch must be 0 (off), 1 or 2 bits, got 5"),
        (
            "--tailor-preset nope",
            "unknown tailor_preset 'nope'; choose one of: auto, longbench, ruler",
        ),
    ],
)
@pytest.mark.parametrize("command", ["generate --prompt hi", "serve"])
def test_cli_bad_tailor_knob_is_one_line_before_the_model_loads(
    no_model_load, capsys, command, flags, line
):
    code = main(f"{command} --kv-policy tailor {flags}".split())
    assert (code, capsys.readouterr().err) == (2, f"tailorkv: error: {line}\n")


def test_cli_refuses_a_bad_setting_before_the_model_loads(no_model_load, capsys):
    for command, needle in (
        (
            ["generate", "--prompt", "hi", "--kv-policy", "tailor", "--key-sketch", "3"],
            "key_sketch",
        ),
        (["serve", "--kv-policy", "tailor", "--key-sketch", "3"], "key_sketch must be 0"),
        (["calibrate", "--host-kv-gib", "-1"], "host_kv_gib must be >= 0"),
    ):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"tailorkv: error: {needle}"), err


def test_cli_calibrate_prints_the_scores_and_stores_the_plan(monkeypatch, tmp_path, capsys):
    from tailorkv.kvcache import plans

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    code = main(["calibrate", "--model", "dummy:tiny", "--text", str(text), "--tokens", "128"])
    out = capsys.readouterr().out.splitlines()
    stored, source = plans.layer_plan("dummy:tiny")
    assert code == 0 and out[-1] == f"plan for dummy:tiny (tau=0.2): quant_layers={stored}"
    assert source == plans.CACHED and plans.budget_plan("dummy:tiny")[0].contexts == [128]
    assert len(out) == 3 + 4  # the header, a row per layer of dummy:tiny, the budget, the plan
