"""A policy's KVLayout (pools, admission cost, prefix blocks) on dummy:tiny, for 64 MiB of GPU and 256 MiB of host
memory: the values below were recorded from the policies before the layout was split out of them."""

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
            "qkv": ("gpu", 10086, 64, 1792),
            "gen": ("gpu", 39, 64, 98304),
            "sketch": ("gpu", 2511, 256, 15360),
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
            "qkv": ("gpu", 5105, 64, 1792),
            "gen": ("gpu", 19, 64, 98304),
            "sketch": ("gpu", 1271, 256, 15360),
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
            "qkv": ("gpu", 14085, 64, 1792),
            "gen": ("gpu", 54, 64, 98304),
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
