"""Prefix caching: the page cache's bookkeeping (refcounts, LRU eviction, hash chain), and greedy outputs with shared
prefix pages equal to those computed from scratch, for every policy that shares (on dummy:tiny)."""

import pytest
from conftest import LOGPROB_TOL, assert_close_logprobs, forced_logprobs

from tailorkv import Engine
from tailorkv.engine.sampling import SamplingParams
from tailorkv.essays import load_essays
from tailorkv.kvcache import quant_store
from tailorkv.memory.layout import KVLayout
from tailorkv.memory.pages import MemoryManager, PoolSpec
from tailorkv.memory.prefix_cache import RecentKeys, common_prefix, page_hashes

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
PAGE = 16


# ---- the cache itself --------------------------------------------------------------------------------------------
def manager(pages: int = 8) -> MemoryManager:
    return MemoryManager([PoolSpec("kv", "gpu", pages, PAGE, 1)], prefix=(PAGE, {"kv": 1}))


def test_usage_counts_a_pools_last_ids_in_the_tier_of_the_pool_they_are_part_of():
    # 10 host pages of 100 bytes, the last 4 resident on the GPU at 300 bytes, beside 5 GPU pages of 7 bytes
    mm = MemoryManager(
        [
            PoolSpec("kv", "gpu", 5, PAGE, 7),
            PoolSpec("host", "host", 10, PAGE, 100),
            PoolSpec("resident", "gpu", 4, PAGE, 300, part_of="host"),
        ],
        prefix=(PAGE, {"host": 1}),
    )
    keys = page_hashes(list(range(8 * PAGE)), PAGE)
    # 6 pinned ids, then 2 resident
    assert mm.reserve(0, {"host": 8, "kv": 1})["host"] == list(range(8))
    mm.cache(0, keys[:7])
    mm.release(0)  # blocks 0-6 cached and evictable (page 7 freed): every page counts as free again
    assert mm.usage() == {
        "gpu": {"free_pages": 9, "total_pages": 9, "free_bytes": 1235, "total_bytes": 1235},
        "host": {"free_pages": 6, "total_pages": 6, "free_bytes": 600, "total_bytes": 600},
    }
    shared = mm.prefix.match(keys[:7])
    # 7 shared pages, 2 new: of the resident ones, 9 is free
    assert mm.reserve(1, {"host": 9}, shared)["host"] == list(range(9))
    assert mm.usage()["gpu"]["free_bytes"] == 5 * 7 + 300 and mm.usage()["host"]["free_pages"] == 0


def test_keys_chain_over_full_blocks():
    a = page_hashes(list(range(40)), PAGE)
    assert len(a) == 2  # the partial third block has no key
    assert page_hashes(list(range(32)) + [7] * 8, PAGE) == a
    b = page_hashes([99] + list(range(1, 40)), PAGE)
    assert b[0] != a[0] and b[1] != a[1]  # a change in block 0 changes every later key
    assert page_hashes(list(range(16, 32)), PAGE) != a[1:]  # same tokens, other prefix: another key


def test_recent_keys_equal_page_hashes_for_prompts_that_begin_alike():
    rk = RecentKeys(PAGE, size=2)
    doc = list(range(100, 180))  # 5 blocks
    prompts = [
        doc + [1, 2, 3],
        doc + [1, 2, 3] + list(range(40)),  # a next turn: all of the last prompt, and more
        doc[:37] + [7] * 30,  # leaves the document mid-block
        doc[:10],  # shorter than a block
        doc,
        [5] + doc[1:],  # another first block
        [6] + doc[1:],  # a third: the oldest remembered (doc's) is dropped
        doc + [9] * 20,
    ]
    for p in prompts:
        assert rk.keys(p) == page_hashes(p, PAGE), p
    assert len(rk.recent) == 2
    assert [
        common_prefix(a, b)
        for a, b in [([1, 2, 3], [1, 2, 4]), ([1], [1, 2]), ([], [1]), ([2], [1])]
    ] == [2, 1, 0, 0]


def test_match_stops_at_first_miss():
    mm = manager()
    keys = page_hashes(list(range(48)), PAGE)
    pages = mm.reserve(0, {"kv": 3})["kv"]
    mm.prefix.register([keys[0], keys[2]], {"kv": [pages[0], pages[2]]})
    assert mm.prefix.match(keys) == [keys[0]]
    mm.cache(0, keys, start=1)  # block 1 too; an already registered block keeps its pages
    assert mm.prefix.match(keys) == keys and mm.prefix.share(keys)["kv"] == pages


