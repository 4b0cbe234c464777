"""`--json` on every reporting command: one JSON document on stdout that parses."""

from __future__ import annotations

import json

import pytest

import jaxattn
from jaxattn.cli import main
from jaxattn.tuning import TuningTable

TINY = ["--q-len", "32", "--q-heads", "2", "--head-dim", "16", "--dtype", "float32", "--repeats", "1",
        "--inner", "1", "--backends", "xla"]


@pytest.fixture(autouse=True)
def cpu(monkeypatch):
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)
    jaxattn.set_tuning_cache(None)
    with jaxattn.hardware.override(jaxattn.Hardware.cpu()):
        yield
    jaxattn.set_tuning_cache(None)


def test_explain_json(capsys):
    assert main(["explain", "--causal", "--window", "16", "--platform", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "xla" and data["source"] == "auto"
    assert data["request"]["mask_kinds"] == ["causal", "sliding_window"] and data["request"]["band"] == [-16, 0]
    assert data["forward_only"]["backend"] == "xla" and data["forward_only"]["request"]["needs_grad"] is False
    assert {r["backend"] for r in data["rejected"]} >= {"flash", "cudnn"}


def test_bench_json(capsys):
    assert main(["bench", *TINY, "--causal", "--window", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (record,) = data["results"]
    assert record["backend"] == "xla" and record["forward_s"] > 0 and record["train_s"] > 0
    assert record["shape"]["window"] == 8 and record["shape"]["causal"] is True


def test_check_json(capsys):
    assert main(["check", "xla", "--cases", "causal", "--dtype", "float32", "--seq", "32", "--head-dim", "16",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["results"][0]["case"] == "causal" and data["results"][0]["status"] == "pass"


def test_tune_json_and_json_out(capsys, tmp_path, monkeypatch):
    out = tmp_path / "plugin" / "tuning" / "cpu.json"
    assert main(["tune", *TINY, "--causal", "--no-search", "--json", "--json-out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = TuningTable.from_json(captured.out)
    assert TuningTable.from_json(out.read_text()) == printed  # the printed table is the file
    assert printed.device_kind == "cpu" and printed.entries[0].case.features == ("causal",)
    assert f"wrote {out}" in captured.err
    monkeypatch.setenv("JAXATTN_TUNING_CACHE", "off")
    assert main(["tune", *TINY]) == 2
    assert "JAXATTN_TUNING_CACHE=off" in capsys.readouterr().err
    assert main(["tune", "--preset", "nope"]) == 2
    assert "preset: expected one of ['llm', 'serve', 'smoke']" in capsys.readouterr().err


def test_tune_writes_the_cache_that_auto_reads(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXATTN_TUNING_CACHE", str(tmp_path / "cache.json"))
    assert main(["tune", *TINY, "--causal", "--no-search"]) == 0
    text = capsys.readouterr().out
    assert "forward-only xla" in text and "fwd+bwd      xla" in text
    assert main(["explain", "--q-len", "32", "--q-heads", "2", "--head-dim", "16", "--dtype", "float32",
                 "--causal", "--platform", "cpu"]) == 0
    assert "measured forward+backward" in capsys.readouterr().out


def test_preset_parts_cover_the_preset_once():
    from jaxattn.tuning import PRESETS, preset

    parts = [preset("llm", f"{k}/3") for k in (1, 2, 3)]
    assert sum(parts, ()) == PRESETS["llm"]
    with pytest.raises(ValueError, match="part: expected K/N"):
        preset("llm", "4/3")
