"""`jaxattn bench --plot FILE`: matplotlib only when asked, a clear error without it, a real file with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxattn import bench
from jaxattn.bench import BenchResult, BenchShape
from jaxattn.cli import main

BENCH = ["bench", "--batch", "1", "--q-len", "64", "--q-heads", "2", "--head-dim", "16", "--dtype", "float32",
         "--causal", "--backends", "xla", "--repeats", "1", "--inner", "1"]


def test_import_jaxattn_never_imports_matplotlib():
    code = "import sys, jaxattn, jaxattn.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_without_matplotlib_says_how_to_install_it_before_timing(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("timed before checking matplotlib"))
    assert main([*BENCH, "--plot", str(tmp_path / "b.png")]) == 2
    assert "pip install 'jaxattn[plot]'" in capsys.readouterr().err


def test_bench_plot_writes_the_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.svg"
    assert main([*BENCH, "--plot", str(path)]) == 0
    svg = path.read_text()
    assert svg.startswith("<?xml") and "xla" in svg and "fwd+bwd" in svg
    assert "plot written to" in capsys.readouterr().err


def test_plot_results_of_several_shapes_and_configs(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxattn.plot import bar_chart, plot_results

    a, b = BenchShape(1, 256, 256, 2, 2, 32, True, "float32"), BenchShape(2, 128, 128, 2, 1, 32)
    results = [BenchResult("xla", a, 1e-3, 4e-3), BenchResult("xla", a, 2e-3, None, config={"block_q": 64}),
               BenchResult("xla", b, 1e-3, 3e-3), BenchResult("broken", b, None, None, error="RuntimeError: x")]
    plot_results(results, tmp_path / "several.png")
    assert (tmp_path / "several.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no timing"):
        plot_results(results[-1:], tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"series\['x'\]: 1 values for 2 groups"):
        bar_chart(tmp_path / "bad.png", ["a", "b"], {"x": [1.0]}, title="t", ylabel="y")
