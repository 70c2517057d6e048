"""The calibrated per-layer budget (`auto` preset): fits, the versioned plan cache, calibration at start (once,
deterministic, keeping a shipped Q-layer plan), and per-row, per-layer top-k in one batched decode."""

import json

import pytest
import torch

from tailorkv import Engine
from tailorkv.essays import load_essays
from tailorkv.kvcache import plans, tailor
from tailorkv.kvcache.budget import BudgetPlan, LayerFit, fit_layer
from tailorkv.kvcache.selection import select_tokens

# a quarter GiB of GPU-tier pools: the CPU default of 2 GiB is zeroed at every start
TINY = {"model": "dummy:tiny", "kv_policy": "tailor", "progress": False, "kv_cache_gib": 0.25}


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_fit_picks_share_or_power_law_and_caps():
    assert fit_layer([2048, 4096, 8192], [205, 410, 819]) == LayerFit(
        "share", pytest.approx(0.1, rel=1e-3)
    )
    fit = fit_layer([2048, 4096, 8192], [3 * n**0.5 for n in (2048, 4096, 8192)])
    assert fit.kind == "power" and fit.b == pytest.approx(0.5) and fit.a == pytest.approx(3)
    plan = BudgetPlan.fit([2048, 8192], [[100, 400], [10, 20]], cap=300)
    assert [plan.top_k(0, n) for n in (1024, 2048, 8192, 65536)] == [50, 100, 300, 300]
    assert plan.top_k(1, 2048) == 10 and plan.top_k(1, 8192) == 20
    assert BudgetPlan.from_json(json.loads(json.dumps(plan.as_json()))) == plan


def test_select_tokens_per_row_k_is_each_rows_own_top_k():
    scores = torch.randn(3, 2, 50)
    k_rows = torch.tensor([4, 9, 0])
    idx, valid = select_tokens(scores, 2, 40, 9, k_rows)
    for b, k in enumerate(k_rows.tolist()):
        for h in range(2):
            own = select_tokens(scores[b, h], 2, 40, k)[0].tolist() if k else []
            assert sorted(idx[b, h][valid[b, h]].tolist()) == sorted(own)


def test_calibration_is_deterministic_and_cached_in_the_current_format():
    with Engine(model="dummy:tiny", progress=False, kv_cache_gib=0.01) as e:
        text = load_essays()[:12000]
        runs = [e.calibrate(text, 2100) for _ in range(2)]
    assert runs[0] == runs[1]
    b = runs[0].budget
    assert b.contexts == [2048, 2100] and len(b.tokens) == len(b.fits) == 4
    stored = json.load(open(plans.cached_plan_path("dummy:tiny")))
    assert stored["version"] == plans.VERSION and stored["quant_layers"] == runs[0].quant_layers
    assert plans.budget_plan("dummy:tiny") == (b, plans.CACHED)


def test_a_version_1_plan_still_loads(cache_home):
    (cache_home / "tailorkv" / "plans").mkdir(parents=True)
    v1 = {"model": "dummy:tiny", "quant_layers": [2], "tau": 0.2, "scores": [0.1, 0.1, 0.3, 0.1]}
    open(plans.cached_plan_path("dummy:tiny"), "w").write(json.dumps(v1))
    assert plans.layer_plan("dummy:tiny") == ([2], plans.CACHED)
    assert plans.budget_plan("dummy:tiny") == (None, None)
    with Engine(**TINY, tailor_preset="ruler") as e:
        assert e.policy.tc.quant_layers == [2] and e.policy.sources["quant_layers"] == plans.CACHED


