"""Test configuration: the whole suite sees 8 host (CPU) devices.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the flag is set here, before
any test module imports jax.  Existing flags are kept; a different device count is replaced.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_kept + [_DEVICE_FLAG])
