"""Measured selection: `jaxattn tune`, the tuning table it writes, and the tables `auto` reads.

    jaxattn tune --preset llm                      # time every usable backend, write the cache
    jaxattn tune --batch 4 --q-len 4096 --q-heads 32 --kv-heads 8 --head-dim 128 --causal

`auto` then ranks a call's usable backends by what was measured for it (the exact shape
or the nearest measured bucket), separately for differentiated and forward-only calls,
before declared priorities. Modules: `table.py` (the JSON format and matching),
`cache.py` (where tables are found, which ones count), `tune.py` (measuring).
"""

from __future__ import annotations

from .cache import (
    ENV_VAR,
    MeasuredTables,
    TuningCacheWarning,
    default_cache_path,
    device_slug,
    package_tables,
)
from .table import SCHEMA, SCHEMA_VERSION, Case, Entry, TableError, TuningTable, bucket
from .tune import PRESETS, format_table, preset, save, tune

__all__ = [
    "ENV_VAR", "PRESETS", "SCHEMA", "SCHEMA_VERSION", "Case", "Entry", "MeasuredTables", "TableError",
    "TuningCacheWarning", "TuningTable", "bucket", "default_cache_path", "device_slug", "format_table",
    "package_tables", "preset", "save", "tune",
]
