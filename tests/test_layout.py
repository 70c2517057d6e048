"""A policy's KVLayout (pools, admission cost, prefix blocks) on dummy:tiny, for 64 MiB of GPU and 256 MiB of host
memory: the values below were recorded from the policies before the layout was split out of them (tailor's GPU
pools since the generated-token pool was sized for 1,024-token answers to 32k prompts)."""

import pytest
import torch

from tailorkv.kvcache.registry import policy_class
from tailorkv.models.dummy import dummy_config

MIB = 1 << 20
TAILOR_BLOCKS = (256, {"host": 1, "sketch": 1, "qkv": 4})
# (policy, options, prefix caching): ({pool: (tier, pages, page size, bytes per page)}, prefix blocks)
RECORDED = [
    ("full", {}, False, {"kv": ("gpu", 2048, 16, 32768)}, None),
    ("full", {}, True, {"kv": ("gpu", 2048, 16, 32768)}, (16, {"kv": 1})),
    ("offload", {}, True, {"kv": ("host", 8192, 16, 32768)}, (16, {"kv": 1})),
    (  # kivi keeps its prompts' exact rows in the host tier, which its prefill chunks read back
        "kivi",
        {},
        True,
        {
            "slots": ("gpu", 25, 1, 263168),
            "host": ("host", 512, 256, 524288),
            "copies": ("gpu", 57, 256, 524288),
            "qkv": ("gpu", 2720, 64, 11264),
        },
        None,
    ),
    (
        "tailor",
        {"key_sketch": 2},
        False,
        {
            "slots": ("gpu", 40, 1, 164864),
            "host": ("host", 512, 256, 524288),
            "qkv": ("gpu", 7123, 64, 1792),
            "gen": ("gpu", 215, 64, 98304),
            "sketch": ("gpu", 1727, 256, 15360),
        },
        None,
    ),
    (
        "tailor",
        {"key_sketch": 2},
        True,
        {
            "slots": ("gpu", 40, 1, 164864),
            "host": ("host", 512, 256, 524288),
            "copies": ("gpu", 57, 256, 524288),
            "qkv": ("gpu", 3605, 64, 1792),
            "gen": ("gpu", 109, 64, 98304),
            "sketch": ("gpu", 874, 256, 15360),
        },
        TAILOR_BLOCKS,
    ),
    (
        "tailor",
        {"key_sketch": 0},
        True,
        {
            "slots": ("gpu", 40, 1, 164864),
            "host": ("host", 372, 256, 720896),
            "copies": ("gpu", 57, 256, 524288),
            "qkv": ("gpu", 6420, 64, 1792),
            "gen": ("gpu", 194, 64, 98304),
        },
        (256, {"host": 1, "qkv": 4}),
    ),
]
NEEDED = {  # pages for a prompt of 1000 tokens and 100 new ones
    "full": {"kv": 69},
    "offload": {"kv": 69},
    "kivi": {"slots": 1, "qkv": 18, "host": 4},
    "tailor": {"slots": 1, "qkv": 18, "gen": 2, "host": 4, "sketch": 4},
}


@pytest.mark.parametrize(("name", "options", "prefix", "pools", "blocks"), RECORDED)
def test_layout_keeps_the_recorded_pools_and_costs(name, options, prefix, pools, blocks):
    if name == "tailor":
        options = {**options, "quant_layers": [0]}
    policy = policy_class(name)(dummy_config("tiny"), torch.device("cpu"), torch.float32, **options)
    layout = policy.layout(64 * MIB, 256 * MIB, None, prefix)
    got = {s.name: (s.tier, s.num_pages, s.page_size, s.bytes_per_page) for s in layout.pools}
    assert got == pools and layout.prefix_blocks == blocks
    need = {p: n for p, n in NEEDED[name].items() if p in pools}
    assert layout.pages_needed(1000, 100) == need
    tailor = name in ("tailor", "kivi")
    assert layout.caches_output == (not tailor)
    assert layout.partial_block_pool == ("host" if tailor and blocks else None)


