"""GPU copies of host-tier pages (DeviceCopies): which pages hold a slot, and that a prefix read from copies (all or
some of its pages) equals the host tier's rows, also after a page is written again; a decode step's top-k fetch
reads pages with a copy from it."""

import torch

from tailorkv.kernels import host_copy
from tailorkv.kvcache.offload_store import DecodeView, OffloadState, OffloadStore, page_runs
from tailorkv.kvcache.prompt_rows import PromptRows
from tailorkv.memory.device_copies import DeviceCopies


def _readable_is_slot(c: DeviceCopies) -> None:
    """readable (what decode fetches index) says what slot() says, -1 for None."""
    pages = torch.arange(20)
    assert c.readable(pages).tolist() == [-1 if c.slot(p) is None else c.slot(p) for p in range(20)]


def test_written_pages_take_slots_and_the_least_recently_used_unneeded_copy_goes():
    c = DeviceCopies(3)
    c.plan([], [10, 11])
    _readable_is_slot(c)
    c.plan([10], [12, 13])  # 10 is read (kept and used most recently); 13 takes 11's slot
    assert c.slot(11) is None and c.num_pages == 3 and len({c.slot(p) for p in (10, 12, 13)}) == 3
    _readable_is_slot(c)
    s12 = c.slot(12)
    c.plan(
        [10, 12, 13], [14, 12]
    )  # every copy is needed in this step: 14 gets none, 12 (written again) keeps its
    assert c.slot(14) is None and c.slot(12) == s12
    assert c.slots_of(torch.tensor([14, 12])).tolist() == [c.scratch, s12]
    c.plan([], [15])  # 10 was used least recently
    assert c.slot(10) is None and c.slot(15) is not None
    _readable_is_slot(c)


def test_a_page_read_and_written_without_a_copy_is_read_from_the_host_once_and_forgotten_pages_free_slots():
    """A prompt's partly computed page is read (its next chunk's tail) and written in one step: without a copy its
    read in that step comes from the host tier (the copy is filled by the step's write); later steps read the
    copy, so that every page of a prompt chunked at any size keeps one."""
    c = DeviceCopies(3)
    c.plan([3], [3, 4])
    assert c.slot(3) is None and c.slot(4) is not None
    s3 = int(c.slots_of(torch.tensor([3])))  # the step's write fills its new slot
    assert s3 != c.scratch
    assert c.reads(((3, 0, 1),), "cpu").host_runs == ((3, 0, 1),)
    _readable_is_slot(c)
    c.plan([4], [4, 5])  # with a copy it keeps it; 3's copy was filled by the last step
    assert c.slot(3) == s3 and c.slot(4) is not None and c.slot(5) is not None
    assert c.reads(((3, 0, 2),), "cpu").host_runs == ()
    _readable_is_slot(c)
    c.forget([4, 9])
    assert c.slot(4) is None and c.num_pages == 2
    _readable_is_slot(c)
    c.plan([], [6])
    assert c.slot(6) is not None and c.num_pages == 3


def test_reads_split_into_host_runs_and_copies():
    c = DeviceCopies(4)
    c.plan([], [5, 7, 8])
    r = c.reads(((4, 0, 5), (20, 5, 1)), "cpu")  # pages 4..8, then 20
    assert r.pages == 6 and r.host_runs == ((4, 0, 1), (6, 2, 1), (20, 5, 1))
    assert r.at.tolist() == [1, 3, 4] and r.slots.tolist() == [c.slot(5), c.slot(7), c.slot(8)]
    none = DeviceCopies(0).reads(((4, 0, 5),), "cpu")
    assert none.at is None and none.host_runs == ((4, 0, 5),)


def _store(copy_slots: int) -> OffloadStore:
    return OffloadStore(
        2, 8, 2, 4, 3, 64, 4, 4, "cpu", torch.float32, extra_row_layers=1, copy_slots=copy_slots
    )


def _write(store: OffloadStore, pages: list[int], n: int, seed: int) -> None:
    """A prompt of n tokens into host pages `pages`, every row layer (the prefill's writes)."""
    torch.manual_seed(seed)
    store.copies.plan([], pages)
    rows = PromptRows.build(
        [OffloadState(pages, [0], 0, n, 4, 4)], [n], 0, store.window, "cpu", store.copies
    )
    for layer in range(3):
        k, v = torch.randn(2, n, 3, 64)
        store.store_rows(layer, rows, k, v)


