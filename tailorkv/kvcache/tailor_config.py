"""TailorConfig: every TailorKV number in one place, with the paper's names and presets (research notes §6).

- quant_layers: the quantization-friendly ("Q") layers; None = the model's shipped or calibrated plan.
- quant_bits, group_size, residual: KIVI settings of the Q layers (1/2/4 bits, groups of 64, 128 fp tokens).
- sink, recent, top_k: the sparsity-friendly ("S") layers attend to sink + recent prompt tokens kept on the
  GPU, the top_k dominant prompt tokens fetched from the host tier each step, and every generated token.
  Preset `auto` (the default for real models): the ruler preset's window, d_s and bits, and top_k per layer and
  context from the model's BudgetPlan (kvcache/budget.py; top_k given as well: that k for every layer).
- d_s: key channels per KV head that stage 1 selects and stage 2 scores tokens on.
- key_sketch (beyond the paper): 0 = the paper's retrieval (stage 1 reads d_s channels of every prompt key over
  PCIe); 1 or 2 = S layers also keep a KIVI copy of the prompt's K at that many bits in the GPU tier, stage 1 picks
  the channels with the real query and stage 2 scores tokens from the sketch, so only the top-k rows cross PCIe.
  Default 2: within 1 point of the paper's path on the accuracy benchmark, 1.4x faster at 128k
  (benchmarks/NOTES.md, "Key sketch").
- speculative_fetch (beyond the paper; needs a key sketch): 1 = S layer l+1's two stages and top-k fetch run at
  layer l's input with the query predicted from it (as the paper's stage 1 predicts), on a side stream while layer
  l computes; attention still uses the real query over the rows so chosen. 0 (default): chosen with the real query.
- radix_topk (beyond the paper): N = on CUDA, stage 2's top-k by radix select in decode steps of at most N
  sequences, the rows in position order (kernels/token_topk_triton.py: four histogram passes, a count and a
  write); in larger steps, with 0, or on CPU: by topk_chunk's blocks or torch.topk (rank order). The same tokens
  (ties aside). Default 1: on the H100 at 128k and batch 1 it took 9.94 ms a step against 10.39 by blocks of 32
  (same run, 1f182bc); in CUDA graphs its calls take ~9x as long for 12x the rows, torch.topk's ~3x.
- topk_chunk (beyond the paper): 0 = stage 2's top-k over each row's whole context; N = the k blocks
  of N positions with the largest maxima first, then the top k of their positions: the same tokens (ties aside)
  from two short top-ks instead of one over a long row. On CUDA, where the tiles hold the shape (k * N and the
  blocks at most 8,192), one program a row does both after the block maxima (kernels/block_topk_triton.py: the
  exact set, ties lowest position first, in position order); else Selection.two_stage_topk (the mask and the
  blocks' maxima one pass over the scores, kernels/block_maxima_triton.py on CUDA, then torch.topk twice).
  N = 64 leaves k * 64 candidates. Default 32 (measured before the one-program kernel):
  on the H100 (benchmarks/NOTES.md, 2026-12-06, third session) it beat torch.topk in every batched step measured:
  doc chat's step (16 x 64k) 13.76 against 16.99 ms, the doc chat server's median TPOT 16.01 against 20.76, batch
  16 at 32k with fp8 rows 14.42 against 15.69; blocks of 16 lost (18.44).
- share_q_pages (beyond the paper): 1 = in a decode step, rows whose leading Q-layer pages are the same pages (a
  document the prefix cache shares) are attended over them once per group of up to 16 // GQA rows, the group's
  query heads in one tile of the paged kernel (kernels/kivi_triton.py), where each row dequantized them for
  itself; the same result. Default 1: doc chat's step (16 rows, 64k document) on the H100 took 13.03 ms against
  13.99, its Q layer 1.05 against 2.03 (same run, 232067c). The splits count one program a group (rows // (16 //
  GQA)), so rows that share nothing get up to 16 // GQA times the splits.
- position_order (beyond the paper): N = in decode steps of at least N rows (a captured step's padded rows), the
  top-k positions of two_stage_topk or torch.topk (rank order) are sorted into position order before the fetch, as
  the radix select and block_topk's kernel give them; 0 = never. The same rows; one sort a layer. Default 40: on
  the H100 with fp8 rows at 32k (232067c, same runs), batch 40 stepped in 38.97 ms against 41.48 (its fetch, 70%
  over PCIe, 18.68 against 21.98 ms), batch 16 (74% of its rows from GPU copies) in 15.31 against 14.56;
  bench_uva_gather: 11.7 against 9.6 GB/s at batch 40.
- host_kv_dtype (beyond the paper): "auto" = the host tier's token rows in the compute dtype; "fp8" = float8 e4m3
  with a per-token, per-KV-head scale (kernels/host_fp8.py): half the host bytes per token, so twice the requests
  per --host-kv-gib; decode's top-k rows cross PCIe in 8 bits. Prompt-time reads of host rows (shared prefix,
  chunked prefill, GPU copies) see the dequantized values: exactness against full attention holds for "auto" only.
- gpu_rows_gib (beyond the paper): N = N GiB of the GPU budget hold the prompt rows of requests past what the host
  tier holds: host-pool pages whose rows live in the GPU tier alone (memory/device_copies.py), read by the top-k
  fetch from HBM. For throughput on a host whose page-locked memory bounds the batch (128k on an 80 GiB H100: 11
  requests in 90 GiB of fp8 rows). Default 0; needs the key sketch.
- reuse_rows (beyond the paper): N = each running request keeps, per S layer and KV head, the first N rows its last
  decode step fetched on the GPU (N x (row + 8) bytes each, in its slot's share of the budget); the next step's fetch
  reads those it selects again there instead of over PCIe: the same bytes. On the embedded model at 6k tokens,
  66-77% of a step's top-k rows were the step before's too (benchmarks/bench_topk_reuse.py; the fetch was 43% of
  the 128k step at 13 requests, H100). Default 0 (off) until a GPU measures it.
- fp8_row_align: an fp8 host row padded to a multiple of 4 bytes (2D + 4, the default) or 16 (2D + 16: every row
  16-byte aligned, so the top-k fetch reads it over PCIe in 16-byte loads where 2D + 4 takes 4-byte ones; 4.6% more
  host bytes at head_dim 128), for whichever measures faster (benchmarks/bench_uva_gather.py --rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError
from ..kernels import host_fp8
from .budget import MAX_TOP_K

PRESETS = {
    "longbench": dict(sink=8, recent=56, top_k=128, d_s=8, quant_bits=1),
    "ruler": dict(sink=64, recent=64, top_k=896, d_s=12, quant_bits=2),
}
HOST_KV_DTYPES = ("auto", "fp8")
PRESETS = {"auto": {**PRESETS["ruler"], "top_k": MAX_TOP_K}, **PRESETS}  # auto: top_k is the cap
DEFAULT_PRESET = "longbench"  # of a dummy model (random weights attend flatly); real models: auto


def default_preset(model_name: str) -> str:
    return DEFAULT_PRESET if model_name.startswith("dummy:") else "auto"


@dataclass
class TailorConfig:
    preset: str = DEFAULT_PRESET
    quant_layers: list[int] | None = None
    quant_bits: int = 1
    group_size: int = 64
    residual: int = 128
    sink: int = 8
    recent: int = 56
    top_k: int = 128
    d_s: int = 8
    key_sketch: int = 2
    speculative_fetch: int = 0
    radix_topk: int = 1
    topk_chunk: int = 32
    share_q_pages: int = 1
    position_order: int = 40
    host_kv_dtype: str = "auto"
    fp8_row_align: int = 4
    gpu_rows_gib: float = 0
    reuse_rows: int = 0

    @property
    def fp8_rows(self) -> bool:
        return self.host_kv_dtype == "fp8"

    @property
    def budget(self) -> int:
        """Prompt tokens an S layer attends to per step (the baselines get the same budget)."""
        return self.sink + self.recent + self.top_k

    @classmethod
    def from_options(cls, preset: str | None = None, **overrides) -> "TailorConfig":
        """The preset's values (default: longbench), then any field overridden by name."""
        preset = preset or DEFAULT_PRESET
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown tailor_preset {preset!r}; choose one of: {', '.join(PRESETS)}"
            )
        names = {f.name for f in fields(cls)} - {"preset"}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(
                f"unknown tailor option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)

    def validate(self, num_layers: int | None = None, head_dim: int | None = None) -> None:
        """Raise ConfigError for a bad value; without the model's shape, what needs it is not checked."""
        if self.quant_bits not in (1, 2, 4):
            raise ConfigError(f"quant_bits must be 1, 2 or 4, got {self.quant_bits}")
        for name in ("sink", "recent", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.key_sketch not in (0, 1, 2):
            raise ConfigError(f"key_sketch must be 0 (off), 1 or 2 bits, got {self.key_sketch!r}")
        if self.speculative_fetch not in (0, 1):
            raise ConfigError(f"speculative_fetch must be 0 or 1, got {self.speculative_fetch!r}")
        if self.speculative_fetch and not self.key_sketch:
            raise ConfigError("speculative_fetch needs a key sketch (key_sketch 1 or 2)")
        if not isinstance(self.radix_topk, int) or self.radix_topk < 0:
            raise ConfigError(f"radix_topk must be an integer >= 0, got {self.radix_topk!r}")
        if not isinstance(self.topk_chunk, int) or self.topk_chunk < 0:
            raise ConfigError(f"topk_chunk must be an integer >= 0, got {self.topk_chunk!r}")
        if self.share_q_pages not in (0, 1):
            raise ConfigError(f"share_q_pages must be 0 or 1, got {self.share_q_pages!r}")
        if not isinstance(self.position_order, int) or self.position_order < 0:
            raise ConfigError(
                f"position_order must be an integer >= 0, got {self.position_order!r}"
            )
        if self.host_kv_dtype not in HOST_KV_DTYPES:
            raise ConfigError(
                f"host_kv_dtype must be one of {', '.join(HOST_KV_DTYPES)}, got {self.host_kv_dtype!r}"
            )
        if self.fp8_row_align not in host_fp8.ALIGNS:
            raise ConfigError(
                f"fp8_row_align must be one of {', '.join(map(str, host_fp8.ALIGNS))} (bytes), got {self.fp8_row_align!r}"
            )
        if self.fp8_row_align != 4 and not self.fp8_rows:
            raise ConfigError("fp8_row_align applies to host_kv_dtype fp8 only")
        if not isinstance(self.gpu_rows_gib, (int, float)) or not self.gpu_rows_gib >= 0:
            raise ConfigError(
                f"gpu_rows_gib must be a number of GiB >= 0, got {self.gpu_rows_gib!r}"
            )
        if self.gpu_rows_gib and not self.key_sketch:
            raise ConfigError(
                "gpu_rows_gib needs a key sketch (key_sketch 1 or 2): stage 1 reads host rows"
            )
        if not isinstance(self.reuse_rows, int) or self.reuse_rows < 0:
            raise ConfigError(f"reuse_rows must be an integer >= 0, got {self.reuse_rows!r}")
        if not isinstance(self.d_s, int) or self.d_s < 1:
            raise ConfigError(f"d_s must be a positive integer, got {self.d_s!r}")
        if head_dim is not None and self.d_s > head_dim:
            raise ConfigError(f"d_s must be in [1, head_dim={head_dim}], got {self.d_s!r}")
        if self.group_size != 64 or self.residual % self.group_size:
            raise ConfigError("group_size must be 64 and residual a multiple of it")
        if self.quant_layers is not None and (
            not isinstance(self.quant_layers, (list, tuple))
            or not all(isinstance(i, int) for i in self.quant_layers)
        ):
            raise ConfigError(
                f"quant_layers must be a list of layer indices, got {self.quant_layers!r}"
            )
        bad = [i for i in self.quant_layers or [] if i < 0]
        if bad:
            raise ConfigError(f"quant_layers must be layer indices (>= 0), got {bad}")
        bad = [i for i in self.quant_layers or [] if num_layers is not None and i >= num_layers]
        if bad:
            raise ConfigError(f"quant_layers {bad} out of range for a model of {num_layers} layers")

    def as_dict(self) -> dict:
        return asdict(self)
