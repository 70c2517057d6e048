"""bench_topk_reuse: the counter's arithmetic on hand-made fetches, and the script end to end on dummy:tiny."""

import json
from types import SimpleNamespace

import torch

from benchmarks import bench_topk_reuse


def test_the_counter_counts_positions_the_slots_last_fetch_at_that_layer_had():
    store = SimpleNamespace(fetch_rows=lambda layer, view, idx, valid=None: idx)
    counter = bench_topk_reuse.ReuseCounter(store)
    view = SimpleNamespace(  # two rows (slots 5 and 2), positions [8, 100) are the middle range
        slots=torch.tensor([5, 2]), mid_begin=torch.tensor([8, 8]), mid_end=torch.tensor([100, 100])
    )
    first = torch.tensor([[[10, 11, 12]], [[20, 21, 22]]])  # [rows, KV heads, k]
    assert store.fetch_rows(0, view, first) is first  # the fetch itself still runs
    assert store.fetch_rows(1, view, first + 30) is not None  # another layer: its own last fetch
    # slot 5 keeps 10 and 12 (3 is outside the range: not counted); slot 2 keeps 21 of 20, 21, 22
    store.fetch_rows(0, view, torch.tensor([[[10, 3, 12]], [[21, 40, 41]]]))
    assert (counter.fetched[0], counter.kept[0], counter.fetched[1]) == (5, 3, 0)
    counter.reset()
    store.fetch_rows(0, view, first)
    assert (counter.fetched[0], counter.kept[0]) == (5, 3)


def test_script_writes_a_row_per_policy(tmp_path):
    out = tmp_path / "reuse.json"
    rows = bench_topk_reuse.main(
        "--model dummy:tiny --device cpu --samples 2 --prompt-tokens 700 --forced-tokens 6 --chunk 512 "
        "--host-kv-gib 0.05 --kv-cache-gib 0.05 "
        f"--policies tailor::quant_layers=[0],tailor::quant_layers=[0]:top_k=400 --output {out}".split()
    )
    assert json.loads(out.read_text()) == rows
    small, large = rows
    assert (small["policy"], large["options"]["top_k"], small["samples"]) == ("tailor", 400, 2)
    assert 0 < small["fetched"] < large["fetched"] and 0 <= small["reuse"] <= 1
    assert set(small["reuse_by_layer"]) == set(large["reuse_by_layer"]) and small["reuse_by_layer"]
    # k of 400 of a ~690-token middle range: two steps' choices must share rows
    assert large["reuse"] > 0.15
