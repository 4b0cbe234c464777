"""Running a `Selection`: tuned settings, `shard_map`, context parallelism, plain-jit
partitioning of opaque kernels, and the forward-only/training split.

Whether a call will be differentiated is not known when it is traced: `jax.grad` traces
the same function as a plain call. So when `auto` chose differently for the two kinds of
call (`Selection.splits`), the call runs as a `jax.custom_vjp` whose primal runs the
forward-only choice and whose forward and backward rules run the differentiated choice's
own forward and `jax.vjp`. A plain (or `jit`-ed) call then only ever runs the forward-only
backend; under `jax.grad`/`jax.vjp`, JAX calls the rules instead of the primal, so the
differentiated backend runs its forward and its backward, exactly as if it had been
chosen alone. Both give the same values up to rounding (the conformance suite holds each
backend to the `xla` reference). Forward-mode autodiff (`jax.jvp`) of a split call is
not defined, as for any `custom_vjp`.

Settings: a backend's tuned settings (`Selection.config`) apply unless the call's
metadata gives that backend settings of its own; either is validated against the
backend's typed `config_class` before it runs.

Failures: a backend `auto` chose that raises while it runs (other than a `ValueError`, bad
input or config, or a device error) raises `BackendFailedError` naming it and how to run
without it (`Selection.failed`); a backend the user forced raises its own error unchanged.
"""

from __future__ import annotations

from typing import Any

import jax

from . import empty as _empty
from . import parallel
from ._compat import is_batched, is_forward_mode_error
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .metadata import OperationMetadata
from .operation import Output
from .partitioning import run_partitioned
from .selector import Selection
from .sharding import run_sharded

FORWARD_MODE = (
    "jaxattn: forward-mode autodiff (jax.jvp, jax.jacfwd) is not supported: backends define "
    "reverse-mode gradients only (jax.custom_vjp); use jax.grad, jax.vjp or jax.jacrev"
)


def _settings(selection: Selection, metadata: OperationMetadata) -> OperationMetadata:
    """`metadata` with the tuned settings of the chosen backend, unless it gives its own."""
    name = selection.name
    if selection.config and name not in metadata.operation_configs:
        metadata = metadata.with_operation_config(name, selection.config)
    selection.backend.validate_config(metadata)
    return metadata


def _partitioned(impl: Any, inputs: Any, metadata: OperationMetadata) -> bool:
    """Whether `impl` runs shard by shard under plain jit (`partitioning.py`): a "shard"
    backend, no explicit mesh, several devices, and not under `vmap` (custom_partitioning
    has no batching rule; a batched call runs as one)."""
    return (getattr(impl, "partitioning", "xla") == "shard" and metadata.mesh is None and jax.device_count() > 1
            and not any(is_batched(x) for x in jax.tree_util.tree_leaves(inputs)))


def _run_one(selection: Selection, inputs: Any, metadata: OperationMetadata, backend_arg: Any) -> Output:
    def backend(inputs: Any, metadata: OperationMetadata, hardware: Hardware) -> Output:
        try:
            if _partitioned(selection.backend, inputs, metadata):
                return run_partitioned(selection.backend, inputs, metadata, hardware)
            return selection.backend(inputs, metadata, hardware)
        except (jax.errors.JaxRuntimeError, ValueError):
            raise  # the device failed (out of memory, ...), or the input or config is bad: not a fault
        except Exception as err:
            if is_forward_mode_error(err):
                raise TypeError(FORWARD_MODE) from err
            if selection.source != "auto":
                raise
            raise selection.failed(err) from err

    metadata = _settings(selection, metadata)
    if metadata.mesh is not None and isinstance(inputs, AttentionInputs) and parallel.sequence_shards(metadata) > 1:
        # each shard selects for its own piece, by the user's `backend` argument
        out, lse = parallel.run_context_parallel(inputs, selection.request, metadata, backend_arg,
                                                 selection.hardware)
    elif metadata.mesh is not None:
        out, lse = run_sharded(backend, inputs, selection.request, metadata, selection.hardware)
    else:
        out, lse = backend(inputs, metadata, selection.hardware)
    return out, (lse if getattr(inputs, "return_lse", False) else None)


def run(selection: Selection, inputs: Any, metadata: OperationMetadata, backend_arg: Any = "auto") -> Output:
    """Run the call `selection` was made for: `(out, lse or None)`. `backend_arg` is the
    call's `backend` argument (context parallelism selects again for each shard's piece)."""
    empty = _empty.paged_result(inputs) if isinstance(inputs, PagedAttentionInputs) else \
        _empty.attention_result(inputs)
    if empty is not None:
        return empty
    forward_only = selection.forward_only
    if forward_only is None or not selection.splits:
        return _run_one(selection, inputs, metadata, backend_arg)
    _settings(forward_only, metadata)  # both kinds of call validate their settings up front
    _settings(selection, metadata)

    # The arrays go in as a flat list, so that JAX never rebuilds an input object (a mask)
    # around the zero cotangents (float0) of its integer and boolean arrays.
    leaves, treedef = jax.tree_util.tree_flatten(inputs)

    @jax.custom_vjp
    def call(leaves: list[Any]) -> Output:
        return _run_one(forward_only, treedef.unflatten(leaves), metadata, backend_arg)

    def call_fwd(leaves: list[Any]) -> tuple[Output, Any]:
        return jax.vjp(lambda xs: _run_one(selection, treedef.unflatten(xs), metadata, backend_arg), leaves)

    def call_bwd(vjp: Any, cotangent: Output) -> tuple[Any]:
        return vjp(cotangent)

    call.defvjp(call_fwd, call_bwd)
    return call(leaves)