@pytest.mark.parametrize(
    "context,host_kv_dtype,held",
    [(32768, "auto", 25), (131072, "auto", 6), (32768, "fp8", 49), (131072, "fp8", 12)],
)
def test_tailors_batch_of_long_requests_is_bound_by_the_host_tier(context, host_kv_dtype, held):
    """Llama-3.1-8B's shape, 61 GiB of GPU KV memory (an 80 GiB card less the weights) and 100 GiB of host tier:
    requests with 1,024-token answers fit every GPU pool more often than the host tier holds their prompts; fp8
    host rows (260 B a row for 512) hold twice as many (full holds 14 at 32k and 3 at 128k in the same 61 GiB)."""
    policy = policy_class("tailor")(
        dummy_config("llama-3.1-8b"),
        torch.device("cpu"),
        torch.bfloat16,
        quant_layers=[0],
        host_kv_dtype=host_kv_dtype,
    )
    policy.host_on_device = False  # as on CUDA: copies of host pages take part of the GPU memory
    layout = policy.layout(61 << 30, 100 << 30, None, True)
    need = layout.pages_needed(context, 1024)
    batch = {s.name: s.num_pages // need[s.name] for s in layout.pools if need.get(s.name)}
    assert min(batch, key=batch.get) == "host" and batch["host"] == held


def test_tailor_keeps_a_slot_per_request_that_can_run_and_gives_the_rest_to_its_pools():
    """Slots (a running request's windows and, with reuse_rows, the rows its last step fetched) number at most the
    requests that run at once: what fewer of them leave goes to the pools that bound the batch."""
    policy = policy_class("tailor")(
        dummy_config("llama-3.1-8b"),
        torch.device("cpu"),
        torch.bfloat16,
        quant_layers=[0],
        reuse_rows=128,
    )
    policy.host_on_device = False
    many, few = (policy.layout(61 << 30, 100 << 30, None, True, n) for n in (None, 32))
    slots = {lay.pools[0].num_pages for lay in (many, few)}
    assert [p.name for p in few.pools][0] == "slots" and slots == {256, 32}
    gpu = lambda lay: {p.name: p.num_pages for p in lay.pools if p.tier == "gpu"}  # noqa: E731
    assert all(gpu(few)[n] > gpu(many)[n] for n in ("qkv", "gen", "sketch"))


def test_tailors_prefix_read_back_is_left_out_of_the_gpu_kv_budget(monkeypatch):
    """On CUDA the KV budget is what is free less the activations and the policy's prefill workspace: tailor's
    chunks read a layer's prefix back (three buffers of a full context's K and V), full reads in place."""
    from tailorkv.config import EngineConfig
    from tailorkv.engine.engine_rank import GIB, EngineRank
    from tailorkv.scheduler.step_cost import CUDA_CHUNK

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 16 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 16 * GIB)
    cfg = dummy_config("llama-3.1-8b")
    budgets = {}
    for name in ("full", "tailor"):
        rank = EngineRank.__new__(EngineRank)
        rank.options = EngineConfig(
            kv_policy=name, chunked_prefill_size=CUDA_CHUNK
        )  # as Engine sets it
        rank.config, rank.model = cfg, torch.nn.Linear(4, 4)
        rank.device, rank.dtype = torch.device("cuda"), torch.bfloat16
        rank.policy = policy_class(name)(cfg, torch.device("cpu"), torch.bfloat16)
        budgets[name] = rank._gpu_kv_budget()
    workspace = 3 * 131072 * 8 * 2 * 128 * 2  # 1.5 GiB, less the margin's tenth of it
    assert budgets["full"] - budgets["tailor"] == pytest.approx(0.9 * workspace, abs=2)


