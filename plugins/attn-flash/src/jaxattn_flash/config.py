"""Tile sizes and launch settings: measured defaults per head_dim, overridable per call.

`metadata.operation_configs["flash"]` may hold (all optional):

* forward: `block_q`, `block_kv`, `num_warps`, `num_stages`
* dq kernel: `block_q_dq`, `block_kv_dq`, `num_warps_dq`, `num_stages_dq`
* dk/dv kernel: `block_q_dkv`, `block_kv_dkv`, `num_warps_dkv`, `num_stages_dkv`

Blocks are powers of two >= 16; each is clipped to the (padded) sequence it tiles.
The defaults were measured on an H100 (see BENCHMARKS.md); other GPUs use them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .triton_kernels import Tiles

KERNELS = ("fwd", "dq", "dkv")
_SUFFIX = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}
KEYS = frozenset(
    f"{name}{_SUFFIX[k]}" for k in KERNELS for name in ("block_q", "block_kv", "num_warps", "num_stages")
)

# head_dim (padded to a power of two) -> kernel -> (block_q, block_kv, num_warps, num_stages)
DEFAULTS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    16: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    32: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    64: {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    128: {"fwd": (128, 128, 8, 3), "dq": (64, 64, 4, 2), "dkv": (64, 64, 4, 2)},
    256: {"fwd": (64, 64, 8, 2), "dq": (64, 32, 8, 2), "dkv": (32, 64, 8, 2)},
}


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
