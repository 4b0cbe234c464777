"""Bar charts of attention timings: `jaxattn bench --plot FILE` and the documentation's plots.

Timings are records (`bench.BenchResult`) and tables are made from records; a plot is one
more view of the same records, so it lives beside them rather than in each script. One
chart form serves both users: groups of bars (a shape, or a shape and a pass) with one bar
per implementation, peers drawn hatched beside ours, so that a reader compares within one
group, as the measurements are meant to be compared (one run, one machine).

matplotlib is optional (`pip install 'jaxattn[plot]'`) and imported only here, only when a
plot is drawn; `import jaxattn` never imports it. Output is chosen by the file's suffix
(.png, .svg, .pdf). SVG output is reproducible (no date, fixed element ids, text kept as text), so
committed plots change only when their numbers do.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .bench import BenchResult

TRAIN_FLOP_FACTOR = 3.5  # forward+backward counts 3.5x the forward's FLOPs (as `jaxattn bench` does)


def pyplot() -> Any:
    """`matplotlib.pyplot` on the non-interactive Agg backend; ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'jaxattn[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    path: str | os.PathLike[str],
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    peers: Collection[str] = (),
    note: str = "",
) -> None:
    """Grouped bars: for each of `groups`, one bar per entry of `series` (None: no bar).

    `series` maps a label to one value per group; labels in `peers` are drawn hatched.
    """
    if not groups or not series:
        raise ValueError("series: nothing to plot (no groups or no series)")
    for label, values in series.items():
        if len(values) != len(groups):
            raise ValueError(f"series[{label!r}]: {len(values)} values for {len(groups)} groups")
    plt = pyplot()
    n = len(series)
    width = 0.8 / n
    with plt.rc_context({"svg.hashsalt": "jaxattn", "svg.fonttype": "none", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 + len(groups) * (0.35 + 0.16 * n)), 4.2))
        colors = plt.get_cmap("tab10").colors
        for i, (label, values) in enumerate(series.items()):
            xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            peer = label in peers
            ax.bar(xs, ys, width, label=label, color=colors[i % len(colors)], alpha=0.55 if peer else 1.0,
                   hatch="//" if peer else None, edgecolor="black" if peer else "none", linewidth=0.4)
        ax.set_xticks(range(len(groups)))
        rotate = max(len(g) for g in groups) > 12
        ax.set_xticklabels(groups, rotation=25 if rotate else 0, ha="right" if rotate else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        if note:
            ax.set_xlabel(note, fontsize=7, color="dimgray")
        metadata = {"Date": None} if str(path).endswith(".svg") else None
        fig.savefig(path, metadata=metadata, bbox_inches="tight")
        plt.close(fig)


def plot_results(results: Sequence[BenchResult], path: str | os.PathLike[str], *, title: str = "jaxattn bench") -> None:
    """TFLOP/s of `jaxattn bench` records: a group per shape and pass, a bar per backend (and config)."""
    groups: list[tuple[str, str]] = []
    values: dict[str, dict[tuple[str, str], float]] = {}
    for r in results:
        label = r.backend + (f" {dict(r.config)}" if r.config else "")
        for pass_name, seconds, factor in (("fwd", r.forward_s, 1.0), ("fwd+bwd", r.train_s, TRAIN_FLOP_FACTOR)):
            tflops = r.tflops(seconds, factor)
            if tflops is None:
                continue
            group = (r.shape.describe(), pass_name)
            if group not in groups:
                groups.append(group)
            values.setdefault(label, {})[group] = tflops
    if not groups:
        raise ValueError("results: no timing to plot (every backend failed or none ran)")
    shapes = {shape for shape, _ in groups}
    names = [p if len(shapes) == 1 else f"{s}\n{p}" for s, p in groups]
    series = {label: [by_group.get(g) for g in groups] for label, by_group in values.items()}
    note = next(iter(shapes)) if len(shapes) == 1 else ""
    bar_chart(path, names, series, title=title, ylabel="TFLOP/s", note=note)
