"""The `cudnn` backend: cuDNN fused (flash) attention through JAX, as a jaxattn OperationImpl."""

from __future__ import annotations

from typing import ClassVar

from jaxattn import (
    AttentionInputs,
    AttentionRequest,
    Capabilities,
    Hardware,
    OperationImpl,
    OperationMetadata,
    Support,
    value_guard,
)

from .capabilities import CAPABILITIES, EMULATED, hardware_reasons, request_reasons
from .translate import Untranslatable, emulate_cudnn, run_cudnn, translate

Output = tuple


EMULATED_GPU = Hardware.nvidia((9, 0), 91900)


class CudnnAttention(OperationImpl):
    """cuDNN fused attention (`jax.nn.dot_product_attention(implementation="cudnn")` and
    the private entry point under it).

    `emulate=True` gives an instance for tests on any machine: the same translation of
    the inputs, with cuDNN's computation replaced by a plain `jax.numpy` evaluation of
    the same arguments (float32 accepted). The registered instance is `emulate=False`:
    it is usable only on an NVIDIA GPU that cuDNN flash attention supports.
    """

    name: ClassVar[str] = "cudnn"
    aliases: ClassVar[tuple[str, ...]] = ("cudnn_flash", "cudnn_sdpa")
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = ("gpu",)
    # Above flash (100): on every shape of the H100 peers table cuDNN is the faster kernel
    # (BENCHMARKS.md); flash serves what cuDNN cannot (soft-cap, sinks, chunked masks...).
    priority: ClassVar[dict[str, int]] = {"gpu": 120}

    capabilities: ClassVar[Capabilities] = CAPABILITIES

    def __init__(self, *, emulate: bool = False) -> None:
        self.emulate = emulate
        if emulate:
            self.capabilities = EMULATED  # type: ignore[misc]

    def is_available(self, hardware: Hardware) -> Support:
        if self.emulate:
            return Support.yes()
        return Support.from_reasons(hardware_reasons(hardware))

    def extra_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        # emulated: cuDNN's rules as on a current Hopper GPU, whatever machine runs the emulation
        return request_reasons(request, EMULATED_GPU if self.emulate else hardware)

    def _run(self, inputs: AttentionInputs) -> Output:
        # cuDNN multiplies p @ v with p = 0 on masked keys: the guard keeps a non-finite value of
        # a masked key from the rows that do not see it (README "Semantics").
        return value_guard.guarded(self._translated, inputs)

    def _translated(self, inputs: AttentionInputs) -> Output:
        try:
            call = translate(inputs)
        except Untranslatable as err:
            raise ValueError(f"cudnn cannot serve this call: {err}") from None
        out, lse = emulate_cudnn(call) if self.emulate else run_cudnn(call)
        return out, (lse if inputs.return_lse else None)

    def forward_cuda(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Output:
        return self._run(inputs)

    def forward_native(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Output:
        if self.emulate:
            return self._run(inputs)
        raise RuntimeError("cudnn runs only on NVIDIA GPUs (CUDA); use CudnnAttention(emulate=True) for tests")

    def __repr__(self) -> str:
        return f"<CudnnAttention 'cudnn'{' emulated' if self.emulate else ''}>"
