"""Entry point of the `jaxattn.backends` group: registers the `flash` backend."""

from __future__ import annotations

import jaxattn

from .backend import FlashAttention


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[jaxattn.OperationImpl]:
    return [FlashAttention()]
