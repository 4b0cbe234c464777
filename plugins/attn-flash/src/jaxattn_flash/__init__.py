"""jaxattn-flash: FlashAttention kernels written in Pallas (Triton lowering; Mosaic GPU forward on Hopper).

    import jaxattn
    out = jaxattn.attention(q, k, v, is_causal=True, backend="flash")

`FlashAttention(interpret=True)` runs the same kernels through the Pallas interpreter
(CPU tests).
"""

from .backend import FlashAttention, flash_attention
from .config import FlashConfig

__all__ = ["FlashAttention", "FlashConfig", "flash_attention"]
__version__ = "0.1.0"
