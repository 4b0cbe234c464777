"""Measured selection: `tune`, the table's JSON round trip, staleness, foreign caches, buckets."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import jax
import jax.numpy as jnp
import pytest
from tuning_backends import Plugin, Tunable, reset_counts

import jaxattn
from jaxattn import Hardware, selector
from jaxattn.bench import BenchResult, BenchShape
from jaxattn.request import AttentionRequest
from jaxattn.tuning import Case, Entry, MeasuredTables, TuningCacheWarning, TuningTable, bucket, save, tune

SHAPE = BenchShape(1, 64, 64, 2, 2, 16, True, "float32")


@pytest.fixture(autouse=True)
def tuning_backends(monkeypatch, tmp_path):
    """The test backends on a pretend CPU machine, the user cache in a temporary file."""
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)
    monkeypatch.setenv("JAXATTN_TUNING_CACHE", str(tmp_path / "cache.json"))
    reg = jaxattn.default_registry()
    reg.add_plugin(Plugin(), "tuning-backends")
    reset_counts()
    jaxattn.set_tuning_cache(None)
    with jaxattn.hardware.override(Hardware.cpu()):
        yield tmp_path / "cache.json"
    reg.remove_plugin("tuning-backends")
    jaxattn.set_tuning_cache(None)


def qkv(shape=SHAPE):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    dims = [(shape.batch, shape.q_len, shape.q_heads, shape.head_dim)] + [
        (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim)] * 2
    return tuple(jax.random.normal(k, d, jnp.float32) for k, d in zip(keys, dims))


def table_of(*measurements, device_kind="cpu", jax_version=None, versions=None, case=None):
    case = case or Case.of(jaxattn.select(*qkv(), is_causal=True).request)
    return TuningTable(device_kind, "cpu", jax_version or jax.__version__, versions or {},
                       (Entry(case, tuple(measurements)),))


def test_slow_backend_of_highest_priority_loses_to_xla_after_tune(tuning_backends):
    q, k, v = qkv()
    assert jaxattn.select(q, k, v, is_causal=True).name == "sluggish"  # declared priority 1000
    table = tune([SHAPE], ["sluggish", "xla"], repeats=2, inner=1, progress=False)
    assert "wrote" in save(table, tuning_backends)
    sel = jaxattn.select(q, k, v, is_causal=True)
    assert sel.name == "xla" and sel.forward_only.name == "xla"
    assert sel.measured.names[0] == "xla" and "sluggish" in sel.measured.names
    text = sel.explain()
    assert "by auto: measured forward+backward" in text and "faster than sluggish" in text
    assert "measured forward," in text and str(tuning_backends) in text and "exact shape" in text
    # a new tune of the same file merges: both cases are kept
    other = BenchShape(1, 32, 32, 2, 2, 16, False, "float32")
    assert "merged" in save(tune([other], ["xla"], search=False, repeats=1, inner=1, progress=False),
                            tuning_backends)
    assert len(TuningTable.from_json(tuning_backends.read_text()).entries) == 2


def test_tune_picks_settings_from_the_backends_space_and_auto_applies_them(tuning_backends):
    save(tune([SHAPE], ["tunable"], repeats=2, inner=1, progress=False), tuning_backends)
    q, k, v = qkv()
    sel = jaxattn.select(q, k, v, is_causal=True, backend="auto")
    assert sel.name == "tunable" and sel.config == {"spin": 0}
    assert "settings {'spin': 0}" in sel.explain()
    Tunable.seen_configs = []
    jaxattn.attention(q, k, v, is_causal=True)
    assert Tunable.seen_configs == [{"spin": 0}]  # the tuned setting reached the backend
    mine = jaxattn.OperationMetadata(operation_configs={"tunable": {"spin": 3}})
    jaxattn.attention(q, k, v, is_causal=True, metadata=mine)
    assert Tunable.seen_configs[-1] == {"spin": 3}  # the call's own settings win
    with pytest.raises(ValueError, match=r"\['tunable'\]\['spin'\] must be an int >= 0, got -1"):
        jaxattn.attention(q, k, v, is_causal=True,
                          metadata=jaxattn.OperationMetadata(operation_configs={"tunable": {"spin": -1}}))


def test_table_round_trips_through_json(tuning_backends):
    shape = BenchShape(1, 64, 64, 2, 2, 16, True, "float32", window=8)
    record = BenchResult("xla", shape, 1e-3, None, config={"block_q": 256})
    table = table_of(record, BenchResult("sluggish", shape, None, None, "RuntimeError: boom"),
                     versions={"jaxattn": "0.1.0"})
    again = TuningTable.from_json(table.to_json())
    assert again == table
    assert json.loads(table.to_json())["schema_version"] == 1
    save(table, tuning_backends)
    assert TuningTable.from_json(tuning_backends.read_text()).entries == table.entries


def _ignored_with_warning(path, text, match):
    path.write_text(text)
    jaxattn.set_tuning_cache(None)
    q, k, v = qkv()
    with pytest.warns(TuningCacheWarning, match=match):
        sel = jaxattn.select(q, k, v, is_causal=True)
    assert sel.name == "sluggish" and sel.measured is None  # declared priority again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxattn.select(q, k, v, is_causal=False)  # warned once per file, not per call


def test_stale_foreign_and_malformed_caches_are_ignored_with_a_warning(tuning_backends):
    fast = BenchResult("xla", SHAPE, 1e-4, 1e-4)
    _ignored_with_warning(tuning_backends, table_of(fast, jax_version="0.0.1").to_json(),
                          r"jax 0\.0\.1 .*stale cache")
    _ignored_with_warning(tuning_backends, table_of(fast, versions={"jaxattn": "0.0.1"}).to_json(),
                          r"jaxattn 0\.0\.1 .*stale cache")
    _ignored_with_warning(tuning_backends, table_of(fast, device_kind="NVIDIA H200").to_json(),
                          "measured on 'NVIDIA H200'.*foreign")
    _ignored_with_warning(tuning_backends, "{not json", "cannot be read")
    bad_schema = dict(json.loads(table_of(fast).to_json()), schema_version=99)
    _ignored_with_warning(tuning_backends, json.dumps(bad_schema), "version 99")
    broken = json.loads(table_of(fast).to_json())
    broken["entries"][0]["measurements"][0]["forward_s"] = "fast"
    _ignored_with_warning(tuning_backends, json.dumps(broken), r"\['forward_s'\]")
    _ignored_with_warning(tuning_backends, "[1, 2]", "expected a JSON object")
    # a valid, current cache counts
    tuning_backends.write_text(table_of(fast).to_json())
    jaxattn.set_tuning_cache(None)
    assert jaxattn.select(*qkv(), is_causal=True).name == "xla"


def _request(**changes):
    base = AttentionRequest(op="attention", batch=4, q_len=4096, kv_len=4096, num_q_heads=32, num_kv_heads=8,
                            head_dim=128, value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16",
                            mask_kinds=frozenset({"causal"}), needs_grad=True, band=(None, 0))
    return dataclasses.replace(base, **changes)


def test_requests_match_exactly_or_by_the_nearest_measured_bucket():
    assert [bucket(n) for n in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]
    shape = BenchShape(4, 4096, 4096, 32, 8, 128, True)
    entries = tuple(Entry(Case.of(_request(q_len=n, kv_len=n)), (BenchResult("xla", shape, 1e-3, 2e-3),))
                    for n in (4096, 16384))
    table = TuningTable("cpu", "cpu", jax.__version__, {}, entries)
    entry, how = table.lookup(_request())
    assert how == "exact shape" and entry.case.q_len == 4096
    entry, how = table.lookup(_request(q_len=3000, kv_len=3000, batch=2))
    assert entry.case.q_len == 4096 and how.startswith("nearest measured bucket: b=4 q=4096")
    assert table.lookup(_request(q_len=9000, kv_len=9000))[0].case.q_len == 16384  # one bucket up from 16384
    assert table.lookup(_request(q_len=6000, kv_len=6000))[0].case.q_len == 4096  # 8192 bucket: 4096 nearer
    assert table.lookup(_request(q_len=1024, kv_len=1024)) is None  # two buckets away: says nothing
    assert table.lookup(_request(head_dim=64, value_head_dim=64)) is None
    assert table.lookup(_request(dtype="float16")) is None
    assert table.lookup(_request(mask_kinds=frozenset())) is None
    assert table.lookup(_request(return_lse=True)) is None
    windowed = _request(mask_kinds=frozenset({"causal", "sliding_window"}), band=(-1024, 0))
    assert table.lookup(windowed) is None  # a window is another family
    ranked = table.ranking(_request(needs_grad=False), "here")
    assert ranked.names == ("xla",) and ranked.seconds == (1e-3,) and ranked.source == "here"
    assert table.ranking(_request(), "here").seconds == (2e-3,)


def test_shipped_tables_count_for_their_device_only(monkeypatch, tmp_path):
    package = tmp_path / "shipped_pkg"
    (package / "tuning").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    fast = BenchResult("xla", SHAPE, 1e-4, 1e-4)
    (package / "tuning" / "cpu.json").write_text(table_of(fast, jax_version="0.0.1").to_json())
    (package / "tuning" / "h200.json").write_text(table_of(fast, device_kind="NVIDIA H200").to_json())
    (package / "tuning" / "notes.txt").write_text("not a table")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = jaxattn.tuning.package_tables("shipped_pkg")
    assert [p.name for p in found] == ["cpu.json", "h200.json"]

    class Ships:
        @jaxattn.hookimpl
        def jaxattn_tuning_tables(self):
            return found

    reg = jaxattn.default_registry()
    reg.add_plugin(Ships(), "ships", distribution="shipped-pkg", version="1.0")
    try:
        jaxattn.set_tuning_cache(None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # other versions and other devices: no warning for a shipped table
            sel = jaxattn.select(*qkv(), is_causal=True)
        assert sel.name == "xla"
        assert "table cpu.json of shipped-pkg 1.0 (measured with jax 0.0.1)" in sel.why()
    finally:
        reg.remove_plugin("ships")


def test_a_broken_table_hook_is_a_broken_plugin_not_a_crash():
    class Bad:
        @jaxattn.hookimpl
        def jaxattn_tuning_tables(self):
            raise RuntimeError("no tables today")

    reg = jaxattn.default_registry()
    reg.add_plugin(Bad(), "bad-tables")
    try:
        assert jaxattn.select(*qkv(), is_causal=True).name == "sluggish"
        assert any(b.plugin == "bad-tables" and "no tables today" in b.error for b in reg.broken)
    finally:
        reg.remove_plugin("bad-tables")


def test_choices_are_logged_once_and_the_selection_cache_is_bounded(monkeypatch, caplog):
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="jaxattn"):
        jaxattn.select(q, k, v, is_causal=True)
        jaxattn.select(q, k, v, is_causal=True)
    chosen = [r for r in caplog.records if r.name == "jaxattn" and "-> sluggish" in r.getMessage()]
    assert len(chosen) == 2  # differentiated and forward-only, logged once for the configuration
    monkeypatch.setattr(selector, "CACHE_SIZE", 3)
    for n in range(8, 14):
        jaxattn.select(q[:, :n], k, v)
    assert len(selector._cache) == 3


def test_measured_tables_reads_each_file_once(tuning_backends):
    tuning_backends.write_text(table_of(BenchResult("xla", SHAPE, 1e-4, 1e-4)).to_json())
    tables = MeasuredTables()
    first = tables.sources(Hardware.cpu())
    tuning_backends.write_text("garbage")
    assert tables.sources(Hardware.cpu()) is first


def test_tune_times_paged_calls_forward_only(tuning_backends):
    shape = BenchShape(2, 1, 64, 4, 2, 16, True, "float32", page_size=16)
    table = tune([shape], ["xla"], repeats=1, inner=1, progress=False)
    (record,) = table.entries[0].measurements
    assert record.forward_s > 0 and record.train_s is None and not record.error
    assert "decode" in table.entries[0].case.features and "page_size=16" in table.entries[0].case.features
    save(table, tuning_backends)
    request = AttentionRequest(op="paged_attention", batch=2, q_len=2, kv_len=64, num_q_heads=4, num_kv_heads=2,
                               head_dim=16, value_head_dim=16, mask_kinds=frozenset({"causal"}), kv_seq_lengths=True,
                               mode="decode", paged=jaxattn.PagedLayout(8, 16, 4, 2, False))
    sel = jaxattn.select_request(request)
    assert sel.name == "xla" and sel.measured is not None and "exact shape" in sel.why()


def test_packed_documents_are_timed_with_segment_ids_and_match_only_packed_calls(tuning_backends):
    """`BenchShape(documents=N)` (`bench`/`tune --documents N`) times calls with segment ids of N
    equal documents per row: FLOPs count the pairs inside a document, the tuned entry's features
    hold "segment", and only calls with segment ids match it (a plain causal call does not)."""
    packed = BenchShape(1, 64, 64, 2, 2, 16, True, "float32", documents=4)
    assert packed.flops() == pytest.approx(SHAPE.flops() / 4)
    ids = packed.segment_ids()
    assert ids.shape == (1, 64) and [int(x) for x in ids[0, ::16]] == [0, 1, 2, 3]
    assert "4 documents" in packed.describe()
    assert BenchShape.from_dict(json.loads(json.dumps(packed.to_dict()))) == packed
    for bad in (dict(documents=3), dict(documents=0), dict(documents=2, kv_len=32), dict(documents=2, page_size=16)):
        with pytest.raises(ValueError, match="documents"):
            dataclasses.replace(packed, **bad)

    table = tune([packed], ["sluggish", "xla"], repeats=1, inner=1, progress=False)
    (entry,) = table.entries
    assert "segment" in entry.case.features and "causal" in entry.case.features
    assert all(not m.error and m.forward_s > 0 and m.train_s > 0 for m in entry.measurements)
    save(table, tuning_backends)
    q, k, v = qkv()
    assert jaxattn.select(q, k, v, is_causal=True).name == "sluggish"  # no measured match: priority
    other_ids = (jnp.arange(64) // 32)[None]  # two documents: same features, same bucket
    sel = jaxattn.select(q, k, v, is_causal=True, segment_ids=other_ids)
    assert sel.name == "xla" and sel.measured is not None


def test_bench_command_rejects_documents_that_do_not_divide_the_sequence(capsys):
    from jaxattn.cli import main

    assert main(["bench", "--q-len", "100", "--documents", "3", "--backends", "xla"]) == 2
    assert "documents" in capsys.readouterr().err
