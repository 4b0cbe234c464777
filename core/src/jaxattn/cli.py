"""The `jaxattn` command: list-backends, explain, bench, tune, check (and `--version`).

Every command that reports something takes `--json` (one JSON document on stdout; the
progress of `bench` and `tune` goes to stderr), so scripts never parse tables.
`bench --plot FILE` also draws the timings (matplotlib, the `jaxattn[plot]` extra, imported
only then, and checked before anything is timed).
`list-backends` shows, beside the working backends, every broken plugin or backend (where
it failed and why) and what `JAXATTN_DISABLE_PLUGINS` skipped, so that a user whose
program misbehaves after installing a plugin can see it at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import hardware as _hardware
from ._version import __version__
from .hardware import Hardware
from .listing import broken_plugins, list_backends
from .masks import CausalMask, ChunkedCausalMask, Mask, SlidingWindowMask
from .registry import DISABLE_ENV_VAR, default_registry
from .request import AttentionRequest, PagedLayout, static_band
from .selector import BackendUnavailableError, NoBackendError, select

if TYPE_CHECKING:
    from .bench import BenchShape


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _hardware_from(args: argparse.Namespace) -> Hardware:
    platform = getattr(args, "platform", None)
    if not platform:
        return _hardware.current()
    if platform == "gpu":
        cc = tuple(int(x) for x in args.compute_capability.split("."))
        return Hardware.nvidia(compute_capability=(cc[0], cc[1] if len(cc) > 1 else 0),
                               cudnn_version=args.cudnn_version)
    if platform == "tpu":
        return Hardware.tpu(generation=args.tpu_generation)
    return Hardware.cpu()


def cmd_list_backends(args: argparse.Namespace) -> int:
    hw = _hardware_from(args)
    infos = list_backends(hw)
    broken = broken_plugins()
    disabled = default_registry().disabled
    if args.json:
        print(json.dumps({
            "hardware": {"platform": hw.platform, "device_kind": hw.device_kind},
            "backends": [i.to_dict() for i in infos],
            "broken": [b.to_dict() for b in broken],
            "disabled": [{"name": name, "skipped": what} for name, what in disabled.items()],
        }, indent=2))
        return 0
    rows = [("name", "aliases", "op", "distribution", "platforms", "priority", "usable here")]
    for i in infos:
        rows.append((i.name, ",".join(i.aliases) or "-", i.op, f"{i.distribution} {i.version}",
                     ",".join(i.platforms), str(i.priority.get(hw.platform, 0)),
                     "yes" if i.usable else f"no: {i.reason}"))
    print(f"backends on {hw.platform} ({hw.device_kind}):")
    print(_table(rows))
    if broken:
        print("\nbroken plugins:")
        for b in broken:
            print(f"  {b.describe()}")
    if disabled:
        print(f"\ndisabled by {DISABLE_ENV_VAR}:")
        for name, what in disabled.items():
            print(f"  {name}: {what}")
    return 0


def _window(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [int(p) for p in text.split(",")]
    return (parts[0], parts[-1])


def request_from_args(args: argparse.Namespace) -> AttentionRequest:
    kinds: set[str] = set()
    if args.causal:
        kinds.add("causal")
    if args.window:
        kinds.add("sliding_window")
    if args.chunk:
        kinds.add("chunked_causal")
    if args.segments:
        kinds.add("segment")
    if args.dense_mask:
        kinds.add("dense")
    paged = None
    q_len = args.q_len
    if args.paged:
        kinds.add("causal")
        pages_per_seq = -(-args.kv_len // args.page_size)
        paged = PagedLayout(num_pages=args.batch * pages_per_seq, page_size=args.page_size,
                            pages_per_seq=pages_per_seq, num_seqs=args.batch, ragged=q_len > 1)
        q_len = args.batch * q_len
    mode = args.mode or ("decode" if args.q_len == 1 else "train")
    band, chunk = None, None
    if not args.paged:  # as `attention` would see the same flags (the band decides measured matches)
        band, chunk = static_band(_structural_mask(args, q_len, args.kv_len or args.q_len), q_len,
                                  args.kv_len or args.q_len)
    return AttentionRequest(
        op="paged_attention" if args.paged else "attention",
        batch=args.batch, q_len=q_len, kv_len=args.kv_len or args.q_len,
        num_q_heads=args.q_heads, num_kv_heads=args.kv_heads or args.q_heads,
        head_dim=args.head_dim, value_head_dim=args.head_dim, dtype=args.dtype, kv_dtype=args.dtype,
        mask_kinds=frozenset(kinds), has_bias=args.bias, logits_soft_cap=args.soft_cap,
        has_sinks=args.sinks, dropout=args.dropout, kv_seq_lengths=args.kv_lengths or args.paged,
        q_seq_lengths=args.q_lengths, return_lse=args.return_lse,
        needs_grad=(mode == "train") and not args.paged, mode=mode, paged=paged, band=band, chunk=chunk,
    )


def _structural_mask(args: argparse.Namespace, q_len: int, kv_len: int) -> Mask | None:
    masks: list[Mask] = []
    if args.causal:
        masks.append(CausalMask.bottom_right(q_len, kv_len))
    if args.window:
        masks.append(SlidingWindowMask(args.window[0], min(args.window[1], 0) if args.causal else args.window[1]))
    if args.chunk:
        masks.append(ChunkedCausalMask(args.chunk))
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = combined & mask
    return combined


def cmd_explain(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    try:
        selection = select(request, _hardware_from(args), args.backend)
    except (BackendUnavailableError, NoBackendError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(selection.to_dict(), indent=2) if args.json else selection.explain())
    return 0


def _bench_shape(args: argparse.Namespace) -> BenchShape:
    from .bench import BenchShape

    return BenchShape(args.batch, args.q_len, args.kv_len or args.q_len, args.q_heads,
                      args.kv_heads or args.q_heads, args.head_dim, args.causal or args.paged, args.dtype,
                      args.window, args.page_size if args.paged else None, args.documents)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_results, run_bench

    if args.plot:
        from . import plot

        try:
            plot.pyplot()
        except ImportError as err:
            print(f"error: --plot: {err}", file=sys.stderr)
            return 2
    try:
        shape = _bench_shape(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    backends = args.backends.split(",") if args.backends else None
    results = run_bench([shape], backends, train=not args.forward_only, repeats=args.repeats, inner=args.inner)
    device = _hardware.current().device_kind
    if args.json:
        print(json.dumps({"device_kind": device, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        print(f"device: {device}")
        print(format_results(results))
    if args.plot:
        plot.plot_results(results, args.plot, title=f"jaxattn bench on {device}")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tuning

    try:
        shapes = tuning.preset(args.preset, args.part) if args.preset else (_bench_shape(args),)
        path = args.json_out or tuning.default_cache_path(_hardware.current().device_kind)
        if path is None:
            raise ValueError(f"{tuning.ENV_VAR}=off: no tuning cache to write; pass --json-out FILE")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    backends = args.backends.split(",") if args.backends else None
    table = tuning.tune(shapes, backends, search=not args.no_search, repeats=args.repeats, inner=args.inner)
    try:
        action = tuning.save(table, path)
    except OSError as err:
        print(f"error: cannot write the tuning table to {path}: {err}", file=sys.stderr)
        print(table.to_json(), end="")  # the measurements are not lost
        return 1
    if args.json:
        print(table.to_json(), end="")
    else:
        print(tuning.format_table(table))
    print(action, file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .testing import Shape, run_conformance

    shape = Shape(batch=args.batch, seq=args.seq, num_heads=args.heads, head_dim=args.head_dim,
                  page_size=args.page_size)
    report = run_conformance(
        args.backend, op=args.op, dtypes=args.dtype or None, grads=not args.no_grad,
        cases=args.cases.split(",") if args.cases else None, shape=shape,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def _shape_args(p: argparse.ArgumentParser, seq: int, heads: int, dim: int) -> None:
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-len", type=int, default=seq)
    p.add_argument("--kv-len", type=int, default=None, help="default: q-len")
    p.add_argument("--q-heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=None, help="default: q-heads")
    p.add_argument("--head-dim", type=int, default=dim)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--causal", action="store_true")


def _timing_args(p: argparse.ArgumentParser) -> None:
    _shape_args(p, 1024, 8, 64)
    p.add_argument("--window", type=int, help="sliding window: keys to the left (and right when not causal)")
    p.add_argument("--paged", action="store_true", help="paged_attention: --batch sequences of --kv-len cached "
                                                        "tokens, --q-len queries each (1: decode); forward only")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--documents", type=int, help="packed sequences: every row holds this many equal documents "
                                                 "(segment ids)")
    p.add_argument("--backends", help="comma-separated names (default: every usable one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the records as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxattn", description="Attention backends for JAX.")
    parser.add_argument("--version", action="version", version=f"jaxattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    what_if = argparse.ArgumentParser(add_help=False)
    what_if.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="what-if: pretend this platform")
    what_if.add_argument("--compute-capability", default="9.0")
    what_if.add_argument("--cudnn-version", type=int, default=90800)
    what_if.add_argument("--tpu-generation", type=int, default=5)

    p = sub.add_parser("list-backends", parents=[what_if], help="installed backends and whether they run here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list_backends)

    p = sub.add_parser("explain", parents=[what_if], help="which backend a call would use, and why not the others")
    _shape_args(p, 1024, 8, 128)
    p.add_argument("--window", help="sliding window: W or LEFT,RIGHT")
    p.add_argument("--chunk", type=int, help="chunked-causal chunk size")
    p.add_argument("--segments", action="store_true")
    p.add_argument("--dense-mask", action="store_true")
    p.add_argument("--bias", action="store_true")
    p.add_argument("--soft-cap", action="store_true")
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--dropout", action="store_true")
    p.add_argument("--q-lengths", action="store_true")
    p.add_argument("--kv-lengths", action="store_true")
    p.add_argument("--return-lse", action="store_true")
    p.add_argument("--mode", choices=["train", "prefill", "decode"])
    p.add_argument("--paged", action="store_true", help="paged_attention (kv-len per sequence)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", help="time every usable backend on this device")
    _timing_args(p)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="also draw TFLOP/s per backend to FILE (.png, .svg, .pdf; "
                                                  "needs matplotlib: pip install 'jaxattn[plot]')")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="measure every usable backend per call kind; write the tuning cache auto reads")
    _timing_args(p)
    p.add_argument("--preset", help="a set of common model shapes instead of the shape flags: llm (bf16 "
                                    "attention), serve (bf16 paged decode and prefill) or smoke (tiny, float32)")
    p.add_argument("--part", help="with --preset: only the K-th of N slices of its shapes, e.g. 1/3")
    p.add_argument("--no-search", action="store_true", help="time each backend's defaults only")
    p.add_argument("--json-out", help="write the table to this file (e.g. a plugin's tuning/ folder) "
                                      "instead of the tuning cache")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("check", help="run the conformance suite on one backend")
    p.add_argument("backend")
    p.add_argument("--op", default="attention", choices=["attention", "paged_attention"])
    p.add_argument("--dtype", action="append", help="dtype(s) (default: float32 on CPU, bf16+fp16 elsewhere)")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--no-grad", action="store_true", help="forward only")
    p.add_argument("--batch", type=int, default=2, help="base shape of the cases (default 2)")
    p.add_argument("--seq", type=int, default=128, help="base sequence length (default 128)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default 4; GQA cases use fewer kv heads)")
    p.add_argument("--head-dim", type=int, default=32, help="head_dim (default 32)")
    p.add_argument("--page-size", type=int, default=16, help="page size of the paged cases (default 16)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "explain" and args.window:
        args.window = _window(args.window)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
