"""Every import from jax's splash attention, in one place (jax versions differ here).

The public pieces (`BlockSizes`, `SegmentIds`, the mask classes, `MaskInfo`,
`process_mask*`) are stable across jax 0.10.x and 0.11.x. The backend also drives the
kernel's forward and backward `pallas_call`s directly (`_splash_attention_forward`,
`_splash_attention_bwd_dkv`, `_splash_attention_bwd_dq`): the public `make_splash_mha`
object cannot return the log-sum-exp together with a gradient (its `save_residuals=True`
has no VJP) and has no way to take a cotangent for the lse. These private functions have
the same signatures in jax 0.10.2 and jax main (0.11.x) as of this writing; if a jax
release drops them, `KERNEL_ERROR` says why and the backend reports itself unusable.
"""

from __future__ import annotations

from typing import Any

KERNEL_ERROR: str | None = None

try:
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask_info as mask_info_lib,
    )
except ImportError as err:  # pragma: no cover - depends on the installed jax
    kernel_lib = mask_lib = mask_info_lib = None  # type: ignore[assignment]
    KERNEL_ERROR = f"jax's splash attention cannot be imported: {err}"

_PRIVATE = ("_splash_attention_forward", "_splash_attention_bwd_dkv", "_splash_attention_bwd_dq")
if KERNEL_ERROR is None:
    _missing = [name for name in _PRIVATE if not hasattr(kernel_lib, name)]
    if _missing:  # pragma: no cover - depends on the installed jax
        KERNEL_ERROR = (
            "this jax's splash attention lacks " + ", ".join(_missing)
            + " (the functions jaxattn-splash drives); use jax 0.10.x or 0.11.x"
        )

if KERNEL_ERROR is None:
    BlockSizes = kernel_lib.BlockSizes
    SegmentIds = kernel_lib.SegmentIds
    QKVLayout = kernel_lib.QKVLayout
    DEFAULT_MASK_VALUE: float = float(kernel_lib.DEFAULT_MASK_VALUE)
    MaskInfo = mask_info_lib.MaskInfo
    splash_forward = kernel_lib._splash_attention_forward
    splash_bwd_dkv = kernel_lib._splash_attention_bwd_dkv
    splash_bwd_dq = kernel_lib._splash_attention_bwd_dq
    process_mask = mask_info_lib.process_mask
    process_mask_dkv = mask_info_lib.process_mask_dkv
    process_dynamic_mask = mask_info_lib.process_dynamic_mask
    process_dynamic_mask_dkv = mask_info_lib.process_dynamic_mask_dkv
    SplashMask = mask_lib.Mask
    ComputableMaskBase: Any = mask_lib._ComputableMask
else:  # pragma: no cover
    BlockSizes = SegmentIds = QKVLayout = MaskInfo = None  # type: ignore[assignment,misc]
    DEFAULT_MASK_VALUE = -0.7 * 3.4028234663852886e38
    splash_forward = splash_bwd_dkv = splash_bwd_dq = None  # type: ignore[assignment]
    process_mask = process_mask_dkv = process_dynamic_mask = process_dynamic_mask_dkv = None
    SplashMask = object  # type: ignore[assignment,misc]
    ComputableMaskBase = object

try:  # the TPU-faithful Pallas interpreter (simulated memory spaces, DMAs, uninitialized memory)
    from jax.experimental.pallas import tpu as _pltpu

    InterpretParams: Any = getattr(_pltpu, "InterpretParams", None)
except ImportError:  # pragma: no cover
    InterpretParams = None
