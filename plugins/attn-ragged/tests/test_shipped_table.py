"""The H200 serve table this plugin ships says what BENCHMARKS.md says `auto` does on an H200.

The table is data measured on a GPU (`jaxattn tune --preset serve`, 2026-12-02); these checks
keep a re-tune or a hand edit from silently changing the choices the docs promise, and read
the file the way the selector does (`TuningTable.ranking`, the request the API builds).
"""

from __future__ import annotations

from importlib import resources

import pytest

from jaxattn.bench import BenchShape, requests
from jaxattn.tuning.table import TuningTable
from jaxattn_ragged.plugin import DecodeConfig, RaggedConfig

CONFIGS = {"ragged_paged": RaggedConfig, "decode": DecodeConfig}


@pytest.fixture(scope="module")
def table() -> TuningTable:
    text = resources.files("jaxattn_ragged").joinpath("tuning/NVIDIA-H200.json").read_text()
    return TuningTable.from_json(text)


def _decode_entry(table: TuningTable, batch: int, kv_len: int):
    found = [e for e in table.entries if (e.case.batch, e.case.q_len, e.case.kv_len) == (batch, batch, kv_len)]
    assert len(found) == 1, (batch, kv_len)
    return found[0]


def test_every_measured_setting_is_one_its_backend_takes(table):
    assert table.device_kind == "NVIDIA H200" and table.platform == "gpu"
    for entry in table.entries:
        for m in entry.measurements:
            assert not m.error, (entry.case.describe(), m.backend, m.error)
            if m.backend in CONFIGS:
                CONFIGS[m.backend].from_mapping(m.config)  # raises ValueError naming a bad key


@pytest.mark.parametrize(("batch", "kv_len", "winner"), [
    (1, 131072, ("decode", {"mosaic": 1})),  # 0.161 vs 0.169 ms (the Triton kernel, ragged_paged)
    (128, 2048, ("decode", {"mosaic": 1})),  # 0.282 vs 0.296 ms
    (32, 8192, ("decode", {})),              # 0.281 vs 0.288 ms (Mosaic)
    (8, 4096, ("decode", {"mosaic": 1})),    # 0.054 vs 0.063 ms
])
def test_the_decode_rows_choose_what_benchmarks_md_says(table, batch, kv_len, winner):
    names, _, configs = _decode_entry(table, batch, kv_len).ranking(False)
    assert (names[0], configs[0]) == winner


def test_a_decode_call_built_by_the_api_matches_its_measured_row_exactly(table):
    """The table's case keys are those the API's request gives (page size, decode, lengths)."""
    request, train = requests(BenchShape(8, 1, 4096, 32, 8, 128, True, "bfloat16", page_size=16))
    assert train is None  # paged attention is never differentiated
    ranking = table.ranking(request, source="shipped")
    assert ranking is not None and ranking.match == "exact shape"
    assert ranking.names[0] == "decode"
