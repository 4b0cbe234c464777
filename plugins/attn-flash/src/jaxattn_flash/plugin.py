"""Entry point of the `jaxattn.backends` group: registers the `flash` backend and
ships its measured tuning tables."""

from __future__ import annotations

import jaxattn

from .backend import FlashAttention


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[jaxattn.OperationImpl]:
    return [FlashAttention()]


@jaxattn.hookimpl
def jaxattn_tuning_tables() -> list:
    """The measured tables this package ships (`jaxattn_flash/tuning/*.json`, one per device kind,
    written by `jaxattn tune --preset llm --json-out ...`): `auto` ranks by them until the
    user's own `jaxattn tune` cache covers a call."""
    return jaxattn.tuning.package_tables("jaxattn_flash")
