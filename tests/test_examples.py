"""The examples users copy run as written (at a tiny size), as CI runs them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("flax")


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "decoder_nnx.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_decoder_trains_and_generates_with_the_kv_cache():
    """The script itself fails unless the loss falls and cached generation equals recomputation."""
    out = run("--steps", "30", "--batch", "4", "--seq", "32", "--generate", "6")
    assert "loss" in out and "generated" in out


def test_decoder_bench_reports_both_attentions():
    report = json.loads(run("--bench", "--batch", "2", "--seq", "16", "--layers", "1").strip().splitlines()[-1])
    assert report["jaxattn"]["tokens_per_s"] > 0 and report["flax"]["tokens_per_s"] > 0
    if report["device"] == "cpu":
        assert report["chosen_backend"] == "xla"
