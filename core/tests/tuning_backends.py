"""Test backends for measured selection: all compute with the `xla` math, and count their traces.

* `Sluggish`: deliberately slow (busy work beside the attention), yet the highest priority.
* `Tunable`: slow with its default settings, fast with `spin=0` (a declared tuning space).
* `FwdFast`, `TrainFast`: named by the call kind a table says each wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

import jaxattn
from jaxattn import BackendConfig, Support
from jaxattn.backends.xla import XlaAttention


def busy(x: jax.Array, spins: int) -> jax.Array:
    """Zero, computed slowly from `x` (`spins` chained 64x64 matmuls XLA cannot drop)."""
    if spins == 0:
        return jnp.zeros((), x.dtype)
    m = jnp.full((64, 64), 1e-3, jnp.float32) * jnp.mean(lax.stop_gradient(x)).astype(jnp.float32)
    m = lax.fori_loop(0, spins, lambda i, m: jnp.tanh(m @ m + 1e-3), m)
    return (0.0 * jnp.sum(m)).astype(x.dtype)


class Counting(XlaAttention):
    """xla math; `calls` counts traces of its forward (one per jit trace, not per run)."""

    aliases = ()
    platforms = ("cpu", "gpu")
    priority = {"cpu": 1, "gpu": 1}
    calls = 0
    seen_configs: list = []

    def supports(self, request, hardware):
        return Support.yes()

    def forward_native(self, inputs, metadata):
        type(self).calls += 1
        type(self).seen_configs.append(metadata.get_operation_config(self.name))
        return super().forward_native(inputs, metadata)


class Sluggish(Counting):
    name = "sluggish"
    priority = {"cpu": 1000, "gpu": 1000}

    def forward_native(self, inputs, metadata):
        out, lse = super().forward_native(inputs, metadata)
        return out * (1 + busy(inputs.query, 300)), lse  # a product: grad needs the busy value too


@dataclass(frozen=True)
class TunableConfig(BackendConfig):
    backend = "tunable"
    spin: int | None = None

    def __post_init__(self):
        self.check_int("spin", minimum=0)


class Tunable(Counting):
    name = "tunable"
    config_class = TunableConfig

    def tuning_space(self, request, hardware):
        return ({}, {"spin": 0})

    def forward_native(self, inputs, metadata):
        spins = metadata.operation_config("tunable", TunableConfig).spin
        out, lse = super().forward_native(inputs, metadata)
        return out * (1 + busy(inputs.query, 300 if spins is None else spins)), lse


class FwdFast(Counting):
    name = "fwdfast"


class TrainFast(Counting):
    name = "trainfast"


class Plugin:
    @jaxattn.hookimpl
    def jaxattn_register_backends(self):
        return [Sluggish(), Tunable(), FwdFast(), TrainFast()]


def reset_counts() -> None:
    for cls in (Sluggish, Tunable, FwdFast, TrainFast):
        cls.calls = 0
        cls.seen_configs = []
