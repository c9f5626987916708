"""Test-wide setup: 8 fake CPU devices for sharding tests, fast XLA compilation, a shared compilation
cache (must precede the first jax import)."""

import os

# The tests' programs are tiny, so compiling them costs more than running them: LLVM's cheapest
# optimization level cuts the suite's time by about a quarter (measured on 2 cores, cold cache).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test workers: many tests compile the same small
# programs (a new jitted train step per run); a cached executable is the same code, so results do
# not change. It lives in .pytest_cache (not committed), so later runs on this machine start warm.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                                "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from hypothesis import settings  # noqa: E402

# Each new shape retraces; keep examples few and deadlines off (compile time is not the property).
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
