"""Tile sizes and launch settings: measured defaults per head_dim, overridable per call.

`metadata.operation_configs["flash"]` is a `FlashConfig` or a dict of its keys (all
optional; None or absent = the measured default), validated before the kernels run:

* forward: `block_q`, `block_kv`, `num_warps`, `num_stages`
* dq kernel: `block_q_dq`, `block_kv_dq`, `num_warps_dq`, `num_stages_dq`
* dk/dv kernel: `block_q_dkv`, `block_kv_dkv`, `num_warps_dkv`, `num_stages_dkv`
* which GPU forward kernel: `gpu_kernel` = "auto" (default), "triton" or "mosaic"
  (see `gpu_path.py`); the Mosaic GPU forward's `mosaic_block_kv` (64, 128 or 256)
  and `mosaic_stages` (K/V shared-memory slots, 2 to 4)
* which GPU backward kernels: `gpu_backward` = "auto" (default), "triton" or "mosaic";
  the Mosaic GPU backward's `mosaic_block_kv_dq` (64 or 128: the dq kernel's key tile),
  `mosaic_stages_bwd` (shared-memory slots of both kernels, 2 to 4) and `mosaic_dq`: "split"
  or "own" (dq made inside the dk/dv kernel and summed by TMA reductions: faster, not bitwise
  deterministic; the default at head_dim 128 and 64) or "separate" (its own kernel, one writer
  per tile: deterministic; the default at head_dim 128 under a window or chunks)
* the Mosaic forward's value guard: `mosaic_value_guard` = "flags", "retry" or "every block"
  (which blocks clean the value tiles a mask cuts: `mosaic_kernels`' docstring; default
  `MOSAIC_VALUE_GUARD`)
* soft-cap: `mosaic_softcap_running_max` (True: the Mosaic forward keeps a running max under a
  soft-cap too; by default it skips it where `softcap_without_max` says the cap bounds exp2) and
  `mosaic_poly_exp2` (0 to 8; where the cap bounds exp2, one exp2 in every this many is a
  polynomial on the FMA pipe instead of a special-function instruction, `mosaic_exp2`; 0: none;
  default `MOSAIC_POLY_EXP2`) with `mosaic_poly_degree` (2 or 3; default `MOSAIC_POLY_DEGREE`);
  `mosaic_poly_exp2_bwd` (0 to 8, default 0): the same split for the Mosaic backward's exp2 of
  P, with or without a cap (H200: half by the quadratic 2% faster fwd+bwd at (4, 4096), 2–3.5%
  slower at (1, 32768); `jaxattn tune` tries it)
* `mosaic_fence` (default False): an optimization barrier after the Mosaic forward's softmax
  (the output is bitwise the same; H200: 2–3% faster on causal rows of 8k–16k at 32/8 heads,
  4% slower under a soft-cap, level without a mask; `jaxattn tune` tries it on masked calls)
* dk/dv launch order: `launch_passes_dkv` (1 to 8; see `launch_order.py`)
* Mosaic launch order: `launch_cluster_fwd`, `launch_cluster_dkv` (1 to 64 (batch, head) groups
  launched together, heavy blocks first: `launch_order.clustered_order`; 1: the grid's order;
  by default 4 in the causal forward, 8 in the 128-key dk/dv kernel under causal GQA)

Blocks are powers of two >= 16; each is clipped to the (padded) sequence it tiles.
The defaults were measured on an H100 (see BENCHMARKS.md); other GPUs use them too.
`jaxattn tune` tries the few alternatives `tuning_space` names per call on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jaxattn import AttentionRequest, BackendConfig, MaskParts
from jaxattn.pallas_compat import SMEM_PER_BLOCK, smem_footprint

from .mosaic_segments import segment_smem
from .triton_kernels import Tiles

KERNELS = ("fwd", "dq", "dkv")
_SUFFIX = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}
GPU_KERNELS = ("auto", "triton", "mosaic")
MOSAIC_BLOCK_KV = (64, 128, 256)
MOSAIC_BLOCK_KV_DQ = (64, 128)
MOSAIC_DQ = ("separate", "split", "own")  # see mosaic_bwd_kernels.MosaicBwdSpec.fused_dq
MOSAIC_VALUE_GUARDS = ("flags", "retry", "every block")  # MosaicSpec.guard_form (mosaic_kernels' docstring)
MOSAIC_VALUE_GUARD = "retry"  # measured: BENCHMARKS.md, "The value guard as a retry"
MOSAIC_POLY_EXP2 = 2  # measured: BENCHMARKS.md, "Soft-cap: the scale fused, a quadratic on half"
POLY_DEGREES = (2, 3)  # of that polynomial (mosaic_exp2.POLYNOMIALS)
MOSAIC_POLY_DEGREE = 2  # measured with MOSAIC_POLY_EXP2; 1.8e-3 relative before P's bfloat16 rounding


@dataclass(frozen=True)
class FlashConfig(BackendConfig):
    """Settings of the `flash` backend (see the module docstring); None = the measured default."""

    backend = "flash"
    block_q: int | None = None
    block_kv: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    num_warps_dkv: int | None = None
    num_stages_dkv: int | None = None
    gpu_kernel: str | None = None
    launch_passes_dkv: int | None = None
    launch_cluster_fwd: int | None = None
    launch_cluster_dkv: int | None = None
    mosaic_block_kv: int | None = None
    mosaic_stages: int | None = None
    gpu_backward: str | None = None
    mosaic_block_kv_dq: int | None = None
    mosaic_stages_bwd: int | None = None
    mosaic_dq: str | None = None
    mosaic_softcap_running_max: bool | None = None
    mosaic_value_guard: str | None = None
    mosaic_poly_exp2: int | None = None
    mosaic_poly_degree: int | None = None
    mosaic_poly_exp2_bwd: int | None = None
    mosaic_fence: bool | None = None

    def __post_init__(self) -> None:
        for kernel in KERNELS:
            sfx = _SUFFIX[kernel]
            self.check_int(f"block_q{sfx}", minimum=16, power_of_two=True)
            self.check_int(f"block_kv{sfx}", minimum=16, power_of_two=True)
            self.check_int(f"num_warps{sfx}")
            self.check_int(f"num_stages{sfx}")
        self.check_choice("gpu_kernel", GPU_KERNELS)
        self.check_int("launch_passes_dkv", minimum=1, maximum=8)
        self.check_int("launch_cluster_fwd", minimum=1, maximum=64)
        self.check_int("launch_cluster_dkv", minimum=1, maximum=64)
        if (self.launch_passes_dkv or 1) > 1 and (self.launch_cluster_dkv or 1) > 1:
            raise ValueError(f"{self._where('launch_cluster_dkv')}: launch passes and launch clusters are two "
                             f"orders of one grid; set at most one of launch_passes_dkv="
                             f"{self.launch_passes_dkv} and launch_cluster_dkv={self.launch_cluster_dkv} above 1")
        self.check_choice("mosaic_block_kv", MOSAIC_BLOCK_KV)
        self.check_int("mosaic_stages", minimum=2, maximum=4)
        self.check_choice("gpu_backward", GPU_KERNELS)
        self.check_choice("mosaic_block_kv_dq", MOSAIC_BLOCK_KV_DQ)
        self.check_int("mosaic_stages_bwd", minimum=2, maximum=4)
        self.check_choice("mosaic_dq", MOSAIC_DQ)
        self.check_choice("mosaic_softcap_running_max", (True, False))
        self.check_choice("mosaic_value_guard", MOSAIC_VALUE_GUARDS)
        self.check_int("mosaic_poly_exp2", minimum=0, maximum=8)
        self.check_int("mosaic_poly_degree", minimum=min(POLY_DEGREES), maximum=max(POLY_DEGREES))
        self.check_int("mosaic_poly_exp2_bwd", minimum=0, maximum=8)
        self.check_choice("mosaic_fence", (True, False))


KEYS = frozenset(FlashConfig.keys())

# head_dim (padded to a power of two) -> kernel -> (block_q, block_kv, num_warps, num_stages)
DEFAULTS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    16: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    32: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    64: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    128: {"fwd": (128, 128, 8, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    256: {"fwd": (128, 64, 8, 2), "dq": (32, 64, 4, 2), "dkv": (64, 32, 4, 2)},
}


# head_dim -> (block_kv, stages) of the Mosaic GPU forward (measured on an H100, BENCHMARKS.md:
# head_dim 128: 128 x 2 stages 584-643 TFLOP/s, 64 x 3-4 stages 465-538; head_dim 64: 128 x 2
# best causal, 256 x 2 +6% full / -7% causal; head_dim 256: 64 x 2 is the only fit, 651 full /
# 559 causal at (2, 4096, 16, 16)). Triton defaults of head_dim 256: bench/results/tune_d256.log.
# Shared memory: Q/O 2*64*d, K and V stages*block_kv*d each (2 bytes), under 227 KiB.
MOSAIC_DEFAULTS: dict[int, tuple[int, int]] = {64: (128, 2), 128: (128, 2), 256: (64, 2)}
# head_dim -> (block_kv, stages) where no band bounds the keys (no causal, window or chunk: every key
# tile is read), used where kv_len is a multiple and the tiles fit. On an H200 (2026-12-01,
# bench/results/h200_2026-12-01/d64_probe.log) head_dim 64 full forward at (8, 2048, 16, 16) 399 vs
# 370 TFLOP/s, (4, 4096, 16, 16) 436 vs 406 (cuDNN 416/438), fwd+bwd level (365/400 vs 364/395);
# causal 270 vs 290 and 353 vs 354, hence the band keeps 128.
MOSAIC_FULL_DEFAULTS: dict[int, tuple[int, int]] = {64: (256, 2)}
# (dq key tile, stages) of the Mosaic GPU backward (mosaic_bwd_kernels.py): on an H200 a key tile
# of 128 and 3 stages were level with these (within 1-4%, BENCHMARKS.md "Mosaic GPU backward").
MOSAIC_BWD_DEFAULTS: tuple[int, int] = (64, 2)
# head_dim (value head_dim the same) -> stages of the Mosaic backward where 3 beat 2: on an H200
# (2026-12-01, bench/results/h200_2026-12-01/d64_bwd.log) head_dim 64 fwd+bwd at (8, 2048, 16, 16)
# 374 vs 367 TFLOP/s full and 276 vs 268 causal, at (4, 4096, 16, 16) 416 vs 403 and 348 vs 335
# (cuDNN 383 / 278 / 426 / 347).
MOSAIC_BWD_STAGES: dict[int, int] = {64: 3}
# head_dim -> how the Mosaic GPU backward makes dq (`mosaic_dq`, BENCHMARKS.md "Fused dQ"): on an
# H200 "split" gained 7% fwd+bwd on full masks at head_dim 128 (causal -2% to +3.5%), "own" 3.5-4%
# at head_dim 64; both sum dq with TMA reductions (not bitwise deterministic: "separate" is).
MOSAIC_DQ_DEFAULTS: dict[int, str] = {64: "own", 128: "split"}
# head_dim -> the dq form where a window or chunks bound every row's keys: there each dq tile sums
# few key blocks, so the fused forms' fixed cost (dQ's float32 buffer zeroed, then cast) outweighs
# the separate kernel's second pass. On an H200 (2026-12-02, bench/results/h200_2026-12-02/
# tune_win1024.log, bwd_alone_dq.log) at head_dim 128: window 1024 at (1, 16384, 16, 16) fwd+bwd
# 1.319 vs 1.421 ms "split" (cuDNN 1.336); at (1, 32768, 32, 8) the backward alone with window 4096
# 11.59 vs 12.10 ms, chunks of 8192 12.94 vs 12.88 (level).
MOSAIC_DQ_BOUNDED: dict[int, str] = {128: "separate"}
# Wide head dims (head_dim + value head_dim > 256: 256/256, MLA's 192/128): dk and dv of one
# consumer's 64 keys would not fit in its registers, so they come from mosaic_bwd_wide.py and the
# backward's dq kernel takes key tiles of 32 (its Q, dO and K/V ring then fit in shared memory);
# dq is never fused there.
WIDE_DQ_BLOCK_KV = 32
# log2 of the largest sum of exp2(logit) a soft-capped row may reach without a running max:
# float32 ends at 2**128, leaving 2**32 for the values' magnitude in the accumulator.
SOFTCAP_LOG2_BOUND = 96.0


def wide_backward(head_dim: int, value_head_dim: int) -> bool:
    """Whether the Mosaic GPU backward at these head dims is `mosaic_bwd_wide.py`'s."""
    return head_dim + value_head_dim > 256


