"""lm-eval's `local-completions` model, unmodified and offline, against the live server: a small multiple-choice
task scored from the server's prompt logprobs (echo) and a generate_until task, with the tokenizer the server
exports (/model_info's tokenizer_path)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

DATA = Path(__file__).parent / "data" / "lm_eval"

MC_TASK = """
task: tailorkv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_TASK = """
task: tailorkv_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


@pytest.fixture(scope="module")
def lm_eval_results(live_server, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = tmp_path_factory.mktemp("tasks")
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=DATA))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=DATA))
    tokenizer = httpx.get(f"{live_server.url}/model_info").json()["tokenizer_path"]
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"model=smollm2,base_url={live_server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},num_concurrent=1,max_retries=1,batch_size=8"
        ),
        tasks=["tailorkv_tiny_mc", "tailorkv_tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_multiple_choice_is_scored_from_the_servers_logprobs(lm_eval_results, live_server):
    assert lm_eval_results["results"]["tailorkv_tiny_mc"]["acc,none"] >= 0.8
    sample = lm_eval_results["samples"]["tailorkv_tiny_mc"][0]
    # the loglikelihood of " Paris" after the question: the server's own prompt logprobs
    tok = live_server.engine.tokenizer
    context, continuation = tok.encode("The capital of France is"), tok.encode(" Paris")
    body = {
        "input_ids": context + continuation,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": len(context),
    }
    meta = httpx.post(f"{live_server.url}/generate", json=body, timeout=60).json()["meta_info"]
    expected = sum(lp for lp, _, _ in meta["input_token_logprobs"])
    assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-4)


def test_generate_until_runs_and_scores(lm_eval_results):
    gen = lm_eval_results["results"]["tailorkv_tiny_gen"]
    assert 0 <= gen["exact_match,none"] <= 1
    outputs = [s["resps"][0][0] for s in lm_eval_results["samples"]["tailorkv_tiny_gen"]]
    assert len(outputs) == 3 and all(isinstance(o, str) and "\n" not in o for o in outputs)
