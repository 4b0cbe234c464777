"""Entry point of the `jaxattn.backends` group: registers the `splash` backend."""

from __future__ import annotations

import jaxattn

from .backend import SplashAttention


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[jaxattn.OperationImpl]:
    return [SplashAttention()]