def test_refcounts_and_lru_eviction():
    mm = manager(8)
    keys = page_hashes(list(range(64)), PAGE)
    first = mm.reserve(0, {"kv": 4})["kv"]
    mm.cache(0, keys)
    shared = mm.prefix.match(keys[:3])
    assert mm.reserve(1, {"kv": 5}, shared)["kv"][:3] == first[:3]  # 3 shared + 2 new pages
    assert mm.num_free("kv") == 8 - 6
    mm.release(
        0
    )  # blocks 0-2 still referenced by request 1; block 3 is cached, unreferenced: evictable
    assert mm.prefix.refs == {k: 1 for k in keys[:3]} and list(mm.prefix.evictable) == keys[3:]
    assert mm.num_free("kv") == 8 - 5
    mm.release(1)  # the tail is released first, so the head of the prefix is the last to go
    assert list(mm.prefix.evictable) == keys[3:] + keys[2::-1]
    assert mm.num_free("kv") == 8 and mm.usage()["gpu"]["free_pages"] == 8
    assert (
        mm.reserve(2, {"kv": 5})["kv"][4:] == first[3:]
    )  # 4 never-used pages, then the oldest cached block's
    assert mm.prefix.match(keys) == keys[:3]  # block 3 was evicted: its key is gone
    mm.release(2)
    assert (
        mm.reserve(3, {"kv": 8}) is not None and mm.prefix.match(keys) == []
    )  # evicting all of them


def test_release_keeps_the_blocks_a_sharing_request_registered():
    """A next turn shares a cached document's blocks, computes two blocks of its own and registers them: its release
    frees only its page past them (the shared pages lead its list, the registered ones are the cache's)."""
    mm = manager(8)
    doc = list(range(48))
    mm.reserve(0, {"kv": 3})
    mm.cache(0, page_hashes(doc, PAGE))
    mm.release(0)
    turn = page_hashes(doc + [7] * 32, PAGE)  # the document's 3 blocks, then 2 of its own
    assert len(mm.reserve(1, {"kv": 6}, mm.prefix.match(turn))["kv"]) == 6  # 3 shared + 3 its own
    mm.cache(1, turn, start=3)
    mm.release(1)
    assert mm.pools["kv"].num_free == 8 - 5 and len(mm.prefix.evictable) == 5
    assert mm.prefix.match(turn) == turn
    assert mm.prefix.flush() == 5 and mm.pools["kv"].num_free == 8


def test_flush_evicts_only_unreferenced_blocks():
    mm = manager(8)
    keys = page_hashes(list(range(64)), PAGE)
    mm.reserve(0, {"kv": 4})
    mm.cache(0, keys)
    mm.reserve(1, {"kv": 2}, mm.prefix.match(keys[:2]))
    mm.release(0)  # blocks 2-3 unreferenced, 0-1 still held by request 1
    assert mm.prefix.flush() == 2
    assert mm.prefix.match(keys) == keys[:2] and not mm.prefix.evictable
    assert mm.pools["kv"].num_free == 8 - 2
    mm.release(1)
    assert mm.prefix.flush() == 2 and mm.prefix.match(keys) == [] and mm.pools["kv"].num_free == 8


def test_reserve_counts_evictable_shared_blocks():
    mm = manager(4)
    keys = page_hashes(list(range(32)), PAGE)
    mm.reserve(0, {"kv": 2})
    mm.cache(0, keys)
    mm.release(0)
    mm.reserve(1, {"kv": 2})  # 2 free pages left, both those of evictable cached blocks
    shared = mm.prefix.match(keys)
    assert (
        mm.reserve(2, {"kv": 3}, shared) is None
    )  # 2 shared + 1 new page would need 3 pages of room
    assert mm.prefix.match(keys) == shared and 2 not in mm.held  # nothing taken
    assert mm.reserve(2, {"kv": 2}, shared)["kv"] == [
        p for k in shared for p in mm.prefix.pages[k]["kv"]
    ]


