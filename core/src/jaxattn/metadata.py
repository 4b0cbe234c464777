"""Run-time configuration shared by all backends, and the sharding rules derived from it.

`OperationMetadata` holds what is not an array: dtypes, the softmax scale, the device
mesh with the mapping of logical axes to mesh axes (`PartitionAxis`), and per-backend
configs (block sizes...: a dict or the backend's typed `BackendConfig`). `get_shardings`
turns it into `AttnShardingRules`, the `PartitionSpec`s a backend is run with under
`shard_map`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, TypeVar

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .backend_config import BackendConfig
from .request import MODES

C = TypeVar("C", bound=BackendConfig)

AxisNames = str | tuple[str, ...] | None
CONTEXT_PARALLEL = ("auto", "ring", "ulysses", "all_gather")


@dataclass(frozen=True)
class PartitionAxis:
    """Which mesh axes each logical axis of attention is sharded over.

    Axes missing from the mesh are ignored, so one `PartitionAxis` serves meshes of
    different shapes. Batch and heads are sharded as given; the sequence is sharded over
    `sequence_axis` (one mesh axis) by context parallelism (`jaxattn.parallel`) when that
    axis has more than one device.
    """

    batch_axis: AxisNames = ("dp", "fsdp")
    head_axis: AxisNames = "tp"
    kv_head_axis: AxisNames = "tp"
    sequence_axis: str | None = "sp"


def _names(axes: AxisNames) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


class AttnShardingRules(NamedTuple):
    """PartitionSpecs for every array of an attention call, in the `[batch, seq, heads, head_dim]` layout.

    query/key/value/output: `[batch, seq, heads, dim]`; bias and mask:
    `[batch, heads, q, kv]`; segment ids and sequence lengths: `[batch, ...]`;
    softmax_aux (sinks): `[q_heads]`; lse: `[batch, q_heads, q_len]`.
    `kv_repeat` > 1 means K/V heads are repeated that many times before sharding,
    because the tensor axis has more shards than there are K/V heads (GQA).
    """

    query: P
    key: P
    value: P
    bias: P
    mask: P
    output: P
    q_segment_ids: P
    kv_segment_ids: P
    softmax_aux: P
    lse: P
    seq_lengths: P
    kv_repeat: int = 1


@dataclass(frozen=True)
class OperationMetadata:
    """Configuration of an attention call beyond its arrays.

    * `runtime_dtype`: cast query/key/value to this before the kernel (None: keep).
    * `runtime_softmax_dtype`: dtype of the softmax (float32 by default).
    * `softmax_scale`: used when the call gives no `scale` (None: 1/sqrt(head_dim)).
    * `mesh` / `partition_axis`: run the backend under `shard_map` over this mesh.
    * `operation_configs`: per-backend settings, e.g. `{"flash": {"block_q": 128}}` or
      `{"flash": FlashConfig(block_q=128)}` (the backend's typed config; dicts are checked
      against it before the backend runs).
    * `mode` / `needs_grad`: override the inferred mode ("train" unless q_len == 1).
    * `context_parallel`: how a sequence sharded over `partition_axis.sequence_axis` is
      attended: "ring", "ulysses", "all_gather" or "auto" (see `jaxattn.parallel`).
    * `load_balanced`: the sequence is in `jaxattn.load_balance` order (causal work even
      across the sequence shards).
    * `checked`: under `jax.jit`, also report bad array values (sequence lengths, page
      tables, `cu_q_lens`) through `jax.experimental.checkify` (wrap the jitted function in
      `checkify.checkify`). Without it they are clamped and masked, silently but safely.
    """

    runtime_dtype: Any = None
    runtime_softmax_dtype: Any = jnp.float32
    softmax_scale: float | None = None
    mesh: Mesh | None = None
    partition_axis: PartitionAxis = field(default_factory=PartitionAxis)
    operation_configs: Mapping[str, Mapping[str, Any] | BackendConfig] = field(default_factory=dict)
    mode: str | None = None
    needs_grad: bool | None = None
    context_parallel: str = "auto"
    load_balanced: bool = False
    checked: bool = False

    def __post_init__(self) -> None:
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ValueError(f"metadata.context_parallel must be one of {CONTEXT_PARALLEL}, "
                             f"got {self.context_parallel!r}")
        if not isinstance(self.load_balanced, bool):
            raise ValueError(f"metadata.load_balanced must be a bool, got {self.load_balanced!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"metadata.mode must be one of {MODES} or None, got {self.mode!r}")
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise ValueError(f"metadata.mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if not isinstance(self.operation_configs, Mapping):
            raise ValueError("metadata.operation_configs must map backend names to dicts or BackendConfigs")
        for name, config in self.operation_configs.items():
            if not isinstance(name, str) or not isinstance(config, (Mapping, BackendConfig)):
                raise ValueError(f"metadata.operation_configs[{name!r}]: expected a dict or a BackendConfig, "
                                 f"got {type(config).__name__}")
        if not isinstance(self.checked, (bool, np.bool_)):
            raise ValueError(f"metadata.checked: expected a bool, got {self.checked!r}")
        if self.runtime_dtype is not None:
            _floating_dtype(self.runtime_dtype, "metadata.runtime_dtype", " or None")
        _floating_dtype(self.runtime_softmax_dtype, "metadata.runtime_softmax_dtype")
        scale = self.softmax_scale
        if scale is not None and (isinstance(scale, (bool, np.bool_)) or not isinstance(
                scale, (int, float, np.integer, np.floating)) or not math.isfinite(scale)):
            raise ValueError(f"metadata.softmax_scale: expected a finite number or None, got {scale!r}")

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> OperationMetadata:
        """Build from a dict or any object with matching attributes (a model config).

        Recognized keys: the field names of this class, plus the common aliases
        `attn_dtype` (runtime_dtype), `attn_softmax_dtype` (runtime_softmax_dtype),
        `softmax_scale`, `mesh`, `partition_axis`, `attn_configs` (operation_configs).
        Keyword arguments win over the config.
        """
        aliases = {
            "attn_dtype": "runtime_dtype",
            "attn_softmax_dtype": "runtime_softmax_dtype",
            "attn_configs": "operation_configs",
        }
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if config is not None:
            get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
            for key in list(names) + list(aliases):
                value = get(key, None)
                if value is not None:
                    values[aliases.get(key, key)] = value
        values.update(overrides)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"OperationMetadata.from_config: unknown keys {sorted(unknown)}")
        return cls(**values)

    def get_operation_config(self, name: str) -> dict[str, Any]:
        """The settings for backend `name` as a dict (a copy; empty when none are given)."""
        config = self.operation_configs.get(name, {})
        return config.to_dict() if isinstance(config, BackendConfig) else dict(config)

    def operation_config(self, name: str, config_class: type[C]) -> C:
        """The settings for backend `name` as its typed config (validated; defaults when none)."""
        return config_class.from_mapping(self.operation_configs.get(name))

    def with_operation_config(self, name: str, config: Mapping[str, Any] | BackendConfig) -> OperationMetadata:
        """A copy whose settings for backend `name` are `config` (the others kept)."""
        return replace(self, operation_configs={**self.operation_configs, name: config})

    def mesh_axis_size(self, axes: AxisNames) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in _names(axes) if a in self.mesh.shape)

    def _present(self, axes: AxisNames) -> tuple[str, ...]:
        if self.mesh is None:
            return ()
        return tuple(a for a in _names(axes) if a in self.mesh.shape and self.mesh.shape[a] > 1)

    def get_shardings(
        self,
        mode: str = "train",
        layout: str = "bshd",
        *,
        batch: int | None = None,
        num_q_heads: int | None = None,
        num_kv_heads: int | None = None,
    ) -> AttnShardingRules:
        """The PartitionSpecs for a call of `mode` in `layout` ("bshd" or "paged").

        Given the sizes, an axis that does not divide its dimension is left unsharded
        (replicated) rather than failing inside `shard_map`. K/V heads are repeated when
        the tensor axis exceeds them (`kv_repeat`), so each shard holds the K/V heads of
        its own query heads.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if layout not in ("bshd", "paged"):
            raise ValueError(f"layout must be 'bshd' or 'paged', got {layout!r}")
        pa = self.partition_axis
        batch_axes = self._present(pa.batch_axis)
        head_axes = self._present(pa.head_axis)
        if batch is not None and batch % self.mesh_axis_size(batch_axes):
            batch_axes = ()
        tp = self.mesh_axis_size(head_axes)
        kv_repeat = 1
        if num_q_heads is not None and num_q_heads % tp:
            head_axes = ()
        elif num_kv_heads is not None and head_axes and num_kv_heads % tp:
            if tp % num_kv_heads or (num_q_heads is not None and num_q_heads % tp):
                head_axes = ()
            else:
                kv_repeat = tp // num_kv_heads
        if layout == "paged" and kv_repeat > 1:
            head_axes, kv_repeat = (), 1  # never copy a whole KV cache to shard it
        b = _spec_entry(batch_axes)
        h = _spec_entry(head_axes)
        if layout == "paged":
            tokens = P(None, h, None)
            pages = P(None, None, h, None)
            return AttnShardingRules(
                query=tokens, key=pages, value=pages, bias=P(), mask=P(), output=tokens,
                q_segment_ids=P(), kv_segment_ids=P(), softmax_aux=P(h), lse=P(h, None),
                seq_lengths=P(), kv_repeat=kv_repeat,
            )
        bshd = P(b, None, h, None)
        return AttnShardingRules(
            query=bshd,
            key=bshd,
            value=bshd,
            bias=P(b, h, None, None),
            mask=P(b, h, None, None),
            output=bshd,
            q_segment_ids=P(b, None),
            kv_segment_ids=P(b, None),
            softmax_aux=P(h),
            lse=P(b, h, None),
            seq_lengths=P(b),
            kv_repeat=kv_repeat,
        )


def _floating_dtype(value: Any, name: str, alternative: str = "") -> None:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        shown = getattr(value, "__name__", None) or repr(value)
        raise ValueError(f"{name}: expected a floating-point dtype{alternative}, got {shown}")


def int_setting(backend: str, key: str, value: Any, *, minimum: int = 1) -> int:
    """`metadata.operation_configs[backend][key]` checked to be an int >= `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"metadata.operation_configs[{backend!r}][{key!r}]: expected an int >= {minimum}, "
                         f"got {value!r}")
    return int(value)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes
