"""`full`'s decode rows that share a document's pages (the prefix cache gave them the same blocks) read them once per
group (SharedPrefixDecode, cascade attention): which rows group, and the logprobs of an engine that shares
nothing."""

import pytest
import torch

from tailorkv import Engine
from tailorkv.errors import ConfigError
from tailorkv.kvcache.full import MIN_SHARED_PAGES, FullPolicy, shared_groups


def test_rows_group_by_the_pages_they_begin_with():
    doc, other = torch.arange(100, 140), torch.arange(200, 240)
    tables = [
        torch.cat([doc, torch.tensor([1, 2])]),
        torch.cat([doc[:35], torch.tensor([3])]),  # shares 35 pages
        torch.cat([other, torch.tensor([4])]),  # alone with its first page
        torch.cat([doc, torch.tensor([5])]),
        torch.cat([doc[:20], torch.tensor([6])]),  # too short to group
    ]
    counts = [len(t) for t in tables]
    assert shared_groups(tables, counts) == [([0, 1, 3], 35)]
    # two rows with all pages in common keep their last one
    same = [torch.cat([doc, torch.tensor([7])])] * 2
    assert shared_groups(same, [41, 41]) == [([0, 1], 40)]
    assert shared_groups(tables[:1] + tables[2:3], [42, 41]) == []
    assert MIN_SHARED_PAGES == 32


def test_users_of_one_document_decode_the_logprobs_of_rows_that_read_their_own_pages(monkeypatch):
    """A 540-token document (34 pages of 16) read by one request, then three questions after it, each continued by
    8 teacher-forced tokens, decoding together: they share its pages and decode through SharedPrefixDecode (every
    decode step of the three); the same batch again with grouping turned off reads each row's pages apart.
    float32: the forced tokens' logprobs to 1e-4 (greedy tokens of dummy:tiny stayed equal with a page of the
    document left unread)."""
    from tailorkv.kvcache import full

    planned = []
    plan = FullPolicy._plan_cascade
    monkeypatch.setattr(
        FullPolicy,
        "_plan_cascade",
        lambda self, d, b: planned.append(plan(self, d, b)) or planned[-1],
    )
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()  # noqa: E731
    doc = words(540)
    prompts, forced = [doc + words(n) for n in (5, 21, 40)], [words(8) for _ in range(3)]
    with Engine(model="dummy:tiny", device="cpu", progress=False, kv_cache_gib=0.05) as e:
        e.generate(input_ids=doc + [7, 8, 9], sampling_params={"max_new_tokens": 1})
        planned.clear()
        grouped = [r.output_logprobs for r in e.forced(prompts, forced)]
        assert planned.count(True) >= 7, planned  # every step with the three decoding
        monkeypatch.setattr(full, "shared_groups", lambda tables, counts: [])
        apart = [r.output_logprobs for r in e.forced(prompts, forced)]
    assert [len(x) for x in grouped] == [8] * 3
    assert max(abs(a - b) for x, y in zip(grouped, apart) for a, b in zip(x, y)) < 1e-4


def test_cascade_0_decodes_every_row_from_its_own_pages(monkeypatch):
    """`full::cascade=0` (--cascade-attention 0): rows that share a document plan no groups; the option is refused
    with a one-line error where it means nothing or takes a value other than 0 and 1."""
    planned = []
    monkeypatch.setattr(FullPolicy, "_plan_cascade", lambda self, d, b: planned.append(1) or False)
    doc = list(range(100, 640))
    with Engine(
        model="dummy:tiny", device="cpu", progress=False, kv_cache_gib=0.05, cascade=0
    ) as e:
        assert e.policy.cascade is None
        e.generate(input_ids=doc + [7], sampling_params={"max_new_tokens": 1})
        e.generate(input_ids=[doc + [n] for n in (8, 9)], sampling_params={"max_new_tokens": 4})
    assert not planned
    for policy, value, said in (
        ("full", 2, "cascade must be 0 or 1"),
        ("quest", 1, "reads no shared pages"),
    ):
        with pytest.raises(ConfigError, match=said):
            Engine(
                model="dummy:tiny", device="cpu", progress=False, kv_policy=policy, cascade=value
            )
