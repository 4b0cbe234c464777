"""Every difference between the JAX versions this plugin supports, in one place.

CI runs jax 0.10.x on CPU (kernels in the Pallas interpreter); the GPU machine runs
jax 0.11.x. Other modules import these names instead of testing versions.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

_TritonParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler parameters (the class was renamed across jax releases)."""
    return _TritonParams(num_warps=num_warps, num_stages=num_stages)


def multiple_of(x: Any, m: int) -> Any:
    """Alignment hint for a traced index (a no-op where Pallas lacks it)."""
    fn = getattr(pl, "multiple_of", None)
    return fn(x, m) if fn is not None else x
