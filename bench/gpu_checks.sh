#!/usr/bin/env bash
# The GPU checks of the repository, for the device machine (jax 0.11.x, CUDA), in parts that
# each fit one 10-minute device call (times seen on an H200):
#   bash bench/gpu_checks.sh PART [OUTDIR [PYTEST_ARGS...]]
#     flash    flash's conformance on the compiled kernels (tests/test_flash.py; ~6.5 min on an H100)
#     mosaic   flash's Mosaic GPU paths (tests/test_flash_mosaic_gpu.py, one test per (run, case);
#              more than one call: split with PYTEST_ARGS, e.g. `mosaic gpu-logs -k "d64-bf16"`, whose
#              32 tests took 210 s with 8 workers beside the soft-cap ones on 2026-12-03; `-k bitwise`:
#              the forward's store and vote forms against the default, bit for bit)
#     ragged   every gpu test of the ragged plugin: conformance of both backends, quantized pages,
#              the Mosaic decode kernel's forms (~7.5 min)
#     rest     the cudnn GPU tests and flash's non-finite-value tests (a few minutes), then
#              bench/bench_auto.py (~5 min with tokamax installed)
#     quant    the quantized-cache benchmark (bench_ragged.py --sections quant: bf16 vs int8 vs fp8
#              pages beside cuDNN; JSON in OUTDIR; ~5 min)
#     pages    the same at pages of 64 and 32 tokens, defaults and the few cited variants only
#              (--final): is one-byte decode bound by its per-page copies (ragged BENCHMARKS.md)
#     peers    bench/bench_auto.py (auto beside every backend, cuDNN and tokamax's default: issue 16's
#              bars) and plugins/attn-flash/bench/bench_mosaic_bwd.py table mosaic (fwd+bwd beside cuDNN
#              and tokamax's Mosaic kernel: issue 22's); tokamax only where it imports (see below)
#     all      the parts in order (more than one device call)
# Every part installs the core and all plugins (no network needed) and lists the backends. Wheels
# in ./.whl (e.g. tokamax and the packages it needs that the machine lacks, fetched elsewhere with
# `pip download --no-deps`) are installed first into /tmp/site, put on PYTHONPATH. For tokamax 0.0.17
# on the H200 image (2026-12-03) that is: tokamax, einshape, immutabledict, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions (>= 4.16), qwix, tensorboardx, xprof, and
# xprof's fire and termcolor (37 MB; without fire, `import tokamax` fails and its columns read "-").
# Logs go to OUTDIR (default ./gpu-logs); the exit status is that of the tests.
set -o pipefail
part="${1:-}"
out="${2:-gpu-logs}"
pytest_args=("${@:3}")  # passed to every part's pytest (e.g. -k to run part of a part)
case "$part" in
  flash|mosaic|ragged|rest|quant|pages|peers|all) ;;
  *) echo "usage: bash bench/gpu_checks.sh flash|mosaic|ragged|rest|quant|pages|peers|all [OUTDIR [PYTEST_ARGS...]]" >&2
     exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation \
    -e core -e plugins/attn-cudnn -e plugins/attn-flash -e plugins/attn-ragged -e plugins/attn-splash || exit 1
python3 -m jaxattn.cli list-backends 2>&1 | tee "$out/list-backends.txt"

status=0
run_tests() {  # NAME PATH...
  # Where pytest-xdist is installed (the H200 image has it), GPU_TEST_WORKERS processes (default 8)
  # share the GPU, each allocating as it goes: the tests' time is mostly compilation on the CPU
  # cores (2026-12-03: flash's Mosaic backward runs and non-finite tests, 23 tests, < 210 s with 8
  # workers). -v prints each test's verdict as it ends, so a run cut by the call's limit still
  # says which failed (with -q and workers it says only how many).
  local name="$1"; shift
  local workers=()
  if python3 -c "import xdist" 2>/dev/null && [ "${GPU_TEST_WORKERS:-8}" -gt 1 ]; then
    workers=(-n "${GPU_TEST_WORKERS:-8}" -p no:benchmark)
  fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -v -m gpu --tb=short --durations=10 "${workers[@]}" "${pytest_args[@]}" "$@" \
    2>&1 | tee "$out/gpu-tests-$name.log"
  local rc=$?
  [ "$rc" -ne 0 ] && status=$rc
}
if [ "$part" = flash ] || [ "$part" = all ]; then
  run_tests flash plugins/attn-flash/tests/test_flash.py
fi
if [ "$part" = mosaic ] || [ "$part" = all ]; then
  run_tests mosaic plugins/attn-flash/tests/test_flash_mosaic_gpu.py
fi
if [ "$part" = ragged ] || [ "$part" = all ]; then
  run_tests ragged plugins/attn-ragged/tests
fi
if [ "$part" = rest ] || [ "$part" = all ]; then
  run_tests rest plugins/attn-cudnn/tests/test_gpu.py plugins/attn-flash/tests/test_gpu_nonfinite.py
  python3 bench/bench_auto.py 2>&1 | tee "$out/auto.md"
fi
if [ "$part" = quant ] || [ "$part" = all ]; then
  python3 plugins/attn-ragged/bench/bench_ragged.py --sections quant --json "$out/bench_ragged_quant.json" 2>&1 \
    | tee "$out/bench_ragged_quant.log"
fi
if [ "$part" = pages ] || [ "$part" = all ]; then
  for ps in 64 32; do
    python3 plugins/attn-ragged/bench/bench_ragged.py --sections quant --final --page-size "$ps" \
      --json "$out/bench_ragged_quant_ps$ps.json" 2>&1 | tee "$out/bench_ragged_quant_ps$ps.log"
  done
fi
if [ "$part" = peers ] || [ "$part" = all ]; then
  python3 bench/bench_auto.py 2>&1 | tee "$out/auto_peers.md"
  python3 plugins/attn-flash/bench/bench_mosaic_bwd.py table mosaic 2>&1 | tee "$out/bwd_table_peers.log"
fi
exit $status