# Launch passes of the dk/dv grid when a causal band makes its first k/v blocks the heavy
# ones and the query heads are grouped (measured on an H100, BENCHMARKS.md "launch passes":
# 4 passes take causal GQA/MQA dk/dv from -1% to +21%, fwd+bwd from +0% to +9%; MHA's dk/dv
# loses 13%, full masks gain nothing). Everything else keeps the plain order (1 pass).
DKV_PASSES_GROUPED_CAUSAL = 4

# Launch clusters of the Mosaic kernels (`launch_order.clustered_order`), measured on an H200
# (BENCHMARKS.md "launch clusters"): the causal forward with 4 (batch, head) groups per cluster
# gains 1-18% (most at head_dim 256 and 64, none at one 16k row); the 128-key dk/dv kernel with 8
# gains 3% on causal GQA and loses 2-3% on causal MHA at head_dim 128, so only GQA takes them.
MOSAIC_FWD_CLUSTER_CAUSAL = 4
MOSAIC_DKV_CLUSTER_GROUPED_CAUSAL = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_dim(d: int) -> int:
    return max(16, next_pow2(d))


def validate(config: Mapping[str, Any] | FlashConfig) -> FlashConfig:
    """`config` as a `FlashConfig`: ValueError naming the key when one is unknown or bad."""
    return FlashConfig.from_mapping(config)


