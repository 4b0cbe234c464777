#!/usr/bin/env bash
# The GPU checks of the repository, for the device machine (jax 0.11.x, CUDA), in parts that
# each fit one 10-minute device call:
#   bash bench/gpu_checks.sh PART [OUTDIR]
#     flash    flash's conformance on the compiled kernels (tests/test_flash.py; ~6.5 min on an H100)
#     mosaic   flash's Mosaic GPU paths (tests/test_flash_mosaic_gpu.py; more than one call since the
#              backward's runs: -k to split)
#     rest     the cudnn and ragged GPU tests (ragged ~1 min), then bench/bench_auto.py (~1 min)
#     quant    the ragged GPU tests (quantized pages included), then the quantized-cache benchmark
#              (bench_ragged.py --sections quant: bf16 vs int8 vs fp8 pages beside cuDNN; JSON in OUTDIR)
#     all      the three in order (more than one device call)
# Every part installs the core and all plugins (no network needed) and lists the backends.
# Logs go to OUTDIR (default ./gpu-logs); the exit status is that of the tests.
set -o pipefail
part="${1:-}"
out="${2:-gpu-logs}"
case "$part" in
  flash|mosaic|rest|quant|all) ;;
  *) echo "usage: bash bench/gpu_checks.sh flash|mosaic|rest|quant|all [OUTDIR]" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation \
    -e core -e plugins/attn-cudnn -e plugins/attn-flash -e plugins/attn-ragged -e plugins/attn-splash || exit 1
python3 -m jaxattn.cli list-backends 2>&1 | tee "$out/list-backends.txt"

status=0
run_tests() {  # NAME PATH...
  local name="$1"; shift
  python3 -m pytest -q -m gpu --durations=10 "$@" 2>&1 | tee "$out/gpu-tests-$name.log"
  local rc=$?
  [ "$rc" -ne 0 ] && status=$rc
}
if [ "$part" = flash ] || [ "$part" = all ]; then
  run_tests flash plugins/attn-flash/tests/test_flash.py
fi
if [ "$part" = mosaic ] || [ "$part" = all ]; then
  run_tests mosaic plugins/attn-flash/tests/test_flash_mosaic_gpu.py
fi
if [ "$part" = rest ] || [ "$part" = all ]; then
  run_tests rest plugins/attn-cudnn/tests/test_gpu.py plugins/attn-ragged/tests/test_backends.py
  python3 bench/bench_auto.py 2>&1 | tee "$out/auto.md"
fi
if [ "$part" = quant ]; then
  run_tests ragged plugins/attn-ragged/tests/test_backends.py
  python3 plugins/attn-ragged/bench/bench_ragged.py --sections quant --json "$out/bench_ragged_quant.json" 2>&1 \
    | tee "$out/bench_ragged_quant.log"
fi
exit $status
