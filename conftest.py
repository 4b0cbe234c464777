"""Test-wide setup, before JAX initializes its backends (pytest imports this file first):

* 8 virtual CPU devices, so sharding is tested on a CPU machine;
* XLA's CPU backend without LLVM optimization: the suite's time is mostly the compilation
  of many small programs (interpreted Pallas kernels above all), which optimization does not
  repay at test shapes (flash's float32 interpret conformance: 93 s -> 56 s on 2 cores).
  It changes no arithmetic (fast-math stays off). Set the flag yourself to override it.
* XLA's CPU fusions through the classic loop emitters, not the MLIR fusion emitters: they
  compile the interpreted kernels' many small fusions about twice as fast (flash's float32
  conformance and the reference's: 118 s -> 60 s on 2 cores). The same HLO is computed
  (multiply-adds may round differently, ~1e-7 relative). Only on jaxlib 0.10, where the
  flag was checked: XLA stops at start-up on a flag it does not know.
* no user tuning cache (`JAXATTN_TUNING_CACHE=off`): what `auto` picks in a test never
  depends on what `jaxattn tune` measured on this machine; tests that need a cache say so.
"""

import importlib.metadata
import os

_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FLAGS["--xla_cpu_use_fusion_emitters"] = "false"
for _flag, _value in _FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()
os.environ.setdefault("JAXATTN_TUNING_CACHE", "off")
