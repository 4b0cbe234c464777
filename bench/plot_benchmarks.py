"""Plots of the benchmark tables for the documentation: `python bench/plot_benchmarks.py`.

The measurements live as Markdown tables in BENCHMARKS.md; the plots are another view of
the same numbers, never a second copy to keep in step by hand. This script finds each table
by the heading above it, reads the columns a plot needs (the first number of each cell;
cells without one, such as "fails", are left out), and writes one SVG per plot into
docs/img/bench/ with `jaxattn.plot.bar_chart`, plus the numbers it plotted in
docs/img/bench/data.json. tests/test_docs.py reads the tables again and compares them with
that file, so a table changed without rerunning this script fails CI.

Needs matplotlib (`pip install 'jaxattn[plot]'`) to draw; reading the tables (what the test
does) needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "bench"
PEERS = {"peers: jax.nn cudnn": "jax.nn cudnn", "jax Pallas mha": "jax Pallas mha", "tokamax mosaic": "tokamax mosaic",
         "tokamax cudnn": "tokamax cudnn", "jax.nn cudnn on the dense cache": "jax.nn cudnn, dense cache",
         "jax Pallas decode gqa (dense)": "jax Pallas decode, dense cache"}


@dataclass(frozen=True)
class Plot:
    """One bar chart: columns of the `index`-th table under `heading` in `source`."""

    source: str
    heading: str
    series: dict[str, str]  # column header -> legend label
    title: str
    ylabel: str
    index: int = 0
    peers: tuple[str, ...] = ()  # column headers drawn as peers


def _peer_plot(heading: str, ours: dict[str, str], title: str) -> Plot:
    peers = ("peers: jax.nn cudnn", "jax Pallas mha", "tokamax mosaic", "tokamax cudnn")
    return Plot("BENCHMARKS.md", heading, {**ours, **{p: PEERS[p] for p in peers}}, title, "TFLOP/s", peers=peers)


PLOTS = {
    "h100_forward": _peer_plot("## Forward (TFLOP/s)", {
        "auto (picks)": "auto", "flash, Mosaic fwd": "flash (Mosaic)", "flash, Triton fwd": "flash (Triton)",
        "cudnn via jaxattn": "cudnn"}, "Forward, one H100, bf16 (peers hatched)"),
    "h100_train": _peer_plot("## Forward + backward (TFLOP/s)", {
        "auto (picks)": "auto", "flash (Mosaic fwd + Triton bwd)": "flash", "cudnn via jaxattn": "cudnn"},
        "Forward + backward, one H100, bf16 (peers hatched)"),
    "h100_head_dim_256": Plot("BENCHMARKS.md", "## head_dim 256", {
        "flash fwd": "flash fwd", "cudnn fwd": "cudnn fwd", "flash fwd+bwd": "flash fwd+bwd",
        "cudnn fwd+bwd": "cudnn fwd+bwd"}, "head_dim 256, one H100, bf16", "TFLOP/s"),
    "h100_decode": Plot("BENCHMARKS.md", "## Decode over a paged KV cache", {
        "ragged_paged (`auto`)": "ragged_paged (auto)",
        **{p: PEERS[p] for p in ("jax.nn cudnn on the dense cache", "jax Pallas decode gqa (dense)")}},
        "Paged decode, one H100, 32/8 heads, d128, pages of 16", "TB/s (K and V bytes / time)",
        peers=("jax.nn cudnn on the dense cache", "jax Pallas decode gqa (dense)")),
    "h200_tuned": Plot("BENCHMARKS.md", "## Measured selection on an H200", {
        "cudnn fwd": "cudnn fwd", "flash fwd": "flash fwd", "cudnn fwd+bwd": "cudnn fwd+bwd",
        "flash fwd+bwd": "flash fwd+bwd"}, "What `jaxattn tune` measured on an H200, bf16", "TFLOP/s"),
    "h200_plain_jit": Plot("BENCHMARKS.md", "## Distributed: two H200s of one host", {
        "dp, plain jit": "dp, plain jit", "dp, metadata.mesh": "dp, metadata.mesh", "tp, plain jit": "tp, plain jit",
        "tp, metadata.mesh": "tp, metadata.mesh"}, "Two H200s, (8, 4096, 32/8, 128) causal fwd+bwd",
        "speed-up over one GPU"),
    "h200_context_parallel": Plot("BENCHMARKS.md", "## Distributed: two H200s of one host", {
        "ring": "ring", "ring, balanced": "ring, balanced", "all_gather": "all_gather",
        "all_gather, balanced": "all_gather, balanced", "ulysses": "ulysses", "ulysses, balanced": "ulysses, balanced"},
        "Context parallel over two H200s, causal GQA fwd+bwd", "speed-up over one GPU", index=1),
}


def tables_under(text: str, heading: str) -> list[list[list[str]]]:
    """The tables (rows of cells, header first, no separator) between `heading` and the next heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    if len(starts) != 1:
        raise ValueError(f"heading: {heading!r} found {len(starts)} times")
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in lines[starts[0] + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def _number(cell: str) -> float | None:
    found = re.search(r"\d+(?:[.,]\d+)*", cell.replace("**", ""))
    if found is None or "ms" in cell.split():
        return None  # not a figure of this plot's unit (e.g. "fails", or a time among rates)
    return float(found[0].replace(",", ""))


def _group(row: dict[str, str]) -> str:
    """A short label for a row: its shape (and mask), or its first cell."""
    first = next(iter(row.values()))
    shape = re.fullmatch(r"\((\d+), (\d+), (\d+), (\d+), (\d+)\)", first)
    if shape:  # (batch, seq, q heads, kv heads, head_dim)
        label = f"{shape[1]}x{shape[2]} {shape[3]}/{shape[4]}h d{shape[5]}"
    elif re.fullmatch(r"[\d,]+", first):  # a sequence length
        label = f"seq {first.replace(',', '')}"
    else:  # "(batch, kv_len), note" or a name
        label = re.sub(r"\((\d+), (\d+)\),?", r"\1x\2", first)
    mask = row.get("causal", row.get("mask", ""))
    extra = {"yes": " causal", "no": "", "causal": " causal", "causal, window 1024": " causal w1024",
             "causal, 4 packed documents": " causal 4 docs"}.get(mask, "")
    return label + extra


def plot_data(plot: Plot) -> dict[str, object]:
    """What `plot` draws: `{"groups": [...], "series": {label: [value or None, ...]}}`."""
    tables = tables_under((ROOT / plot.source).read_text(), plot.heading)
    header, *rows = tables[plot.index]
    missing = set(plot.series) - set(header)
    if missing:
        raise ValueError(f"{plot.source} {plot.heading!r}: no column {sorted(missing)} in {header}")
    records = [dict(zip(header, row)) for row in rows]
    series = {label: [_number(r[column]) for r in records] for column, label in plot.series.items()}
    keep = [i for i in range(len(records)) if any(values[i] is not None for values in series.values())]
    return {"groups": [_group(records[i]) for i in keep],
            "series": {label: [values[i] for i in keep] for label, values in series.items()}}


def all_plot_data() -> dict[str, dict[str, object]]:
    return {name: plot_data(plot) for name, plot in PLOTS.items()}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from jaxattn.plot import bar_chart

    OUT.mkdir(parents=True, exist_ok=True)
    data = all_plot_data()
    for name, plot in PLOTS.items():
        peers = [plot.series[p] for p in plot.peers]
        bar_chart(OUT / f"{name}.svg", data[name]["groups"], data[name]["series"], title=plot.title,
                  ylabel=plot.ylabel, peers=peers, note=f"from {plot.source}: {plot.heading.lstrip('# ')}")
    (OUT / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data)} plots and data.json to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
