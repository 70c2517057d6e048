"""FlashInfer's paged decode attention over full-precision pages [P, page_size, Hkv, D] (GPU only; imported lazily,
never needed on CPU, where grouped_attention in attention.py is the reference), and its cascade form for rows that
share leading pages (attention.SharedPrefixDecode is that one's reference)."""

from __future__ import annotations

import importlib.util

import torch

WORKSPACE_BYTES = 128 << 20


# what FlashInfer's kernels compile for; other head dims take the torch references
HEAD_DIMS = (64, 128, 256)


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim in HEAD_DIMS
        and importlib.util.find_spec("flashinfer") is not None
    )


class PinnedPlan:
    """Runs a FlashInfer plan, which writes the wrapper's page-locked buffer for a copy that the stream runs later:
    first it waits for the copy of the plan before (the overlap schedule plans a step while the one before runs)."""

    def __init__(self):
        self.copied: torch.cuda.Event | None = None

    def __call__(self, plan, *args, **kwargs) -> None:
        if self.copied is not None:
            self.copied.synchronize()
        plan(*args, **kwargs)
        self.copied = torch.cuda.Event()
        self.copied.record()


class PagedDecode:
    """One wrapper per engine: `plan` once per step (the decode rows' page lists), `run` once per layer."""

    def __init__(
        self,
        device: torch.device,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
    ):
        import flashinfer

        self.shape = (num_qo_heads, num_kv_heads, head_dim, page_size)
        self.dtype, self.device = dtype, device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # tensor-core kernels for wide GQA groups (the CUDA-core decode kernels favour groups of 1-2)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=num_qo_heads // num_kv_heads > 2
        )
        self._plan = PinnedPlan()

    def plan(self, pages: list[torch.Tensor], lengths: list[int]) -> None:
        """Row i reads the first lengths[i] tokens of its pages[i] (page ids on the device)."""
        hq, hkv, d, ps = self.shape
        counts = [-(-n // ps) for n in lengths]
        indptr = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        last = torch.tensor([n - (c - 1) * ps for n, c in zip(lengths, counts)], dtype=torch.int32)
        indices = torch.cat([p[:c] for p, c in zip(pages, counts)]).to(
            device=self.device, dtype=torch.int32
        )
        self._plan(
            self.wrapper.plan,
            indptr,
            indices,
            last,
            hq,
            hkv,
            d,
            ps,
            data_type=self.dtype,
            q_data_type=self.dtype,
        )

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] -> [B, Hq, D] over the planned pages of k_pages, v_pages [P, page_size, Hkv, D]."""
        return self.wrapper.run(q, (k_pages, v_pages))


class SharedPrefixDecode:
    """Same contract as attention.SharedPrefixDecode: every row over its own pages by the paged decode kernel, each
    group's queries over their shared pages by the paged prefill kernel (not causal: a group's queries read the
    pages once, on tensor cores), merged by flashinfer.merge_state_in_place."""

    def __init__(
        self,
        device: torch.device,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
    ):
        import flashinfer

        self.own = PagedDecode(device, num_qo_heads, num_kv_heads, head_dim, page_size, dtype)
        # the two kernels run one after the other: they share the float workspace. FA2, not the FA3 kernels that
        # "auto" picks on Hopper: FA3's schedule gives each query head's tile of queries one CTA over all the keys and
        # never splits them, so 16 rows of 32 query heads were 32 CTAs, each reading the whole document of its KV
        # head (full's doc chat at 40.5 ms a token on the H100, 31.1 without the cascade); FA2 packs a KV head's
        # query heads into one tile and splits the pages across the SMs, reading the document once
        self.shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.own.workspace, "NHD", backend="fa2"
        )
        self._plan = PinnedPlan()

    def plan(
        self,
        groups: list[tuple[list[int], torch.Tensor]],
        pages: list[torch.Tensor],
        lengths: list[int],
    ) -> None:
        self.own.plan(pages, lengths)
        hq, hkv, d, ps = self.own.shape
        i32 = dict(dtype=torch.int32)
        rows = [r for r, _ in groups]
        # every row in one group, in order (doc chat's users of one document): the pass and the merge run on q and out
        # themselves, without gathering the group's rows and scattering them back (four kernels a layer fewer)
        self.grouped = None
        if rows != [list(range(len(pages)))]:
            # through pinned memory: a plain copy would wait for the steps queued before it
            grouped = torch.tensor([i for r in rows for i in r]).pin_memory()
            self.grouped = grouped.to(self.own.device, non_blocking=True)
        self._plan(
            self.shared.plan,
            torch.tensor([0, *map(len, rows)], **i32).cumsum(0, **i32),
            torch.tensor([0, *(p.numel() for _, p in groups)], **i32).cumsum(0, **i32),
            torch.cat([p for _, p in groups]).to(self.own.device, **i32),
            torch.full((len(groups),), ps, **i32),
            hq,
            hkv,
            d,
            ps,
            causal=False,
            q_data_type=self.own.dtype,
            kv_data_type=self.own.dtype,
        )

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        import flashinfer

        out, lse = self.own.wrapper.run(q, (k_pages, v_pages), return_lse=True)
        if self.grouped is None:
            shared, shared_lse = self.shared.run(q, (k_pages, v_pages), return_lse=True)
            flashinfer.merge_state_in_place(out, lse, shared, shared_lse)
            return out
        shared, shared_lse = self.shared.run(q[self.grouped], (k_pages, v_pages), return_lse=True)
        mine, mine_lse = out[self.grouped], lse[self.grouped]
        flashinfer.merge_state_in_place(mine, mine_lse, shared, shared_lse)
        out[self.grouped] = mine
        return out
