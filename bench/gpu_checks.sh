#!/usr/bin/env bash
# Every GPU check of the repository in one go, for the device machine (jax 0.11.x, CUDA):
#   bash bench/gpu_checks.sh [OUTDIR]
# installs the core and all plugins (no network needed), lists the backends, runs every
# test marked `gpu`, then bench/bench_auto.py. Logs go to OUTDIR (default ./gpu-logs).
# On an H100 the tests take ~10 min (flash ~5, its Mosaic tests ~3: every case compiles its
# kernels) and bench_auto ~1 min: more than one 10-minute device call; split it there.
set -o pipefail
out="${1:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation \
    -e core -e plugins/attn-cudnn -e plugins/attn-flash -e plugins/attn-ragged -e plugins/attn-splash || exit 1
python3 -m jaxattn.cli list-backends 2>&1 | tee "$out/list-backends.txt"
python3 -m pytest -q -m gpu --durations=10 plugins 2>&1 | tee "$out/gpu-tests.log"
tests=$?
python3 bench/bench_auto.py 2>&1 | tee "$out/auto.md"
exit $tests
