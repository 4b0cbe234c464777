"""jaxattn-splash: jax's TPU splash (block-sparse) attention as the jaxattn backend `splash`.

    import jaxattn
    out = jaxattn.attention(q, k, v, is_causal=True, sliding_window=1024, backend="splash")

`SplashAttention(interpret=True)` runs the same kernels through the Pallas interpreter
on CPU (slow; for tests). See README.md for what is supported.
"""

from .backend import SplashAttention, describe_mask
from .config import SplashConfig
from .lazy import Band, Chunk, Full, KeyBelow, Node, to_splash_mask
from .mask_info import lazy_mask_info
from .translate import plan_mask

__all__ = [
    "Band", "Chunk", "Full", "KeyBelow", "Node", "SplashAttention", "SplashConfig", "describe_mask", "lazy_mask_info",
    "plan_mask", "to_splash_mask",
]
__version__ = "0.1.0"
