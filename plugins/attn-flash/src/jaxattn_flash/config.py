"""Tile sizes and launch settings: measured defaults per head_dim, overridable per call.

`metadata.operation_configs["flash"]` may hold (all optional):

* forward: `block_q`, `block_kv`, `num_warps`, `num_stages`
* dq kernel: `block_q_dq`, `block_kv_dq`, `num_warps_dq`, `num_stages_dq`
* dk/dv kernel: `block_q_dkv`, `block_kv_dkv`, `num_warps_dkv`, `num_stages_dkv`
* which GPU forward kernel: `gpu_kernel` = "auto" (default), "triton" or "mosaic"
  (see `gpu_path.py`); the Mosaic GPU forward's `mosaic_block_kv` (64, 128 or 256)
  and `mosaic_stages` (K/V shared-memory slots, 2 to 4)
* dk/dv launch order: `launch_passes_dkv` (1 to 8; see `launch_order.py`)

Blocks are powers of two >= 16; each is clipped to the (padded) sequence it tiles.
The defaults were measured on an H100 (see BENCHMARKS.md); other GPUs use them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxattn import MaskParts

from .triton_kernels import Tiles

KERNELS = ("fwd", "dq", "dkv")
_SUFFIX = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}
GPU_KERNELS = ("auto", "triton", "mosaic")
MOSAIC_KEYS = frozenset({"mosaic_block_kv", "mosaic_stages"})
KEYS = frozenset(
    f"{name}{_SUFFIX[k]}" for k in KERNELS for name in ("block_q", "block_kv", "num_warps", "num_stages")
) | {"gpu_kernel", "launch_passes_dkv"} | MOSAIC_KEYS

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
MOSAIC_SMEM_BYTES = 227 * 1024 - 4096  # what the kernel's tiles may take (barriers, reductions apart)


# Launch passes of the dk/dv grid when a causal band makes its first k/v blocks the heavy
# ones and the query heads are grouped (measured on an H100, BENCHMARKS.md "launch passes":
# 4 passes take causal GQA/MQA dk/dv from -1% to +21%, fwd+bwd from +0% to +9%; MHA's dk/dv
# loses 13%, full masks gain nothing). Everything else keeps the plain order (1 pass).
DKV_PASSES_GROUPED_CAUSAL = 4


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_dim(d: int) -> int:
    return max(16, next_pow2(d))


def _pow2(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"metadata.operation_configs['flash'][{key!r}] must be a power of two >= 16, got {value!r}")
    return value


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"metadata.operation_configs['flash'][{key!r}] must be an int >= 1, got {value!r}")
    return value


def validate(config: Mapping[str, Any]) -> None:
    unknown = set(config) - KEYS
    if unknown:
        raise ValueError(f"metadata.operation_configs['flash']: unknown keys {sorted(unknown)}; "
                         f"known: {sorted(KEYS)}")


def gpu_kernel(config: Mapping[str, Any]) -> str:
    """The `gpu_kernel` key: "auto", "triton" or "mosaic"."""
    validate(config)
    value = config.get("gpu_kernel", "auto")
    if value not in GPU_KERNELS:
        raise ValueError(f"metadata.operation_configs['flash']['gpu_kernel'] must be one of {GPU_KERNELS}, "
                         f"got {value!r}")
    return value


def mosaic_tiles(config: Mapping[str, Any], head_dim: int) -> tuple[int, int]:
    """(block_kv, stages) of the Mosaic GPU forward for this head_dim (defaults or the config's)."""
    validate(config)
    bk, stages = MOSAIC_DEFAULTS.get(head_dim, (64, 2))
    bk = config.get("mosaic_block_kv", bk)
    if isinstance(bk, bool) or not isinstance(bk, int) or bk not in (64, 128, 256):
        raise ValueError(f"metadata.operation_configs['flash']['mosaic_block_kv'] must be 64, 128 or 256, "
                         f"got {bk!r}")
    stages = config.get("mosaic_stages", stages)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 2 <= stages <= 4:
        raise ValueError(f"metadata.operation_configs['flash']['mosaic_stages'] must be an int from 2 to 4, "
                         f"got {stages!r}")
    return bk, stages


def dkv_passes(config: Mapping[str, Any], group: int, parts: MaskParts) -> int:
    """Launch passes of the dk/dv kernel for one call (`launch_passes_dkv` or the measured default)."""
    validate(config)
    # the first k/v blocks see the most queries: a causal band, no window or chunk bounding it
    heavy_first = parts.band_hi is not None and parts.band_lo is None and parts.chunk_size is None
    default = DKV_PASSES_GROUPED_CAUSAL if group > 1 and heavy_first else 1
    passes = config.get("launch_passes_dkv", default)
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= 8:
        raise ValueError(f"metadata.operation_configs['flash']['launch_passes_dkv'] must be an int from 1 to 8, "
                         f"got {passes!r}")
    return passes


def mosaic_smem_bytes(head_dim: int, block_kv: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory the Mosaic forward's tiles take: Q/O of both consumers, K and V slots."""
    return itemsize * head_dim * (2 * 64 + 2 * stages * block_kv) + 2 * 64 * 4


def resolve(config: Mapping[str, Any], head_dim: int, q_len: int, kv_len: int) -> dict[str, Tiles]:
    """The tiles of the three kernels for one call (blocks clipped to the sequences)."""
    validate(config)
    d = padded_dim(head_dim)
    table = DEFAULTS.get(d, DEFAULTS[256])
    q_cap = max(16, next_pow2(q_len))
    kv_cap = max(16, next_pow2(kv_len))
    tiles = {}
    for kernel in KERNELS:
        bq, bk, warps, stages = table[kernel]
        sfx = _SUFFIX[kernel]
        bq = _pow2(config.get(f"block_q{sfx}", bq), f"block_q{sfx}")
        bk = _pow2(config.get(f"block_kv{sfx}", bk), f"block_kv{sfx}")
        warps = _positive(config.get(f"num_warps{sfx}", warps), f"num_warps{sfx}")
        stages = _positive(config.get(f"num_stages{sfx}", stages), f"num_stages{sfx}")
        tiles[kernel] = Tiles(min(bq, q_cap), min(bk, kv_cap), warps, stages)
    return tiles


def pad_multiples(tiles: Mapping[str, Tiles]) -> tuple[int, int]:
    """(query, key) lengths the three kernels need the sequences padded to a multiple of."""
    return max(t.block_q for t in tiles.values()), max(t.block_kv for t in tiles.values())
