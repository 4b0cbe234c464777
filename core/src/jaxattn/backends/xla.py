"""The built-in `xla` backend: pure `jax.numpy`, every feature, every platform.

It is the numerical reference for every test and the default on a machine with no
plugins. It registers through the same entry-point hook as any plugin. Block sizes come
from `metadata.operation_configs["xla"]`, an `XlaConfig` or a dict of its keys
(`block_q`, `block_kv`, `block_tokens` for paged calls; default 512, 512, 128);
`jaxattn tune` tries a smaller and a larger block on long sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..backend_config import BackendConfig
from ..capabilities import Capabilities
from ..hardware import Hardware
from ..inputs import AttentionInputs, PagedAttentionInputs
from ..metadata import OperationMetadata
from ..operation import OperationImpl, Output
from ..registry import hookimpl
from ..request import AttentionRequest
from .blockwise import blockwise_attention
from .paged import paged_attention_reference

_ALL_PLATFORMS = ("cpu", "gpu", "tpu")


@dataclass(frozen=True)
class XlaConfig(BackendConfig):
    """Block sizes of the `xla` backend (None: the default)."""

    backend = "xla"
    block_q: int | None = None
    block_kv: int | None = None
    block_tokens: int | None = None  # paged calls: query tokens per block

    def __post_init__(self) -> None:
        for key in self.keys():
            self.check_int(key)


def _blocks(metadata: OperationMetadata) -> dict[str, int]:
    return metadata.operation_config("xla", XlaConfig).to_dict()


def _tuning_space(request: AttentionRequest) -> Sequence[Mapping[str, Any]]:
    if max(request.q_len, request.kv_len) <= 512:
        return ({},)  # one block either way: nothing to choose
    return ({}, {"block_q": 256, "block_kv": 256}, {"block_q": 1024, "block_kv": 1024})


class XlaAttention(OperationImpl):
    """Blockwise online-softmax attention in `jax.numpy`, with a recomputing backward."""

    name: ClassVar[str] = "xla"
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = _ALL_PLATFORMS
    priority: ClassVar[dict[str, int]] = {"cpu": 10, "gpu": 0, "tpu": 0}
    config_class: ClassVar[type[BackendConfig] | None] = XlaConfig
    capabilities: ClassVar[Capabilities] = Capabilities()  # every feature

    def tuning_space(self, request: AttentionRequest, hardware: Hardware) -> Sequence[Mapping[str, Any]]:
        return _tuning_space(request)

    def forward_native(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Output:
        blocks = _blocks(metadata)
        blocks.pop("block_tokens", None)
        out, lse = blockwise_attention(inputs, softmax_dtype=metadata.runtime_softmax_dtype, **blocks)
        return out, (lse if inputs.return_lse else None)


class XlaPagedAttention(OperationImpl):
    """Paged-cache attention (decode and ragged prefill+decode) in `jax.numpy`."""

    name: ClassVar[str] = "xla"
    op: ClassVar[str] = "paged_attention"
    platforms: ClassVar[tuple[str, ...]] = _ALL_PLATFORMS
    priority: ClassVar[dict[str, int]] = {"cpu": 10, "gpu": 0, "tpu": 0}
    config_class: ClassVar[type[BackendConfig] | None] = XlaConfig
    kv_scales: ClassVar[bool] = True  # int8/fp8 pages: dequantized one gathered block at a time
    capabilities: ClassVar[Capabilities] = Capabilities()  # every feature

    def forward_native(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> Output:
        blocks = _blocks(metadata)
        blocks.pop("block_q", None)
        return paged_attention_reference(inputs, softmax_dtype=metadata.runtime_softmax_dtype, **blocks)


@hookimpl
def jaxattn_register_backends() -> list[OperationImpl]:
    return [XlaAttention(), XlaPagedAttention()]
