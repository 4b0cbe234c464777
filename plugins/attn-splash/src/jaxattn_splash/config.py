"""Block sizes: defaults per TPU generation, overridden by `metadata.get_operation_config("splash")`,
clamped to the (padded) sequence lengths.

Keys (all optional): `block_q`, `block_kv`, `block_kv_compute` (forward); `block_q_dkv`,
`block_kv_dkv`, `block_kv_dkv_compute` (dK/dV kernel); `block_q_dq`, `block_kv_dq` (dQ
kernel); `use_fused_bwd_kernel` (one backward kernel computing dQ too; the dq blocks are
then unused). Block sizes must be multiples of 128.

The defaults are starting points taken from common splash settings (512 tiles; 1024-wide
kv tiles where VMEM is larger), not measured by this project: no TPU was reachable (see
BENCHMARKS.md). Tune them per model with `bench/bench_splash.py`.
"""

from __future__ import annotations

from typing import Any

from jaxattn import Hardware

from . import _compat

LANES = 128  # TPU vector lanes: sequence tiles are multiples of this
BLOCK_KEYS = (
    "block_q", "block_kv", "block_kv_compute",
    "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
    "block_q_dq", "block_kv_dq",
)
CONFIG_KEYS = BLOCK_KEYS + ("use_fused_bwd_kernel",)

_BASE = dict(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512, block_kv_dkv=512,
             block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512)
_WIDE = dict(_BASE, block_kv=1024, block_kv_dkv=1024)


def default_blocks(hardware: Hardware | None) -> dict[str, Any]:
    """Defaults for the TPU in `hardware`: 512 tiles on v4 and v5e (16 MiB scoped VMEM);
    1024-wide kv tiles (computed 512 at a time) on v5p, v6e and newer."""
    gen = hardware.tpu_generation if hardware is not None else None
    kind = (hardware.device_kind if hardware is not None else "").lower()
    if gen is None or gen >= 6 or (gen == 5 and "lite" not in kind and "v5e" not in kind):
        return dict(_WIDE, use_fused_bwd_kernel=False)
    return dict(_BASE, use_fused_bwd_kernel=False)


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems with a user's `operation_configs["splash"]`, as messages."""
    problems = []
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        problems.append(f"metadata.operation_configs['splash']: unknown keys {unknown} (known: {list(CONFIG_KEYS)})")
    fused = config.get("use_fused_bwd_kernel", False)
    if not isinstance(fused, bool):
        problems.append(f"metadata.operation_configs['splash']['use_fused_bwd_kernel'] must be a bool, got {fused!r}")
    for key in BLOCK_KEYS:
        if key in config and (not isinstance(config[key], int) or config[key] <= 0 or config[key] % LANES):
            problems.append(f"metadata.operation_configs['splash'][{key!r}] must be a positive multiple of "
                            f"{LANES}, got {config[key]!r}")
    return problems


def padded(length: int) -> int:
    """The kernel runs on lengths rounded up to a multiple of 128 (extra keys are masked)."""
    return -(-length // LANES) * LANES


def _fit(block: int, length: int) -> int:
    """The largest multiple of 128 that is <= `block` and divides `length` (a multiple of 128)."""
    best = LANES
    for size in range(LANES, min(block, length) + 1, LANES):
        if length % size == 0:
            best = size
    return best


def block_sizes(config: dict[str, Any], hardware: Hardware | None, q_len: int, kv_len: int) -> Any:
    """A splash `BlockSizes` for padded lengths `q_len`, `kv_len` (multiples of 128)."""
    problems = check_config(config)
    if problems:
        raise ValueError("; ".join(problems))
    merged = {**default_blocks(hardware), **config}
    fused = bool(merged.pop("use_fused_bwd_kernel"))
    bq = _fit(merged["block_q"], q_len)
    bkv = _fit(merged["block_kv"], kv_len)
    bkv_c = _fit(merged["block_kv_compute"], bkv)
    bq_dkv = _fit(merged["block_q_dkv"], q_len)
    bkv_dkv = _fit(merged["block_kv_dkv"], kv_len)
    bkv_dkv_c = _fit(merged["block_kv_dkv_compute"], bkv_dkv)
    dq = {} if fused else dict(block_q_dq=_fit(merged["block_q_dq"], q_len),
                               block_kv_dq=_fit(merged["block_kv_dq"], kv_len))
    return _compat.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv_c,
        block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv_c,
        use_fused_bwd_kernel=fused, **dq,
    )