def gpu_kernel(config: Mapping[str, Any]) -> str:
    """The `gpu_kernel` key: "auto", "triton" or "mosaic"."""
    return validate(config).gpu_kernel or "auto"


def gpu_backward(config: Mapping[str, Any]) -> str:
    """The `gpu_backward` key: "auto", "triton" or "mosaic"."""
    return validate(config).gpu_backward or "auto"


def dims_text(head_dim: int, value_head_dim: int | None) -> str:
    """`head_dim d`, with `, value head_dim dv` where the values' differs: how error messages name them."""
    return f"head_dim {head_dim}" + (f", value head_dim {value_head_dim}" if value_head_dim not in (None, head_dim)
                                     else "")


def mosaic_bwd_tiles(config: Mapping[str, Any], head_dim: int | None = None,
                     value_head_dim: int | None = None) -> tuple[int, int]:
    """(dq key tile, stages) of the Mosaic GPU backward (the config's, else the defaults, with
    `MOSAIC_BWD_STAGES` where head_dim and value head_dim are one of its keys); at wide head
    dims (`wide_backward`) the key tile is 32 (ValueError when the config names another)."""
    cfg = validate(config)
    measured = MOSAIC_BWD_STAGES.get(head_dim) if value_head_dim in (None, head_dim) else None
    stages = cfg.mosaic_stages_bwd or measured or MOSAIC_BWD_DEFAULTS[1]
    if head_dim is not None and wide_backward(head_dim, value_head_dim or head_dim):
        if cfg.mosaic_block_kv_dq is not None:
            raise ValueError(f"flash: mosaic_block_kv_dq does not apply at {dims_text(head_dim, value_head_dim)} (the "
                             f"dq kernel takes key tiles of {WIDE_DQ_BLOCK_KV} there); got {cfg.mosaic_block_kv_dq}")
        return WIDE_DQ_BLOCK_KV, stages
    return cfg.mosaic_block_kv_dq or MOSAIC_BWD_DEFAULTS[0], stages


