#!/usr/bin/env bash
# Everything the cudnn plugin does on the device machine, in one call:
#   bash plugins/attn-cudnn/bench/run_device.sh   (from the repository root; logs under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudnn-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e core -e plugins/attn-cudnn > "$OUT/install.log" 2>&1
python3 - <<'PY' > "$OUT/env.txt" 2>&1
import jax, jaxattn
from jaxattn_cudnn import _compat
print("jax", jax.__version__, jax.devices()[0].device_kind, "cudnn", _compat.cudnn_version_of_jax(),
      "private api", _compat.HAS_PRIVATE_API)
print(jaxattn.hardware.current())
PY
cat "$OUT/env.txt"
python3 -m jaxattn.cli list-backends > "$OUT/list-backends.txt" 2>&1
grep -E "^name|^cudnn" "$OUT/list-backends.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu plugins/attn-cudnn/tests/test_gpu.py -s -q -p no:cacheprovider \
  > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?"
grep -E "^(pass|fail|error|rejected) |conformance of|err vs|out=|passed|failed|Error" "$OUT/gpu-tests.log" | cut -c1-200 | tail -80
timeout "${BENCH_TIMEOUT:-200}" python3 plugins/attn-cudnn/bench/bench_cudnn.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
cat "$OUT/bench.log" | cut -c1-220
