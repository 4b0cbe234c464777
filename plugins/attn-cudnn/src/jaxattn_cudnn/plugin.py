"""Entry point of the `jaxattn.backends` group: registers the `cudnn` backend."""

from __future__ import annotations

import jaxattn

from .backend import CudnnAttention


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[jaxattn.OperationImpl]:
    return [CudnnAttention()]