def mosaic_dq_choice(config: Mapping[str, Any], head_dim: int, bounded: bool = False) -> tuple[str, str]:
    """(the `mosaic_dq` a call takes, what chose it): the config's, else `MOSAIC_DQ_BOUNDED` where a
    window or chunks bound the keys (`bounded`), else `MOSAIC_DQ_DEFAULTS`, else "separate"."""
    named = validate(config).mosaic_dq
    if named:
        return named, "mosaic_dq in the flash config"
    if bounded and head_dim in MOSAIC_DQ_BOUNDED:
        return MOSAIC_DQ_BOUNDED[head_dim], "a window or chunks bound the keys (MOSAIC_DQ_BOUNDED)"
    if head_dim in MOSAIC_DQ_DEFAULTS:
        return MOSAIC_DQ_DEFAULTS[head_dim], f"the measured default at head_dim {head_dim} (MOSAIC_DQ_DEFAULTS)"
    return "separate", f"no fused form measured at head_dim {head_dim}"


def mosaic_dq_default(head_dim: int, bounded: bool = False) -> str:
    """The `mosaic_dq` a call takes unless its config names one (`mosaic_dq_choice`)."""
    return mosaic_dq_choice({}, head_dim, bounded)[0]


def bounds_keys(band_lo: int | None, chunk_size: int | None) -> bool:
    """Whether a window (a band's left edge) or chunks bound the keys every query sees."""
    return band_lo is not None or chunk_size is not None