def test_blocks_span_several_pools():
    """A block owns pages in every shared pool (tailor: 1 host page + 4 quantized pages); evicting it for room in
    one pool returns its pages in all of them; unshared pools are never touched by the cache."""
    specs = [
        PoolSpec("host", "host", 3, 256, 1),
        PoolSpec("qkv", "gpu", 12, 64, 1),
        PoolSpec("gen", "gpu", 4, 64, 1),
    ]
    mm = MemoryManager(specs, prefix=(256, {"host": 1, "qkv": 4}))
    keys = page_hashes(list(range(512)), 256)
    held = mm.reserve(0, {"host": 2, "qkv": 9, "gen": 1})
    mm.cache(0, keys[:1])  # block 0 only: host page 0, qkv pages 0-3
    mm.release(0)
    assert mm.num_free("host") == 3 and mm.num_free("qkv") == 12 and mm.pools["qkv"].num_free == 8
    got = mm.reserve(1, {"host": 2, "qkv": 9, "gen": 1}, mm.prefix.match(keys))
    assert got["host"][0] == held["host"][0] and got["qkv"][:4] == held["qkv"][:4]
    mm.release(1)
    mm.reserve(
        2, {"host": 3, "qkv": 1}
    )  # the host pool needs the cached block's page: the whole block goes
    assert mm.prefix.match(keys) == [] and mm.pools["qkv"].num_free == 11
    mm.release(2)
    assert all(t["free_pages"] == t["total_pages"] for t in mm.usage().values())


def test_partial_blocks_are_matched_by_their_tokens_and_copied_on_write():
    """A prompt's partly filled last block is cached by its page in one pool; a request continuing (part of) its
    tokens references it while it runs but holds a page of its own for that block; unreferenced it is evictable,
    before its parent, and its page counts as free."""
    specs = [PoolSpec("host", "host", 4, 256, 1), PoolSpec("qkv", "gpu", 16, 64, 1)]
    mm = MemoryManager(specs, prefix=(256, {"host": 1, "qkv": 4}))
    ids = list(range(300))
    keys = page_hashes(ids, 256)
    first = mm.reserve(0, {"host": 2, "qkv": 5})
    mm.cache(0, keys)
    mm.cache_partial(0, keys[0], ids[256:300], 1, "host")
    assert mm.prefix.match_partial(keys[0], ids[256:290]) is not None
    key, n = mm.prefix.match_partial(keys[0], ids[256:290] + [7, 7])
    assert n == 34 and mm.prefix.pages[key] == {"host": [first["host"][1]]}
    assert mm.prefix.match_partial(keys[0], [5] + ids[257:290]) is None  # no first token in common
    assert (
        mm.prefix.match_partial(page_hashes([1] * 256, 256)[0], ids[256:290]) is None
    )  # another parent
    mm.release(0)
    assert mm.num_free("host") == 4 and mm.num_free("qkv") == 16
    got = mm.reserve(1, {"host": 2, "qkv": 5}, mm.prefix.match(keys), key)
    assert (
        got["host"][0] == first["host"][0] and got["host"][1] != first["host"][1]
    )  # its own page for block 1
    assert mm.num_free("host") == 4 - 3 and key not in mm.prefix.evictable
    mm.release(1)
    assert list(mm.prefix.evictable) == [key, keys[0]]  # the partial block goes first
    mm.reserve(2, {"host": 4})  # evicts both
    assert not mm.prefix.pages and not mm.prefix.partials and mm.num_free("host") == 0
    mm.release(2)
    assert all(t["free_pages"] == t["total_pages"] for t in mm.usage().values())


# ---- engines on the embedded model ---------------------------------------------------------------------------------
def questions(doc: str) -> list[str]:
    return [
        doc + q
        for q in (
            "\n\nQuestion: what is this text about?\nAnswer:",
            "\n\nQuestion: who wrote it?\nAnswer:",
            "\n\nSummarize it in one sentence:",
            "\n\nList three key words:",
        )
    ]


@pytest.fixture(scope="module")
def texts():
    """Prompts of ~310 tokens sharing a ~300-token document."""
    return questions(load_essays()[:1300])


# exactness needs no real text: dummy:tiny runs the same paths as a real model in a fraction of the time
TINY = "dummy:tiny"
# one 16-token page of dummy:tiny's full-precision KV in float32: K and V x 4 layers x 2 KV heads x 32
TINY_FULL_PAGE_GIB = 2 * 4 * PAGE * 2 * 32 * 4 / 2**30


@pytest.fixture(scope="module")
def cold():
    with Engine(model=TINY, progress=False, kv_cache_gib=0.05, enable_prefix_caching=False) as e:
        yield e


@pytest.fixture(scope="module")
def warm():
    with Engine(model=TINY, progress=False, kv_cache_gib=0.05) as e:
        yield e


