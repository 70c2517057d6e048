"""share_q_pages: decode rows that begin with the same Q-layer pages (a document the prefix cache shares) are found
in groups, and the paged kernel attends their common pages once a group with the same result."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import kivi
from tailorkv.kvcache.quant_store import QuantState, QuantStore, QuantView, share_groups
from tailorkv.kvcache.tailor_config import TailorConfig


def _pages(*rows):
    return [torch.tensor(r) for r in rows]


@pytest.mark.parametrize(
    "group,members,shared",
    [
        # rows 0 and 1 share three pages; row 2 is left alone, its group of one; row 4 has less than a page packed
        (2, [[0, 1], [0, -1], [2, -1], [3, -1], [4, -1], [5, -1]], [192, 192, 0, 0, 0, 0]),
        # rows 0-2 in one group: what all three share, row 2's two pages
        (3, [[0, 1, 2], [0, -1, -1], [0, -1, -1], [3, -1, -1], [4, -1, -1], [5, -1, -1]], [128] * 3 + [0] * 3),
    ],
)  # fmt: skip
def test_rows_that_begin_with_the_same_pages_form_groups(group, members, shared):
    pages = _pages([5, 2, 7, 0], [5, 2, 7, 9], [5, 2, 3], [8, 1], [5, 2, 7, 0], [6])
    got = share_groups(pages, [256, 256, 192, 128, 40, 256], group)
    assert got[0].tolist() == members and got[1].tolist() == shared


def test_packed_tokens_bound_what_a_group_shares():
    """The same four pages, but one member has only 130 tokens packed (K or V): two whole pages are shared."""
    members, shared = share_groups(_pages([1, 2, 3, 4], [1, 2, 3, 4]), [256, 130], 4)
    assert members[0].tolist() == [0, 1, -1, -1] and shared.tolist() == [128, 128]


def test_the_first_member_that_differs_bounds_the_rest():
    """Row 1 parts from the leader after two pages, row 2 after three: the group shares two pages."""
    _, shared = share_groups(_pages([1, 2, 3, 4], [1, 2, 9, 4], [1, 2, 3, 8]), [256] * 3, 4)
    assert shared.tolist() == [128] * 3


def test_rows_sharing_a_prefix_decode_as_alone_through_the_kernel(monkeypatch):
    """Three requests continue one 460-token prompt's first 384 / 256 tokens from its pages (the prefix cache's
    sharing), a fourth shares nothing; a QuantView with share_rows finds the three and the Triton kernel (in the
    interpreter on CPU), one page a split, attends their 256 common tokens once (the members' own tables for them
    are not read): each row's output is the reference's, step after step."""
    kt = triton_module("kivi_triton")
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", 4096)
    torch.manual_seed(4)
    h, d, r = 1, 64, 128
    cfg = TailorConfig.from_options("ruler", quant_bits=2)
    store = QuantStore(1, 40, 5, h, d, cfg, DEVICE, torch.float32)
    k, v = torch.randn(2, 470, h, d, device=DEVICE)
    first = QuantState(list(range(9)), 0, DEVICE, 460)
    store.prefill(0, first, k[:460], v[:460])
    states = [first]
    for slot, (start, n, own) in enumerate([(384, 430, [9, 10]), (256, 400, [11, 12, 16])], 1):
        st = QuantState(list(range(start // 64)) + own, slot, DEVICE, n)
        store.prefill(0, st, k[start:n], v[start:n], start, (k[:start], v[:start]))
        states.append(st)
    states.append(QuantState([13, 14, 15], 3, DEVICE, 150))
    store.prefill(0, states[-1], k[:150], v[:150])
    for st in states:
        st.advance(st.prompt_len, r)
    view = QuantView(5, 9, r, DEVICE, share_rows=5)
    q = torch.randn(5, 3 * h, d, device=DEVICE)
    for step in range(2):
        view.fill(states, r, store.scratch_page, store.scratch_slot)
        assert view.members[:, :3].tolist() == [
            [0, 1, 2],
            [0, -1, -1],
            [0, -1, -1],
            [3, -1, -1],
            [4, -1, -1],
        ]
        assert view.shared.tolist() == [256, 256, 256, 0, 0]
        pos = [st.n for st in states]
        store.append(0, view, *torch.randn(2, 5, h, d, device=DEVICE))
        want = kivi.paged_decode_attention(
            q, *(x[0] for x in (store.k_packed, store.k_scale, store.k_zero, store.v_packed,
                                store.v_scale, store.v_zero, store.k_tail, store.v_win)),
            view.pages, view.slots, view.lengths, 2, d**-0.5,
        )  # fmt: skip
        # the members' page tables inside the shared prefix are not read: the leader's serve the group
        view.pages[1:3, :4] = torch.tensor([13, 14, 15, 16])
        store.ops = kt
        got = store.decode_attention(0, view, q)
        store.ops = kivi
        torch.testing.assert_close(got[:4], want[:4], atol=1e-4, rtol=1e-4)
        for st, n in zip(states, pos):
            st.advance(n + 1, r)
