"""The module the `jaxattn.backends` entry point names: it hands jaxattn the backends.

jaxattn imports it at discovery and calls the hook; a failure here (an import error, a bad
declaration) is reported by `jaxattn list-backends` as a broken plugin and never stops the
other backends.
"""

from __future__ import annotations

import jaxattn

from .backend import DenseAttention


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[jaxattn.OperationImpl]:
    return [DenseAttention()]
