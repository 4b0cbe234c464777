"""EasyDeL's attention-mechanism names, and which package provides each first-party backend.

Models written for EasyDeL name their attention by mechanism (`"flash_attn2"`, `"sdpa"`,
`"ragged_page_attention_v3"`...). Each name here stands for an ordered preference list of
jaxattn backends per operation, so it works wherever a backend name does (`backend=`,
`use_backend`, `JAXATTN_BACKEND`, `FlexibleAttention(attention_mechanism=...)`): the
selector tries the list in order and `explain` shows why each earlier entry was passed
over. A backend of the list that is not installed is passed over with the package that
provides it; asking by its own name for a backend that is not installed is an error that
says which package to install.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AttentionMechanisms(str, enum.Enum):
    """EasyDeL's mechanism names (members compare equal to their strings)."""

    AUTO = "auto"
    VANILLA = "vanilla"
    SDPA = "sdpa"
    BLOCKWISE = "blockwise"
    FLASH_ATTN2 = "flash_attn2"
    CUDA_FLASH_ATTN2 = "cuda_flash_attn2"
    CUDNN = "cudnn"
    BLOCKSPARSE = "blocksparse"
    SPLASH = "blocksparse"  # EasyDeL's alias of BLOCKSPARSE
    RAGGED_PAGE_ATTENTION_V2 = "ragged_page_attention_v2"
    RAGGED_PAGE_ATTENTION_V3 = "ragged_page_attention_v3"
    PAGED_ATTENTION = "page_attention"
    REGRESSIVE_DECODE = "autoregressive_decodeattn"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Mechanism:
    """What one mechanism name means: backend preference lists per operation.

    `attention` / `paged_attention`: backend names in order of preference, or None when
    the mechanism does not serve that operation.
    """

    attention: tuple[str, ...] | None
    paged_attention: tuple[str, ...] | None
    description: str = ""


MECHANISMS: dict[str, Mechanism] = {
    "vanilla": Mechanism(("xla",), ("xla",), description="plain jax.numpy attention"),
    "blockwise": Mechanism(("xla",), ("xla",), description="blockwise online-softmax jax.numpy"),
    "sdpa": Mechanism(("cudnn", "xla"), ("xla",),
                      description="jax.nn.dot_product_attention: cuDNN where it serves, else xla"),
    "flash_attn2": Mechanism(("flash",), None, description="flash attention kernels (Pallas)"),
    "cuda_flash_attn2": Mechanism(("flash",), None, description="flash attention kernels on NVIDIA GPUs"),
    "cudnn": Mechanism(("cudnn",), None, description="cuDNN fused attention"),
    "blocksparse": Mechanism(("splash", "flash"), None,
                             description="block-sparse kernels that skip empty tiles: splash (TPU), flash"),
    "ragged_page_attention_v2": Mechanism(None, ("ragged_paged",), description="ragged paged attention"),
    "ragged_page_attention_v3": Mechanism(None, ("ragged_paged",), description="ragged paged attention"),
    "page_attention": Mechanism(None, ("ragged_paged", "decode"), description="paged-cache attention"),
    "autoregressive_decodeattn": Mechanism(("cudnn", "flash", "xla"), ("decode", "ragged_paged", "xla"),
                                           description="decoding over a KV cache"),
}

PROVIDERS: dict[str, str] = {
    "flash": "jaxattn-flash",
    "splash": "jaxattn-splash",
    "cudnn": "jaxattn-cudnn",
    "ragged_paged": "jaxattn-ragged",
    "decode": "jaxattn-ragged",
}
"""First-party backend name -> the distribution that provides it (for "not installed" errors)."""


def provider_hint(name: str) -> str:
    """'; flash is provided by jaxattn-flash (pip install jaxattn-flash)', or '' for unknown names."""
    dist = PROVIDERS.get(name)
    return f"; {name!r} is provided by the {dist} package (pip install {dist})" if dist else ""


def mechanism(name: str) -> Mechanism | None:
    """The mechanism called `name` (a string or an `AttentionMechanisms`), or None."""
    return MECHANISMS.get(str(name))


def backends_for(name: str, op: str) -> tuple[str, ...] | None:
    """The backend preference list that mechanism `name` stands for in `op` (None: not a
    mechanism). Raises ValueError when the mechanism does not serve `op`."""
    found = mechanism(name)
    if found is None:
        return None
    names = found.attention if op == "attention" else found.paged_attention
    if names is None:
        other = "jaxattn.paged_attention" if op == "attention" else "jaxattn.attention"
        raise ValueError(f"backend: the mechanism {str(name)!r} ({found.description}) does not serve {op}; "
                         f"use it with {other}")
    return names
