"""Test-wide setup: 8 fake CPU devices for sharding tests, fast XLA compilation, a shared compilation
cache (must precede the first jax import)."""

import os

# The tests' programs are tiny, so compiling them costs more than running them. Two switches cut
# compilation (measured on 2 cores, cold cache): LLVM's cheapest optimization level (JAX's
# jax_disable_most_optimizations, a quarter off the suite) and XLA:CPU's older elemental emitters
# instead of its fusion emitters (about half of a train step's compile time). The few tests that
# run long enough to gain from optimized code switch the first back with `optimized()`.
FAST_COMPILE = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE['XLA_FLAGS']} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", FAST_COMPILE["JAX_DISABLE_MOST_OPTIMIZATIONS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test workers: many tests compile the same small
# programs (a new jitted train step per run); a cached executable is the same code, so results do
# not change. It lives in .pytest_cache (not committed), so later runs on this machine start warm.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                                "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib  # noqa: E402

from hypothesis import settings  # noqa: E402


@contextlib.contextmanager
def optimized():
    """Compile with XLA's full optimization inside (programs that run for many seconds: the
    star-graph learning tests' training loops run about twice as fast)."""
    import jax

    previous = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("", "0", "false", "False")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


# Each new shape retraces; keep examples few and deadlines off (compile time is not the property).
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
