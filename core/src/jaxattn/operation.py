"""`OperationImpl`: the base class of every attention backend.

A backend subclasses it, sets the class attributes, declares what it can do (its
`capabilities`, with `extra_reasons()` for rules that are not data, or its own
`supports()`), and implements a `forward_*` method for each platform it declares (or
`forward_native`); registration checks all of these (`faults.declaration_problems`) and
reports a backend that gets them wrong as broken. Calling the instance first checks
that the backend supports the call (the core's one check: forwards do not repeat it),
then runs the `forward_*` of the platform the call runs on (`dispatch`):
`forward_cuda`/`forward_rocm` on those GPUs, else `forward_gpu`, `forward_tpu`,
`forward_cpu`, and `forward_native` when the platform has no method of its own. Each
returns `(out, lse)`; `lse` may be None when `inputs.return_lse` is False.

Optionally a backend declares its settings as a typed `config_class` (a `BackendConfig`;
the core validates `metadata.operation_configs[name]` against it before the backend runs)
and a small `tuning_space`: the settings `jaxattn tune` tries besides the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

from .backend_config import BackendConfig
from .capabilities import Capabilities
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .metadata import OperationMetadata
from .request import OPS, AttentionRequest
from .support import Support

Inputs = AttentionInputs | PagedAttentionInputs
Output = tuple[jax.Array, jax.Array | None]


class OperationImpl:
    """One attention backend.

    Class attributes:
      name: the registry name (`backend="name"`).
      aliases: other names it answers to.
      op: "attention" or "paged_attention".
      platforms: the platforms it can run on ("cpu", "gpu", "tpu").
      priority: per-platform rank for `auto` (higher wins), e.g. {"gpu": 100}; a
        measured tuning table, when it covers the call, ranks before this.
      config_class: the typed settings (a `BackendConfig` subclass), or None (dicts unchecked).
      kv_scales: a paged backend that reads `k_scale`/`v_scale` (int8/fp8 pages, scaled
        caches) sets it True; without it the core rejects such calls for the backend
        (`declared_reasons`), so one written before quantized caches never ignores scales.
      capabilities: what it can do (`Capabilities`), checked by the default `supports()`;
        None when the backend implements `supports()` itself.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[Mapping[str, int]] = {}
    partitioning: ClassVar[str] = "xla"
    """How the backend runs under plain `jax.jit` with sharded inputs: "xla" (XLA partitions
    its operations itself: pure jax.numpy, or custom calls that come with sharding rules) or
    "shard" (opaque kernels, e.g. Pallas: jaxattn runs it per batch/head shard, see
    `jaxattn.partitioning`)."""
    config_class: ClassVar[type[BackendConfig] | None] = None
    kv_scales: ClassVar[bool] = False
    capabilities: ClassVar[Capabilities | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op not in OPS:
            raise ValueError(f"{cls.__name__}.op must be one of {OPS}, got {cls.op!r}")

    # -- what a backend declares ------------------------------------------------------
    def is_available(self, hardware: Hardware) -> Support:
        """Can this backend run on this machine at all (independent of any request)?"""
        if hardware.platform not in self.platforms:
            wanted = " or ".join(p.upper() for p in self.platforms) or "no platform"
            return Support.no(f"{self.name} needs {wanted}; this machine is {hardware.platform}")
        return Support.yes()

    def supports(self, request: AttentionRequest, hardware: Hardware) -> Support:
        """Can this backend serve `request` on `hardware`? Say every reason it cannot.

        The default: the reasons of `is_available`, the standard reasons of the declared
        `capabilities`, then `extra_reasons()`. A backend may override it instead."""
        if self.capabilities is None:
            raise NotImplementedError(f"{type(self).__name__} must declare capabilities or implement supports()")
        if request.op != self.op:
            return Support.no(f"{self.name} implements {self.op}, not {request.op}")
        reasons = list(self.is_available(hardware).reasons)
        reasons += self.capabilities.reasons(self.name, request)
        reasons += [r for r in self.extra_reasons(request, hardware) if r not in reasons]
        return Support.from_reasons(reasons)

    def extra_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        """Reasons beyond the declared capabilities (hardware rules, shapes...); none by default."""
        return []

    def declared_reasons(self, request: AttentionRequest) -> tuple[str, ...]:
        """What the core rejects from the class attributes alone, before asking `supports()`."""
        if request.kv_scale != "none" and not self.kv_scales:
            return (f"{self.name} does not read k_scale/v_scale (quantized or scaled paged caches; a backend "
                    "that does declares kv_scales = True)",)
        return ()

    def priority_on(self, platform: str) -> int:
        return int(self.priority.get(platform, 0))

    def tuning_space(self, request: AttentionRequest, hardware: Hardware) -> Sequence[Mapping[str, Any]]:
        """The settings `jaxattn tune` times for `request` (`{}` = the defaults; keep it small:
        every entry is compiled and timed). Keys are those of `config_class`."""
        return ({},)

    def validate_config(self, metadata: OperationMetadata) -> None:
        """Raise ValueError naming the key when `metadata`'s settings for this backend are bad."""
        if self.config_class is not None:
            metadata.operation_config(self.name, self.config_class)

    # -- what a backend computes ------------------------------------------------------
    def forward_native(self, inputs: Any, metadata: OperationMetadata) -> Output:
        raise NotImplementedError(f"{self.name} has no implementation for this platform")

    def forward_cpu(self, inputs: Any, metadata: OperationMetadata) -> Output:
        return self.forward_native(inputs, metadata)

    def forward_gpu(self, inputs: Any, metadata: OperationMetadata) -> Output:
        return self.forward_native(inputs, metadata)

    def forward_cuda(self, inputs: Any, metadata: OperationMetadata) -> Output:
        return self.forward_gpu(inputs, metadata)

    def forward_rocm(self, inputs: Any, metadata: OperationMetadata) -> Output:
        return self.forward_gpu(inputs, metadata)

    def forward_tpu(self, inputs: Any, metadata: OperationMetadata) -> Output:
        return self.forward_native(inputs, metadata)

    def backward(self, inputs: AttentionInputs, out: jax.Array, lse: jax.Array, d_out: jax.Array,
                 d_lse: jax.Array, metadata: OperationMetadata, hardware: Hardware) -> dict[str, jax.Array] | None:
        """Optional: gradients `{"query": dq, "key": dk, "value": dv, "bias": ..., "sinks": ...}`
        (one entry per differentiable input present) from the forward's `out` and `lse`,
        without running the forward again. Used when a "shard" backend runs partitioned under
        plain jit; None (the default) makes jaxattn recompute the forward on each shard."""
        return None

    def __call__(self, inputs: Inputs, metadata: OperationMetadata, hardware: Hardware) -> Output:
        """Check that this backend supports `inputs` on `hardware`, then run it (`dispatch`).

        Raises ValueError with every reason when it does not (a forward never sees a call
        it did not accept; `jaxattn.attention` has checked already, through the selection).
        """
        if isinstance(inputs, PagedAttentionInputs):
            request = AttentionRequest.from_paged_inputs(inputs, mode=metadata.mode)
        else:  # the forward needs no backward pass: gradients are the selection's concern
            request = AttentionRequest.from_inputs(inputs, mode=metadata.mode, needs_grad=False)
        verdict = self.is_available(hardware)
        if verdict:
            verdict = self.supports(request, hardware)
        if not verdict:
            raise ValueError(f"{self.name} cannot serve {request.describe()} on {hardware.platform}: {verdict}")
        return self.dispatch(inputs, metadata, hardware)

    def dispatch(self, inputs: Inputs, metadata: OperationMetadata, hardware: Hardware) -> Output:
        """Run the `forward_*` method for `hardware`'s platform."""
        if hardware.platform == "gpu":
            if hardware.is_rocm:
                return self.forward_rocm(inputs, metadata)
            return self.forward_cuda(inputs, metadata)
        if hardware.platform == "tpu":
            return self.forward_tpu(inputs, metadata)
        return self.forward_cpu(inputs, metadata)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} op={self.op}>"