def test_a_prefix_read_from_copies_equals_the_host_rows():
    store = _store(copy_slots=3)
    _write(store, [5, 2, 7, 0], 1000, seed=0)  # four pages, three slots: page 0 gets no copy
    assert store.copies.slot(0) is None and all(store.copies.slot(p) is not None for p in (5, 2, 7))
    _write(store, [2], 200, seed=1)  # page 2 written again (a freed page reused), through its copy
    for pages in (
        [5, 2, 7, 0],
        [5, 2, 7],
        [2, 0, 5],
        [0],
    ):  # copies and host runs, copies only, host only
        reads = store.copies.reads(tuple(page_runs(pages)), "cpu")
        for layer in range(3):
            got = store.read_prefix(
                layer, reads, torch.full((len(pages), *store.row_shape), float("nan"))
            )
            assert torch.equal(got, store.rows[layer][pages])
            # pages whose copies follow one another in the slots are read in place
            in_place = (
                got.data_ptr() == store.copy_rows[layer][store.copies.slot(pages[0])].data_ptr()
            )
            assert in_place == (pages == [5, 2, 7])
    assert store.copies.reads(tuple(page_runs([5, 2, 7])), "cpu").host_runs == ()


def test_a_decode_fetch_reads_pages_with_a_copy_there_and_sees_copies_change():
    """The fetch equals the host rows; altering the copies alters exactly the rows of pages that have one (so they
    are what it reads); once a page's copy is forgotten the next step's view reads it from the host again."""
    store = _store(copy_slots=3)
    pages = [5, 2, 7, 0]
    _write(store, pages, 1000, seed=0)  # page 0 gets no copy
    st = OffloadState(pages, [0], 0, 1000, 4, 4)
    st.n = 1000
    view = DecodeView(1, 4, 64, store.window, 2, "cpu")
    view.fill([st], store.scratch_slot, store.scratch_gen, store.decode_copies)
    slots = [store.copies.slot(p) for p in pages[:3]]
    assert view.copy_slots.tolist() == [[*slots, -1]]
    idx = torch.randint(0, 1000, (1, 3, 200), generator=torch.Generator().manual_seed(3))
    on_copy = (idx // 256 < 3)[..., None]
    for layer in range(2):
        host = host_copy.gather_rows(store.rows[layer], view.host_pages, idx)
        assert torch.equal(store.fetch_rows(layer, view, idx), host)
        store.copy_rows[layer] += 1
        got = store.fetch_rows(layer, view, idx)
        assert torch.equal(got, torch.where(on_copy, host + 1, host))
    store.copies.forget([5])
    view.fill([st], store.scratch_slot, store.scratch_gen, store.decode_copies)
    assert view.copy_slots.tolist() == [[-1, *slots[1:], -1]]


def test_resident_pages_have_their_own_slots_for_good():
    """Host pages [4, 7) past 4 pinned ones: fixed slots after the 2 kept by recent use, never planned, taken or
    forgotten; their host index is the host tier's scratch page (4); prefix reads take them from their copies."""
    c = DeviceCopies(2, pinned=4, resident=3)
    assert c.scratch == 5 and [c.slot(p) for p in (4, 5, 6)] == [2, 3, 4] and c.num_pages == 3
    _readable_is_slot(c)
    # pinned pages 0 and 1 take the 2 slots, 2 none; no resident page takes one
    c.plan([4], [5, 6, 0, 1, 2])
    assert [c.slot(p) for p in (4, 5, 6)] == [2, 3, 4] and c.slot(2) is None
    assert {c.slot(0), c.slot(1)} == {0, 1}
    c.forget([4, 5, 1])
    assert c.slot(4) == 2 and c.slot(1) is None
    _readable_is_slot(c)
    assert c.slots_of(torch.tensor([6, 0, 2])).tolist() == [4, c.slot(0), c.scratch]
    assert c.host_index(torch.tensor([-1, 0, 3, 4, 6])).tolist() == [-1, 0, 3, 4, 4]
    r = c.reads(((3, 0, 3),), "cpu")  # page 3 (pinned, no copy), then 4 and 5 (resident)
    assert r.host_runs == ((3, 0, 1),) and r.at.tolist() == [1, 2] and r.slots.tolist() == [2, 3]
    # none resident: as they are
    assert DeviceCopies(2).host_index(torch.tensor([9])).tolist() == [9]
