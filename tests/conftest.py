"""Test configuration: the whole suite sees 8 host (CPU) devices, and XLA:CPU's fast path.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the flags are set here, before
any test module imports jax (importing it does not start the backends).  Existing flags are
kept; a different device count is replaced.  The library-fusion setting is
``resnorm_jax.cpu_workarounds.xla_flag()`` (the engine passes the same setting per program;
on an unverified jaxlib it is empty and nothing is added), so the tests' own in-process jits
get the convolution kernels the training commands use; an explicit setting in XLA_FLAGS wins.

The session shares one persistent compilation cache (JAX_COMPILATION_CACHE_DIR, a fresh
temporary directory unless the variable is already set), in this process and in the commands
the tests start: the many runs of the same tiny configs compile once.  The cache key holds the
program, the XLA flags and the compile options, and a cached executable is the same code, so
results do not change (a warm-cache run of a tiny `resnorm-train` took half the CPU time of a
cold one).
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="resnorm_jax_tests_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

from resnorm_jax import cpu_workarounds  # noqa: E402  (jax reads the variable on import)

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
_fusion_flag = cpu_workarounds.xla_flag()
if _fusion_flag and any(f.startswith(f"--{cpu_workarounds.YNN_FUSION_OPTION}=") for f in _kept):
  _fusion_flag = ""
os.environ["XLA_FLAGS"] = " ".join(_kept + [_DEVICE_FLAG] + ([_fusion_flag] if _fusion_flag else []))