def expected_hit(first: list[int], second: list[int]) -> int:
    """Tokens the second prompt takes from the cache after the first ran: common full pages, never all of it."""
    common = next(
        (i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second))
    )
    return min(common, len(second) - 1) // PAGE * PAGE


def all_free(e: Engine) -> bool:
    return not e.memory.held and all(
        t["free_pages"] == t["total_pages"] for t in e.memory.usage().values()
    )


def test_same_prompt_twice(cold, warm, texts):
    prompt = texts[0]
    want = cold.generate(prompt, sampling_params=GREEDY)["output_ids"]
    a, b = (warm.generate(prompt, sampling_params=GREEDY) for _ in range(2))
    assert a["output_ids"] == b["output_ids"] == want
    n = len(warm.tokenize(prompt, None))
    assert (
        a["meta_info"]["cached_tokens"] == 0
        and b["meta_info"]["cached_tokens"] == (n - 1) // PAGE * PAGE > 250
    )
    assert all_free(warm)


def test_step_log_reports_new_and_cached_prompt_tokens(warm, texts, caplog):
    ids = warm.tokenize(texts[0], None)
    warm.generate(
        input_ids=ids, sampling_params=GREEDY
    )  # cached now, if an earlier test has not already
    with caplog.at_level("INFO", logger="tailorkv.engine"):
        warm.generate(input_ids=ids, sampling_params=GREEDY)
    hit = (len(ids) - 1) // PAGE * PAGE
    assert [
        r.getMessage().split(", 0 decoding")[0]
        for r in caplog.records
        if "prefill" in r.getMessage()
    ] == [f"prefill: 1 seqs, {len(ids) - hit} new tokens, {hit} cached tokens"]


def test_shared_document_then_other_questions(cold, warm, texts):
    first, second = (warm.tokenize(p, None) for p in texts[1:3])
    want = [
        cold.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        for ids in (first, second)
    ]
    got = [warm.generate(input_ids=ids, sampling_params=GREEDY) for ids in (first, second)]
    assert [g["output_ids"] for g in got] == want
    assert got[1]["meta_info"]["cached_tokens"] == expected_hit(first, second) >= 256
    # the exact check: the third question's forced tokens after the document read from the cache
    assert_close_logprobs(forced_logprobs(warm, texts[3]), forced_logprobs(cold, texts[3]))
    assert all_free(warm)


def test_batch_sharing_a_prefix(cold, warm):
    prompts = questions(
        load_essays()[2000:3300]
    )  # submitted together, before any of them computed the prefix
    want = [r["output_ids"] for r in cold.generate(prompts, sampling_params=GREEDY)]
    assert [r["output_ids"] for r in warm.generate(prompts, sampling_params=GREEDY)] == want
    # the exact check, as teacher-forced logprobs: questions on a document not seen yet, submitted together
    ids = [warm.tokenizer.encode(p) for p in questions(load_essays()[4000:5300])]
    runs = [e.forced([x[:-12] for x in ids], [x[-12:] for x in ids]) for e in (cold, warm)]
    for want_req, got_req in zip(*runs):
        assert_close_logprobs(got_req.output_logprobs, want_req.output_logprobs)
    assert all_free(warm)


def test_next_turn_of_a_chat_hits_the_previous_answer(cold, warm, texts):
    turn1 = warm.tokenize(texts[3], None)
    answer = warm.generate(input_ids=turn1, sampling_params={**GREEDY, "max_new_tokens": 17})[
        "output_ids"
    ]
    turn2 = turn1 + answer + warm.tokenize(" Now three more:", None)
    out = warm.generate(input_ids=turn2, sampling_params=GREEDY)
    assert out["output_ids"] == cold.generate(input_ids=turn2, sampling_params=GREEDY)["output_ids"]
    computed = len(turn1) + len(answer) - 1  # the last answer token was never fed back
    assert out["meta_info"]["cached_tokens"] == computed // PAGE * PAGE > len(turn1) // PAGE * PAGE