def request_bounds_keys(request: AttentionRequest) -> bool:
    """`bounds_keys` of a request's static band and chunk."""
    return bounds_keys((request.band or (None, None))[0], request.chunk[0] if request.chunk else None)


def mosaic_fused_dq(config: Mapping[str, Any], head_dim: int, value_head_dim: int | None = None,
                    bounded: bool = False) -> str | None:
    """`MosaicBwdSpec.fused_dq` of the config's `mosaic_dq` or the default for `head_dim` and the
    mask (`mosaic_dq_choice`; None: the separate dq kernel); ValueError when "split" is asked at a
    head_dim it cannot tile."""
    mode, _ = mosaic_dq_choice(config, head_dim, bounded)
    if mode != "separate" and wide_backward(head_dim, value_head_dim or head_dim):
        raise ValueError(f"flash: mosaic_dq={mode!r} does not fit at {dims_text(head_dim, value_head_dim)} (dQ's "
                         "float32 buffer beside the dk/dv kernel's tiles exceeds shared memory): use 'separate'")
    if mode == "split" and head_dim % 128:
        raise ValueError(f"flash: mosaic_dq='split' needs head_dim 128 (each of the two consumer warpgroups "
                         f"adds 64 of dQ's columns); got head_dim {head_dim}: use 'own' or 'separate'")
    return None if mode == "separate" else mode


def mosaic_tiles(config: Mapping[str, Any], head_dim: int, value_head_dim: int | None = None,
                 kv_len: int | None = None, banded: bool = True) -> tuple[int, int]:
    """(block_kv, stages) of the Mosaic GPU forward for this call (defaults or the config's).
    A call whose mask has no band (`banded=False`) takes `MOSAIC_FULL_DEFAULTS` where they
    divide `kv_len` and fit in shared memory; else `MOSAIC_DEFAULTS`."""
    cfg = validate(config)
    bk, stages = MOSAIC_DEFAULTS.get(head_dim, (64, 2))
    wide = MOSAIC_FULL_DEFAULTS.get(head_dim)
    if (wide is not None and not banded and kv_len is not None and kv_len % wide[0] == 0
            and mosaic_smem_bytes(head_dim, *wide, value_head_dim=value_head_dim) <= SMEM_PER_BLOCK):
        bk, stages = wide
    return cfg.mosaic_block_kv or bk, cfg.mosaic_stages or stages


def heavy_first(band_lo: int | None, band_hi: int | None, chunk_size: int | None) -> bool:
    """The first k/v blocks see the most queries: a causal band, no window or chunk bounding it."""
    return band_hi is not None and band_lo is None and chunk_size is None


def dkv_passes(config: Mapping[str, Any], group: int, parts: MaskParts) -> int:
    """Launch passes of the dk/dv kernel for one call (`launch_passes_dkv` or the measured default)."""
    cfg = validate(config)
    if cfg.launch_passes_dkv is not None:
        return cfg.launch_passes_dkv
    grouped_causal = group > 1 and heavy_first(parts.band_lo, parts.band_hi, parts.chunk_size)
    return DKV_PASSES_GROUPED_CAUSAL if grouped_causal else 1


def mosaic_dkv_passes(config: Mapping[str, Any], group: int, parts: MaskParts, head_dim: int,
                      value_head_dim: int) -> int:
    """Launch passes of the Mosaic dk/dv kernel: `launch_passes_dkv`, else `dkv_passes`' rule in
    the wide kernel and the plain order in the 128-key one. Measured on an H200 (BENCHMARKS.md
    "launch passes in the Mosaic dk/dv kernels"), causal fwd+bwd TFLOP/s, 4 passes vs 1: the wide
    kernel (64 keys per block) at (2, 4096, 16/4, 256) 355-358 vs 335-340; the 128-key kernel at
    (4, 4096, 32/8, 128) 421-438 vs 433-437 and (1, 32768, 32/8, 128) 519-523 vs 535-538."""
    if validate(config).launch_passes_dkv is None and not wide_backward(head_dim, value_head_dim):
        return 1
    return dkv_passes(config, group, parts)


