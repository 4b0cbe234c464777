"""`MeasuredTables`: the tuning cache `auto` reads by default, and where its files live.

Sources, first match wins: the user's cache (`JAXATTN_TUNING_CACHE`, else
`~/.cache/jaxattn/tuning-<device kind>.json`, written by `jaxattn tune`), then the tables
plugins ship (`jaxattn_tuning_tables` hook, in discovery order). Nothing is read until
`auto` first ranks a call on a device kind, and each file is read once per process (the
selector's `set_tuning_cache(None)` starts over).

A user cache is ignored, with a `TuningCacheWarning`, when it cannot be read (bad JSON,
wrong schema: never an exception), when it was measured on another device kind
(foreign), or with another jax or another version of a measured distribution (stale:
run `jaxattn tune` again). A shipped table is for the devices it names: tables of other
device kinds are skipped quietly, and one measured with other versions still counts (it
is the plugin's own statement of what is fastest, as its defaults are; `explain` shows
what it was measured with). An unreadable shipped table warns, as a user cache does.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Any

import jax

from ..hardware import Hardware
from ..registry import Registry, TableRecord, default_registry
from ..request import AttentionRequest
from ..selector import MeasuredRanking
from .table import TableError, TuningTable, stale_versions

ENV_VAR = "JAXATTN_TUNING_CACHE"
OFF = "off"  # JAXATTN_TUNING_CACHE=off: no user cache (shipped tables still count)

logger = logging.getLogger("jaxattn")


class TuningCacheWarning(UserWarning):
    """A tuning cache or table was ignored: unreadable, foreign or stale."""


def device_slug(device_kind: str) -> str:
    """A device kind as a file-name part: "NVIDIA H200" -> "NVIDIA-H200"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", device_kind).strip("-") or "unknown"


def default_cache_path(device_kind: str) -> Path | None:
    """`JAXATTN_TUNING_CACHE` when set (None when it is "off"), else
    `~/.cache/jaxattn/tuning-<device kind>.json`."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() == OFF:
        return None
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jaxattn" / f"tuning-{device_slug(device_kind)}.json"


def package_tables(package: str, folder: str = "tuning") -> list[Any]:
    """Every `*.json` in `folder` of `package` (its package data), for `jaxattn_tuning_tables`."""
    root = resources.files(package) / folder
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def installed_versions(distributions: Any) -> dict[str, str | None]:
    """Distribution -> installed version (None when it is not installed)."""
    found: dict[str, str | None] = {}
    for dist in distributions:
        try:
            found[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            found[dist] = None
    return found


@dataclass(frozen=True)
class _Source:
    table: TuningTable
    label: str  # for explain: where it came from and what it was measured with


class MeasuredTables:
    """The default `TuningCache`: the user's cache file, then the tables plugins ship.

    `path` overrides the user cache's location (default: `default_cache_path`);
    `registry` is where shipped tables are found (default: the process-wide one).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, registry: Registry | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.registry = registry
        self._loaded: dict[tuple[str, int], tuple[_Source, ...]] = {}
        self._warned: set[str] = set()

    def ranking(self, request: AttentionRequest, hardware: Hardware) -> MeasuredRanking | tuple[str, ...]:
        for source in self.sources(hardware):
            found = source.table.ranking(request, source.label)
            if found is not None:
                return found
        return ()

    def sources(self, hardware: Hardware) -> tuple[_Source, ...]:
        """The tables that count on `hardware`, in the order they are consulted."""
        registry = self.registry or default_registry()
        tables = registry.tuning_tables()
        key = (hardware.device_kind, registry.generation)
        if key not in self._loaded:
            self._loaded[key] = tuple(self._user(hardware)) + tuple(self._shipped(tables, hardware))
        return self._loaded[key]

    # -- the user's cache ------------------------------------------------------------------
    def _user(self, hardware: Hardware) -> list[_Source]:
        path = self.path or default_cache_path(hardware.device_kind)
        if path is None or not path.is_file():
            return []
        table = self._read(f"tuning cache {path}", path.read_text)
        if table is None:
            return []
        if table.device_kind != hardware.device_kind:
            self._warn(f"tuning cache {path} ignored: measured on {table.device_kind!r}, not on this "
                       f"{hardware.device_kind!r} (foreign cache)")
            return []
        stale = stale_versions(table, jax.__version__, installed_versions(table.versions))
        if stale:
            self._warn(f"tuning cache {path} ignored: measured with {', '.join(stale)} (stale cache; "
                       f"run `jaxattn tune` again)")
            return []
        return [_Source(table, f"tuning cache {path}")]

    # -- tables plugins ship -----------------------------------------------------------------
    def _shipped(self, records: list[TableRecord], hardware: Hardware) -> list[_Source]:
        found = []
        for record in records:
            where = f"table {_name(record.location)} of {record.distribution} {record.version}"
            location = record.location
            table = self._read(where, location.read_text if hasattr(location, "read_text")
                               else Path(location).read_text)
            if table is None:
                continue
            if table.device_kind != hardware.device_kind:
                logger.debug("jaxattn: %s is for %s, not %s", where, table.device_kind, hardware.device_kind)
                continue
            found.append(_Source(table, f"{where} (measured with jax {table.jax_version})"))
        return found

    # -- reading, warning ------------------------------------------------------------------
    def _read(self, where: str, read: Any) -> TuningTable | None:
        try:
            return TuningTable.from_json(read())
        except (OSError, UnicodeDecodeError, TableError) as err:
            self._warn(f"{where} ignored: cannot be read ({err})")
        except Exception as err:  # noqa: BLE001 - a bad file never breaks selection
            self._warn(f"{where} ignored: {type(err).__name__}: {err}")
        return None

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, TuningCacheWarning, stacklevel=2)


def _name(location: Any) -> str:
    return str(getattr(location, "name", location))
