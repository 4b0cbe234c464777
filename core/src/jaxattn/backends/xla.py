"""The built-in `xla` backend: pure `jax.numpy`, every feature, every platform.

It is the numerical reference for every test and the default on a machine with no
plugins. It registers through the same entry-point hook as any plugin. Block sizes come
from `metadata.get_operation_config("xla")` (`block_q`, `block_kv`; default 512).
"""

from __future__ import annotations

from typing import ClassVar

from ..capabilities import Capabilities
from ..inputs import AttentionInputs, PagedAttentionInputs
from ..metadata import OperationMetadata, int_setting
from ..operation import OperationImpl, Output
from ..registry import hookimpl
from .blockwise import blockwise_attention
from .paged import paged_attention_reference

_ALL_PLATFORMS = ("cpu", "gpu", "tpu")


def _blocks(metadata: OperationMetadata, name: str) -> dict[str, int]:
    config = metadata.get_operation_config(name)
    unknown = set(config) - {"block_q", "block_kv", "block_tokens"}
    if unknown:
        raise ValueError(f"metadata.operation_configs[{name!r}]: unknown keys {sorted(unknown)}")
    return {k: int_setting(name, k, v) for k, v in config.items()}


class XlaAttention(OperationImpl):
    """Blockwise online-softmax attention in `jax.numpy`, with a recomputing backward."""

    name: ClassVar[str] = "xla"
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = _ALL_PLATFORMS
    priority: ClassVar[dict[str, int]] = {"cpu": 10, "gpu": 0, "tpu": 0}
    capabilities: ClassVar[Capabilities] = Capabilities()  # every feature

    def forward_native(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Output:
        blocks = _blocks(metadata, "xla")
        blocks.pop("block_tokens", None)
        out, lse = blockwise_attention(inputs, softmax_dtype=metadata.runtime_softmax_dtype, **blocks)
        return out, (lse if inputs.return_lse else None)


class XlaPagedAttention(OperationImpl):
    """Paged-cache attention (decode and ragged prefill+decode) in `jax.numpy`."""

    name: ClassVar[str] = "xla"
    op: ClassVar[str] = "paged_attention"
    platforms: ClassVar[tuple[str, ...]] = _ALL_PLATFORMS
    priority: ClassVar[dict[str, int]] = {"cpu": 10, "gpu": 0, "tpu": 0}
    capabilities: ClassVar[Capabilities] = Capabilities()  # every feature

    def forward_native(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> Output:
        blocks = _blocks(metadata, "xla")
        blocks.pop("block_q", None)
        return paged_attention_reference(inputs, softmax_dtype=metadata.runtime_softmax_dtype, **blocks)


@hookimpl
def jaxattn_register_backends() -> list[OperationImpl]:
    return [XlaAttention(), XlaPagedAttention()]