def mosaic_fwd_cluster(config: Mapping[str, Any], parts: MaskParts) -> int:
    """Launch cluster of the Mosaic forward grid: `launch_cluster_fwd`, else the measured default
    where the heavy query blocks launch first (causal), else 1 (the grid's order)."""
    cfg = validate(config)
    if cfg.launch_cluster_fwd is not None:
        return cfg.launch_cluster_fwd
    return MOSAIC_FWD_CLUSTER_CAUSAL if heavy_first(parts.band_lo, parts.band_hi, parts.chunk_size) else 1


def mosaic_dkv_cluster(config: Mapping[str, Any], group: int, parts: MaskParts, head_dim: int,
                       value_head_dim: int) -> int:
    """Launch cluster of the Mosaic dk/dv grid: `launch_cluster_dkv`, else the measured default in
    the 128-key kernel on causal GQA; 1 where launch passes order the grid (the wide kernel's
    default, or `launch_passes_dkv`)."""
    cfg = validate(config)
    if cfg.launch_cluster_dkv is not None:
        return cfg.launch_cluster_dkv
    if mosaic_dkv_passes(config, group, parts, head_dim, value_head_dim) > 1:
        return 1
    grouped_causal = group > 1 and heavy_first(parts.band_lo, parts.band_hi, parts.chunk_size)
    return MOSAIC_DKV_CLUSTER_GROUPED_CAUSAL if grouped_causal else 1


def mosaic_value_guard(config: Mapping[str, Any]) -> str:
    """Which blocks of a Mosaic forward with the value guard clean the tiles their mask cuts
    (`mosaic_kernels`' docstring): `mosaic_value_guard`, else the measured default."""
    return validate(config).mosaic_value_guard or MOSAIC_VALUE_GUARD


def softcap_without_max(config: Mapping[str, Any], soft_cap: float | None, dtype: Any, kv_len: int) -> bool:
    """Whether the Mosaic forward may take p = exp2(logit) without a running max under this soft-cap:
    logits lie within ±soft_cap, so the sum of kv_len such terms stays under 2**SOFTCAP_LOG2_BOUND
    (float32's 2**128 less room for the values it weighs) and its smallest term above 2**-126 (no
    flush); bfloat16 holds p (float16's 65504 would overflow). `mosaic_softcap_running_max` keeps it."""
    if soft_cap is None or validate(config).mosaic_softcap_running_max or jnp.dtype(dtype) != jnp.bfloat16:
        return False
    return soft_cap * math.log2(math.e) + math.log2(max(kv_len, 1)) <= SOFTCAP_LOG2_BOUND


def mosaic_poly_exp2(config: Mapping[str, Any], bounded_logits: bool) -> int:
    """One exp2 in every how many a Mosaic forward computes on the FMA pipe (0: none): only with
    bounded soft-capped logits (`softcap_without_max`; the cubic's 2^z needs |z| <= 125, and these
    are within ±SOFTCAP_LOG2_BOUND); `mosaic_poly_exp2`, else the measured default."""
    if not bounded_logits:
        return 0
    every = validate(config).mosaic_poly_exp2
    return MOSAIC_POLY_EXP2 if every is None else every


def mosaic_poly_exp2_bwd(config: Mapping[str, Any]) -> int:
    """One exp2 of the Mosaic backward's P in every how many on the FMA pipe: `mosaic_poly_exp2_bwd`,
    else 0 (none: it wins on short rows only, BENCHMARKS.md; `tuning_space` offers it). Its
    exponents are at most 0 wherever a pair is visible, with or without a cap, and the polynomial
    flushes those below -125 to 0."""
    return validate(config).mosaic_poly_exp2_bwd or 0


def mosaic_fence(config: Mapping[str, Any]) -> bool:
    """Whether the Mosaic forward orders its softmax with an optimization barrier (`mosaic_fence`,
    default False: a gain on some causal shapes only, a loss under a soft-cap; BENCHMARKS.md)."""
    return bool(validate(config).mosaic_fence)


def mosaic_poly_degree(config: Mapping[str, Any]) -> int:
    """Degree of the polynomial of that exp2 (2 or 3): `mosaic_poly_degree`, else the measured default."""
    return validate(config).mosaic_poly_degree or MOSAIC_POLY_DEGREE


