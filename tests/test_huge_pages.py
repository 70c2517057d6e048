"""The host tier in transparent huge pages (issue 22 item 3, "huge pages" for the top-k fetch): host_tensor advises
the kernel before anything touches the memory, and the tier's pages come as 2 MiB pages where the kernel allows."""

import re
from pathlib import Path

import pytest
import torch

from tailorkv.memory.host_memory import HUGE_PAGE, advise_huge_pages, host_tensor

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODE = re.search(r"\[(\w+)\]", THP.read_text()).group(1) if THP.exists() else "never"


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s memory that the kernel maps with huge pages (/proc/self/smaps AnonHugePages)."""
    lo_t, hi_t = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < hi_t and hi > lo_t
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(MODE == "never", reason="transparent huge pages are off on this machine")
def test_the_host_tier_is_in_huge_pages():
    t = host_tensor((64 << 20,), torch.uint8, pinned=False)
    t.fill_(1)
    assert huge_bytes(t) >= (64 << 20) - 2 * HUGE_PAGE  # all but the unaligned ends
    if MODE == "madvise":  # without the advice, none
        plain = host_tensor((64 << 20,), torch.uint8, pinned=False, huge_pages=False)
        plain.fill_(1)
        assert huge_bytes(plain) == 0


def test_too_small_a_range_is_not_advised():
    t = torch.empty(HUGE_PAGE, dtype=torch.uint8)
    assert not advise_huge_pages(t.data_ptr() + 1, HUGE_PAGE - 1)
