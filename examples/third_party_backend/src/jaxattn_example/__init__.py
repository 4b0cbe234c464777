"""jaxattn-example: a third-party jaxattn backend, `example_dense` (see README.md).

Importing this package does not register anything: jaxattn finds the backend through the
`jaxattn.backends` entry point of the installed distribution (`jaxattn_example.plugin`).
"""

from .backend import MAX_LOGITS, DenseAttention, ExampleConfig, dense_attention

__version__ = "0.1.0"
__all__ = ["MAX_LOGITS", "DenseAttention", "ExampleConfig", "dense_attention"]