def tuning_space(request: AttentionRequest, mosaic_by_default: bool,
                 mosaic_backward_by_default: bool = False) -> list[dict[str, Any]]:
    """What `jaxattn tune` tries on a GPU besides the defaults: the Triton forward where the
    Mosaic one is the default, the Triton backward and the other dq form (fused or separate) where
    the Mosaic backward is, else the plain dk/dv launch order where 4 passes or launch clusters are;
    under a soft-cap, a third and a quarter of the exp2 by the cubic beside the default half by the
    quadratic; the softmax's fence on a masked forward without a cap and the backward's exp2 split:
    each gained on some shapes and lost on others (H200, BENCHMARKS.md)."""
    space: list[dict[str, Any]] = [{}]
    band = request.band or (None, None)
    chunk = request.chunk[0] if request.chunk else None
    if mosaic_by_default:
        space.append({"gpu_kernel": "triton"})
        if request.logits_soft_cap:  # where the cap does not bound the logits the key changes nothing
            space += [{"mosaic_poly_exp2": every, "mosaic_poly_degree": 3} for every in (3, 4)]
        elif band != (None, None) or chunk is not None:
            space.append({"mosaic_fence": True})
    if request.needs_grad and mosaic_backward_by_default:
        space += [{"gpu_backward": "triton"}, {"mosaic_poly_exp2_bwd": 2}]
        if request.head_dim in MOSAIC_DQ_DEFAULTS:
            default = mosaic_dq_default(request.head_dim, request_bounds_keys(request))
            other = MOSAIC_DQ_DEFAULTS[request.head_dim] if default == "separate" else "separate"
            space.append({"mosaic_dq": other})
        wide = wide_backward(request.head_dim, request.value_head_dim)
        if request.is_gqa and heavy_first(band[0], band[1], chunk) and not wide:
            space.append({"launch_cluster_dkv": 1})
    elif request.needs_grad and request.is_gqa and heavy_first(band[0], band[1], chunk):
        space.append({"launch_passes_dkv": 1})
    return space


def mosaic_smem_bytes(head_dim: int, block_kv: int, stages: int, itemsize: int = 2,
                      value_head_dim: int | None = None, guard: bool = True, segments: bool = False) -> int:
    """Shared memory of the Mosaic forward (`mosaic_kernels.mosaic_forward`'s scratch, buffer by
    buffer, and its softmax's reductions), as Mosaic GPU's lowering lays it out: Q (then O) of
    both consumers' 64 rows, O apart when the value head_dim differs, the K and V slots, the lse
    rows; with the value guard each slot's cleaned-key flags; with segment ids the rows' and the
    key tiles' ids. Held to the lowering by test_flash_mosaic_kernels."""
    dv = head_dim if value_head_dim is None else value_head_dim
    rows, consumers = 64, 2
    buffers = [consumers * rows * head_dim * itemsize, stages * block_kv * head_dim * itemsize,
               stages * block_kv * dv * itemsize, consumers * rows * 4]
    barriers = consumers + 4 * stages
    if dv != head_dim:
        buffers.append(consumers * rows * dv * itemsize)
    if guard:
        buffers.append(stages * block_kv * 4)
    if segments:
        ids, id_barriers = segment_smem(consumers, rows, block_kv, stages)
        buffers += ids
        barriers += id_barriers
    return smem_footprint(buffers, barriers, reductions=True)


def resolve(config: Mapping[str, Any], head_dim: int, q_len: int, kv_len: int) -> dict[str, Tiles]:
    """The tiles of the three kernels for one call (blocks clipped to the sequences)."""
    cfg = validate(config)
    d = padded_dim(head_dim)
    table = DEFAULTS.get(d, DEFAULTS[256])
    q_cap = max(16, next_pow2(q_len))
    kv_cap = max(16, next_pow2(kv_len))
    tiles = {}
    for kernel in KERNELS:
        bq, bk, warps, stages = table[kernel]
        sfx = _SUFFIX[kernel]
        bq = getattr(cfg, f"block_q{sfx}") or bq
        bk = getattr(cfg, f"block_kv{sfx}") or bk
        warps = getattr(cfg, f"num_warps{sfx}") or warps
        stages = getattr(cfg, f"num_stages{sfx}") or stages
        tiles[kernel] = Tiles(min(bq, q_cap), min(bk, kv_cap), warps, stages)
    return tiles


def pad_multiples(tiles: Mapping[str, Tiles]) -> tuple[int, int]:
    """(query, key) lengths the three kernels need the sequences padded to a multiple of."""
    return max(t.block_q for t in tiles.values()), max(t.block_kv for t in tiles.values())
