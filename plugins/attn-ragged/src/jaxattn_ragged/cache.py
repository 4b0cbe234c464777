"""The paged cache writer moved into the core (`jaxattn.update_paged_cache`, with quantized
pages and their scales); `update_paged_kv_cache` and `token_slots` stay here as aliases, so
code written against this plugin keeps working.
"""

from __future__ import annotations

from jaxattn.paged_cache import token_slots
from jaxattn.paged_cache import update_paged_cache as update_paged_kv_cache

__all__ = ["token_slots", "update_paged_kv_cache"]