def test_a_126k_tailor_prompt_fits_the_default_budget_under_a_24_gib_cap(monkeypatch, caplog):
    """Under --gpu-memory-limit 24 on the H100 a 126k prompt did not fit tailor's default pools: 17.85 GiB was in
    use when the budget was taken (15.02 GiB in tensors, 14.96 of them parameters), and a tenth of the room as
    margin on top of the activations' and workspace's upper bounds left the pools 0.2 GiB short (with a 2.5 GiB
    budget the run used 1.81 GiB beyond weights and KV, against 3.88 reserved). Blocks the caching allocator holds
    unused count as free (the budget is taken after they are released); the margin is a tenth of what the
    reservations leave."""
    from tailorkv.config import EngineConfig
    from tailorkv.engine.engine_rank import GIB, EngineRank
    from tailorkv.scheduler.step_cost import CUDA_CHUNK

    cached = [4 * GIB]  # reserved by the allocator, used by nothing
    in_use = int(17.85 * GIB)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.__setitem__(0, 0))
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (79 * GIB - in_use - cached[0], 79 * GIB)
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(15.02 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(15.5 * GIB))
    rank = EngineRank.__new__(EngineRank)
    rank.options = EngineConfig(
        kv_policy="tailor", gpu_memory_limit_gib=24, chunked_prefill_size=CUDA_CHUNK
    )  # as Engine sets it
    rank.model = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of float32 parameters
    rank.config = cfg = dummy_config("llama-3.1-8b")
    rank.device, rank.dtype = torch.device("cuda"), torch.bfloat16
    rank.policy = policy_class("tailor")(cfg, torch.device("cpu"), torch.bfloat16)
    with caplog.at_level("INFO", logger="tailorkv"):
        budget = rank._gpu_kv_budget()
    layout = rank.policy.layout(budget, 20 * GIB, None, True)
    need = layout.pages_needed(126_000, 4)
    assert all(need[s.name] <= s.num_pages for s in layout.pools if s.name in need)
    # and its pages, the reservations and what is in use stay under the cap with 2 GiB to spare (the run's peak)
    assert in_use + budget + 1.81 * GIB < 22 * GIB
    # the log says how the budget came about
    assert (
        f"GPU KV budget {budget / GIB:.2f} GiB" in caplog.text
        and "(17.85 GiB in use, 15.50 GiB of it reserved by PyTorch, 15.02 GiB in tensors, 0.00 GiB of them "
        "parameters)"
        in caplog.text
    )


@pytest.mark.parametrize("gib", [1.5, 2.0, 8.0])
def test_max_prompt_is_the_longest_prompt_every_pool_holds(gib):
    """Under --gpu-memory-limit 24 a 126k prompt was refused; the engine now says at start how long a prompt its
    pools hold (KVLayout.max_prompt), one token more being refused."""
    policy = policy_class("tailor")(
        dummy_config("llama-3.1-8b"), torch.device("cpu"), torch.bfloat16, quant_layers=[0]
    )
    policy.host_on_device = False
    layout = policy.layout(int(gib * 2**30), 20 * 2**30, None, True)
    pools = {s.name: s.num_pages for s in layout.pools}
    longest = layout.max_prompt(4)
    fits = lambda n: all(m <= pools[p] for p, m in layout.pages_needed(n, 4).items())  # noqa: E731
    assert fits(longest) and not fits(longest + 1)
    assert (longest >= 126_000) == (gib >= 2.0)  # the H100's 24 GiB case: 1.5 GiB did not hold it


def test_an_engine_whose_pools_hold_less_than_the_models_context_says_so_at_start(caplog):
    from tailorkv import Engine

    with caplog.at_level("WARNING", logger="tailorkv"):
        with Engine("dummy:tiny", kv_policy="full", kv_cache_gib=0.001, progress=False) as e:
            longest = e.scheduler.layout.max_prompt(1)
    assert 0 < longest < 8191
    assert f"hold prompts of at most {longest} tokens, of the model's 8192" in caplog.text