def test_auto_calibrates_once_at_start_then_uses_the_cache(monkeypatch):
    with Engine(**TINY, quant_layers=[0]) as e:  # a dummy model keeps the pinned preset
        assert e.policy.tc.preset == "longbench" and e.policy.budget is None
    monkeypatch.setattr("tailorkv.engine.calibration.LONGEST", {"cpu": 600})
    with Engine(**TINY, quant_layers=[0], tailor_preset="auto") as e:
        assert e.policy.sources == {"quant_layers": "option", "budget": plans.NEW}
        first = e.policy.budget
    with Engine(**TINY, tailor_preset="auto") as e:
        assert e.policy.sources["quant_layers"] == plans.CACHED  # the calibrated Q layers
    with Engine(**TINY, quant_layers=[0], tailor_preset="auto") as e:
        assert e.policy.sources == {"quant_layers": "option", "budget": plans.CACHED}
        assert e.policy.budget == first and first.contexts == [600]


def test_a_shipped_q_layer_plan_is_kept_when_the_budget_is_calibrated(monkeypatch):
    monkeypatch.setattr("tailorkv.engine.calibration.LONGEST", {"cpu": 600})
    monkeypatch.setattr(tailor, "layer_plan", lambda name: ([3], plans.SHIPPED))
    with Engine(**TINY, tailor_preset="auto") as e:
        assert e.policy.tc.quant_layers == [3]
        assert e.policy.sources == {"quant_layers": plans.SHIPPED, "budget": plans.NEW}
    assert json.load(open(plans.cached_plan_path("dummy:tiny")))["quant_layers"] == [3]


def _plan(ks: list[float], cap: int = 4096) -> BudgetPlan:
    """k = share * context per layer (layer 0 is a Q layer here)."""
    return BudgetPlan(0.98, 64, 64, cap, [1], [[0]] * 4, [LayerFit("share", s) for s in ks])


@pytest.fixture
def prompts():
    text = load_essays()
    return [text[:1800], text[5000:8200]]  # ~420 and ~750 tokens: each row its own k


def test_auto_at_one_k_for_every_layer_equals_the_fixed_top_k(monkeypatch, prompts):
    monkeypatch.setattr(tailor, "budget_plan", lambda name: (_plan([1, 1, 1, 1], cap=96), "test"))
    opts = {**TINY, "quant_layers": [0]}
    with Engine(**opts, tailor_preset="auto") as e:
        auto = _scores(e, prompts, True)
    with Engine(**opts, tailor_preset="ruler", top_k=96) as e:
        assert sum(_scores(e, prompts, True), []) == pytest.approx(sum(auto, []), abs=1e-4)


def _scores(e: Engine, prompts: list[str], batched: bool) -> list[list[float]]:
    """Log-probabilities of 6 teacher-forced tokens after each prompt, decoded through the policy."""
    ids = [e.tokenizer.encode(p) for p in prompts]
    conts = [x[-6:] for x in ids]
    if batched:
        return e.score([x[:-6] for x in ids], conts)
    return [e.score([x[:-6]], [c])[0] for x, c in zip(ids, conts)]


def test_per_layer_k_by_context_batched_equals_each_alone(monkeypatch, prompts):
    """Rows of different contexts (hence k) and layers of different k in one decode batch."""
    monkeypatch.setattr(tailor, "budget_plan", lambda name: (_plan([0, 0.3, 0.05, 0.15]), "test"))
    with Engine(**TINY, quant_layers=[0], tailor_preset="auto") as e:
        ks = [e.policy.layer_top_k(len(e.tokenizer.encode(p))) for p in prompts]
        assert ks[0] != ks[1] and len(set(ks[0])) == 3
        batched, alone = _scores(e, prompts, True), _scores(e, prompts, False)
    assert sum(batched, []) == pytest.approx(sum(alone, []), abs=1e-4)
    monkeypatch.setattr(tailor, "budget_plan", lambda name: (_plan([0, 0.05, 0.05, 0.05]), "test"))
    with Engine(**TINY, quant_layers=[0], tailor_preset="auto") as e:
        other = _scores(e, prompts, True)
    diff = max(abs(a - b) for a, b in zip(sum(other, []), sum(batched, [])))
    assert diff > 1e-3, diff