@pytest.mark.parametrize("policy", ["streaming", "quest", "offload"])
def test_baselines_share_prefixes_exactly(policy, texts):
    first, second = texts[:2]  # prompts longer than the baselines' budget of 192 tokens
    options = dict(
        model=TINY, kv_policy=policy, progress=False, kv_cache_gib=0.05, host_kv_gib=0.05
    )
    with Engine(**options, enable_prefix_caching=False) as e:
        want = [
            r["output_ids"]
            for r in (e.generate(p, sampling_params=GREEDY) for p in (first, second))
        ]
        want_logprobs = forced_logprobs(e, texts[2])
    with Engine(**options) as e:
        got = [e.generate(p, sampling_params=GREEDY) for p in (first, second)]
        assert [g["output_ids"] for g in got] == want
        assert got[1]["meta_info"]["cached_tokens"] > 256
        # the document from the cache; quest on the GPU moved by 0.0146 (H100, 2026-12-06; greedy tokens equal):
        # its page scores in bf16 (not looked into further)
        tol = 3e-2 if policy == "quest" and e.device.type == "cuda" else LOGPROB_TOL
        assert_close_logprobs(forced_logprobs(e, texts[2]), want_logprobs, tol)
        assert all_free(e)


def test_lru_eviction_under_a_small_budget(cold):
    docs = [load_essays()[i * 1300 : (i + 1) * 1300] + "\n\nThe main idea:" for i in range(6)]
    sp = {**GREEDY, "max_new_tokens": 4}
    want = [r["output_ids"] for r in cold.generate(docs, sampling_params=sp)]
    # 46 pages of 16 tokens (fp32; bf16 on the GPU gets the same pages from half the bytes): room for two requests
    with Engine(
        model=TINY, progress=False, kv_cache_gib=46.5 * TINY_FULL_PAGE_GIB * cold.dtype.itemsize / 4
    ) as e:
        pages = [-(-(len(e.tokenize(d, None)) + 4) // PAGE) for d in docs]
        assert 2 * max(pages) <= e.memory.pools["kv"].num_pages < 3 * min(pages)
        run = [(i, e.generate(docs[i], sampling_params=sp)) for i in (0, 1, 2, 0, 3, 4, 5, 1)]
        assert [out["output_ids"] for _, out in run] == [want[i] for i, _ in run]
        hits = [out["meta_info"]["cached_tokens"] for _, out in run]
        full = (len(e.tokenize(docs[0], None)) - 1) // PAGE * PAGE
        # doc 0 again after two others: the tail of its pages was evicted first, its head is still there;
        # doc 1 again after four others: all of it was evicted
        assert hits[:3] == [0, 0, 0] and 0 < hits[3] < full and hits[-1] == 0
        assert [r["output_ids"] for r in e.generate(docs[:4], sampling_params=sp)] == want[:4]
        assert all_free(e)


# ---- tailor: blocks of one host page (rows + sketch + quantized pages), exact prefill after a shared prefix -------
TAILOR_BLOCK = 256
# exactness needs no real text: dummy:tiny runs the same paths as a real model in a fraction of the time; pools
# of a quarter GiB a tier (not the CPU default of 2 GiB of zeroed GPU-tier pools), room enough for every test here
TINY_TAILOR = {
    "model": "dummy:tiny",
    "kv_policy": "tailor",
    "quant_layers": [0],
    "progress": False,
    "kv_cache_gib": 0.25,
    "host_kv_gib": 0.25,
}
# one host page (or GPU copy) of dummy:tiny in float32: 4 layers x 2 KV heads x 256 tokens x [K | V] of 32
TINY_PAGE_GIB = 4 * 2 * TAILOR_BLOCK * 64 * 4 / 2**30


@pytest.fixture(scope="module")
def chat():
    """A ~1350-token document and two questions about it."""
    doc = load_essays()[:6000]
    return [
        doc + "\n\nQuestion: what is this text about?\nAnswer:",
        doc
        + "\n\nQuestion: who wrote it? Explain in detail, with the evidence from the text.\nAnswer:",
    ]


@pytest.mark.parametrize("key_sketch", [2, 0])
def test_tailor_shares_a_document_exactly(chat, key_sketch):
    """The second question reuses the document's host pages, sketch pages and quantized pages: its prefill attends
    to the shared prefix read back from the host tier, and the tokens equal those of an engine without caching."""
    sp = {**GREEDY, "max_new_tokens": 16}
    options = dict(TINY_TAILOR, key_sketch=key_sketch)
    with Engine(**options, enable_prefix_caching=False) as e:
        want = [e.generate(p, sampling_params=sp)["output_ids"] for p in chat]
        want_logprobs = forced_logprobs(e, chat[1])
    with Engine(**options) as e:
        got = [e.generate(p, sampling_params=sp) for p in chat]
        # in bf16 on the GPU the two-part attention after a shared prefix (merged by log-sum-exp) is not bitwise
        # the one-part attention, and greedy tokens may part after a dozen (at the 15th on the H100)
        agree = None if e.device.type == "cpu" else 8
        assert [g["output_ids"][:agree] for g in got] == [w[:agree] for w in want]
        first, second = (e.tokenize(p, None) for p in chat)
        common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        # every full block of the first prompt is final (the Q layer's tails are quantized into it already), and
        # all those common to both are shared, however close to the end of the second prompt; the first prompt's
        # partly filled last block too, up to where the prompts part
        assert common % TAILOR_BLOCK  # the prompts part inside a block
        assert (
            got[0]["meta_info"]["cached_tokens"] == 0
            and got[1]["meta_info"]["cached_tokens"] == common
        )
        if (
            e.device.type == "cpu"
        ):  # float32: the exact check, its document read back from the host tier
            assert_close_logprobs(forced_logprobs(e, chat[1]), want_logprobs)
        assert all_free(e)


def test_tailor_chat_turns_leave_nothing_behind(chat):
    """A second turn (document + first answer + new question) hits the document's blocks; then 40 requests sharing
    a prefix in four variants with a host tier too small to cache them all: afterwards every page of both tiers is
    free (cached blocks count as free) and no request state is left."""
    sp = {**GREEDY, "max_new_tokens": 4}
    with Engine(**{**TINY_TAILOR, "host_kv_gib": 9.5 * TINY_PAGE_GIB}) as e:
        turn1 = e.generate(chat[0], sampling_params=sp)
        turn2 = e.generate(
            input_ids=e.tokenize(chat[0], None) + turn1["output_ids"] + e.tokenize(" Why?", None),
            sampling_params=sp,
        )
        assert turn2["meta_info"]["cached_tokens"] >= 1024
        docs = [
            load_essays()[i * 2200 : i * 2200 + 2200] for i in range(4)
        ]  # ~500 tokens: one final block each
        prompts = [docs[i % 4] + f" Note {i}." for i in range(40)]
        outs = e.generate(prompts, sampling_params={**GREEDY, "max_new_tokens": 2})
        # the document's block, and (when not evicted) of its partial last block what the prompts have in common
        cached = [o["meta_info"]["cached_tokens"] for o in outs]
        assert sum(c >= TAILOR_BLOCK for c in cached) >= 20 and any(
            c % TAILOR_BLOCK for c in cached
        )
        assert (
            all_free(e)
            and not e.policy.prompt_len
            and not e.policy.s_state
            and not e.policy.q_state
        )


def test_a_thousand_requests_through_the_scheduler_leave_every_page_free():
    """1,000 requests with tailor's pools and blocks, partial ones too (random shared prefixes, random lengths, some
    aborted while waiting or running): when idle every pool reports all pages free and the cache holds at most what
    fits."""
    import random

    from tailorkv.scheduler.scheduler import Scheduler, Seq

    rng = random.Random(0)
    layout = KVLayout(
        [
            PoolSpec("slots", "gpu", 16, 1, 1, "request"),
            PoolSpec("qkv", "gpu", 400, 64, 1, "all"),
            PoolSpec("gen", "gpu", 12, 64, 1, "output"),
            PoolSpec("sketch", "gpu", 60, 256, 1, "prompt"),
            PoolSpec("host", "host", 60, 256, 1, "prompt"),
        ],
        prefix_blocks=(256, {"host": 1, "sketch": 1, "qkv": 4}),
        caches_output=False,
        partial_block_pool="host",
    )
    mm = MemoryManager(layout.pools, prefix=layout.prefix_blocks)
    # 16 answer tokens reserved at a time: pages grow as they decode, and retractions happen
    sched = Scheduler(mm, layout, max_running=12, chunk_tokens=4096, reserve_output=16)
    docs = [[rng.randrange(1000) for _ in range(1500)] for _ in range(8)]
    live, hits, partial_hits = {}, 0, 0
    for rid in range(1000):
        ids = docs[rng.randrange(8)][: rng.randrange(200, 1500)]
        ids += [rng.randrange(1000) for _ in range(rng.randrange(1, 300))]
        seq = Seq(rid, len(ids), rng.randrange(1, 100))
        sched.add(seq, ids)
        live[rid] = seq
        while len(sched.waiting) + len(sched.running) > 20 or (rid == 999 and sched.has_work):
            step = sched.schedule()
            if step is None:
                break
            hits += sum(s.cached_tokens > 0 for s, _ in step.admitted)
            partial_hits += sum(s.cached_tokens % 256 > 0 for s, _ in step.admitted)
            sched.advance(step)
            for s in step.seqs:
                if not s.prefilling:
                    s.tokens.append(rng.randrange(1000))  # the token sampled
                    if len(s.tokens) >= s.end_len or rng.random() < 0.01:  # done, or aborted
                        sched.finish(s.rid, None)
            if rng.random() < 0.02 and sched.waiting:  # abort one still waiting
                sched.finish(sched.waiting[-1].rid)
    assert (
        not sched.has_work and not mm.held and not mm.blocks and hits > 300 and partial_hits > 100
    )
    assert sched.num_retracted > 0  # the generated-token pool ran dry on the way
    assert all(t["free_pages"] == t["total_pages"] for t in mm.usage().values())
    assert len(mm.prefix.pages) <= 60 and not mm.prefix.refs
    assert all(
        mm.pools[p].num_free + sum(len(mm.prefix.pages[k].get(p, ())) for k in mm.prefix.evictable)
        == mm.pools[p].num_pages
        for p in mm.prefix.per_block
    )
    assert sum(len(v) for v in mm.prefix.partials.values()) == sum(
        k in mm.prefix._parent for k in mm.prefix.pages
    )


def test_tailor_rows_sharing_a_cached_document_in_one_step(chat, monkeypatch):
    """Once the document is cached, several questions about it prefill in one step and read the shared prefix
    once for all of them, its first pages from their GPU copies (room for some), the others from the host tier;
    each equals its answer without caching. With share_q_pages their decode rows form one group over the
    document's Q-layer pages."""
    groups = []
    find = quant_store.share_groups
    monkeypatch.setattr(
        quant_store, "share_groups", lambda *a: groups.append(find(*a)) or groups[-1]
    )
    sp = {**GREEDY, "max_new_tokens": 6}
    questions = [chat[0], chat[1], chat[1] + " Be brief.", chat[0] + " In one word."]
    with Engine(**TINY_TAILOR, enable_prefix_caching=False) as e:
        want = [r["output_ids"] for r in e.generate(questions[1:], sampling_params=sp)]
    # room for 1 copy in float32, 3 in bfloat16: fewer than the document's pages
    with Engine(**TINY_TAILOR, prefix_gpu_gib=1.5 * TINY_PAGE_GIB, share_q_pages=1) as e:
        n = e.memory.specs["copies"].num_pages
        e.generate(questions[0], sampling_params=sp)
        reads = []
        read_prefix = e.policy.offload.read_prefix
        e.policy.offload.read_prefix = lambda *a, **kw: reads.append(a[1]) or read_prefix(*a, **kw)
        got = e.generate(questions[1:], sampling_params=sp)
        # bf16 on the H100: the third row (continuing the first prompt's partial block) parts at its third token;
        # its next-token logits are as far from the uncached ones (max 0.38-0.69) as with full blocks only shared
        agree = None if e.device.type == "cpu" else 2
        assert [r["output_ids"][:agree] for r in got] == [w[:agree] for w in want]
        assert all(r["meta_info"]["cached_tokens"] >= 1024 for r in got)
        # dummy:tiny's GQA 2: groups of up to 8 rows; on the GPU a captured graph's padding row after the three
        members, shared = groups[-1]
        # the document's pages (its cached blocks' and the part of its last block the rows continue), 64 tokens each
        assert members[0].tolist()[:4] == [0, 1, 2, -1] and members[1:3, 0].tolist() == [0, 0]
        assert members[3:, 0].tolist() == list(range(3, len(members))) and not shared[3:].any()
        assert shared[:3].tolist() == [shared[0]] * 3 and shared[0] >= 1024 and shared[0] % 64 == 0
        assert len(reads) == e.config.num_layers  # one read per layer for the three rows
        assert (
            0 < n < reads[0].pages
            and reads[0].at.tolist() == list(range(n))
            and reads[0].host_runs[0][1] == n
        )
        assert all_free(e)


def test_page_runs_cover_the_pages_in_order():
    """A shared prefix is read back one copy per run of consecutive host pages."""
    from tailorkv.kvcache.offload_store import page_runs

    assert page_runs([4, 5, 6, 9, 10, 2]) == [(4, 0, 3), (9, 3, 2), (2, 5, 1)]
    assert page_runs([7]) == [(7, 0, 1)] and page_runs([]) == []


@pytest.mark.parametrize("key_sketch, copies", [(2, None), (0, 0)])
def test_tailor_next_turns_continue_their_partial_blocks_exactly(chat, key_sketch, copies):
    """Two users ask about one document; their next turns (their question, its answer and a new question) come in
    one step. Each continues its own first prompt's partly filled last block: its tokens are not computed again
    (cached_tokens: the whole first turn), they are read from that block's host page with the document (from their
    GPU copies by default, over PCIe without copies), and the answers equal those of an engine without caching."""
    sp = {**GREEDY, "max_new_tokens": 12}
    options = dict(TINY_TAILOR, key_sketch=key_sketch, prefix_gpu_gib=copies)

    def turns(e):
        first = e.generate(chat, sampling_params=sp)
        nxt = [
            e.tokenize(p, None) + o["output_ids"] + e.tokenize(" Why?", None)
            for p, o in zip(chat, first)
        ]
        return first, nxt, e.generate(input_ids=nxt, sampling_params=sp)

    with Engine(**options, enable_prefix_caching=False) as e:
        want = [o["output_ids"] for o in turns(e)[2]]
    with Engine(**options) as e:
        reads = []
        read_prefix = e.policy.offload.read_prefix
        e.policy.offload.read_prefix = lambda *a, **kw: reads.append(a[1]) or read_prefix(*a, **kw)
        first, nxt, got = turns(e)
        agree = None if e.device.type == "cpu" else 8
        assert [g["output_ids"][:agree] for g in got] == [w[:agree] for w in want]
        for p, o in zip(chat, got):
            n = len(e.tokenize(p, None))
            assert n % TAILOR_BLOCK and o["meta_info"]["cached_tokens"] == n
        last = reads[
            -1
        ]  # the second turns: the document's pages, then one page per user's partial block
        ids = [e.tokenize(p, None) for p in chat]
        common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
        assert len(reads) == 2 * e.config.num_layers and last.pages == common // TAILOR_BLOCK + 2
        if copies is None:  # every page from its copy, the partial blocks' too, one gather
            assert not last.host_runs and last.at.tolist() == list(range(last.pages))
        else:  # over PCIe, one copy per run of consecutive pages
            assert last.at is None and sum(n for *_, n in last.host_runs) == last.pages
        assert all_free(e)


def test_tailor_chunks_after_a_cached_prefix(chat):
    """Both questions prefill in chunks of 100 tokens: the second continues the first's cached blocks and partial
    block, then its own earlier chunks (read back from their GPU copies); the tokens equal those of whole-prompt
    prefill without caching."""
    sp = {**GREEDY, "max_new_tokens": 8}
    small = {**TINY_TAILOR, "kv_cache_gib": 0.05, "prefix_gpu_gib": 16 * TINY_PAGE_GIB}
    with Engine(**small, enable_prefix_caching=False) as e:
        want = [e.generate(p, sampling_params=sp)["output_ids"] for p in chat]
    with Engine(**small, chunked_prefill_size=100) as e:
        reads = []
        read_prefix = e.policy.offload.read_prefix
        e.policy.offload.read_prefix = lambda *a, **kw: reads.append(a[1]) or read_prefix(*a, **kw)
        got = [e.generate(p, sampling_params=sp) for p in chat]
        assert all(r.at is not None and not r.host_runs for r in reads)  # all from GPU copies
        assert [g["output_ids"] for g in got] == want
        assert got[1]["meta_info"]["cached_tokens"] % TAILOR_BLOCK  # a partial block's tokens too
        assert all_free(e)


def test_an_abort_in_the_middle_of_a_chunked_prefill_frees_everything(chat):
    """A prompt aborted after two chunks of 300 tokens returns every page; the GPU copies of its pages go, but for
    those of its two computed blocks, which the prefix cache keeps and the next request reads."""
    options = {"kv_cache_gib": 0.05, "prefix_gpu_gib": 16 * TINY_PAGE_GIB}
    with Engine(**{**TINY_TAILOR, **options}, chunked_prefill_size=300) as e:
        ids = e.tokenize(chat[0], None)
        req = e.add_request(ids, SamplingParams(max_new_tokens=4))
        e.step()
        e.step()
        copies = e.policy.offload.copies
        assert req.seq.prefilling and copies.num_pages == 3
        e.abort(req.rid)
        assert all_free(e) and not e.policy.s_state and not e.policy.q_state
        assert copies.num_pages == 2
        out = e.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 1})
        assert out["meta_info"]["cached_tokens"] == 2 * TAILOR_BLOCK and all_free(e)
