"""Test-wide setup: 8 virtual CPU devices, so sharding is tested on a CPU machine.

Must run before JAX initializes its backends; pytest imports this file first.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
