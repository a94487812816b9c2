"""Test-session settings and the helpers every test module shares."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

# In-process and child `sslsim` runs of the tests keep no persistent compilation cache of the
# user's (~/.cache/sslsim); the one test of that cache sets its own directory.
os.environ.setdefault("SSLSIM_CACHE_DIR", "none")
# One JAX compilation cache for this test session, child processes included, removed at exit:
# many tests compile the same tiny models and metrics (measured: test_pipeline.py 368 s -> 324
# s). Every session starts cold, so no test can pass on a program compiled by an older tree.
_JAX_CACHE = tempfile.mkdtemp(prefix="sslsim-test-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_devices_env(devices: int) -> dict[str, str]:
    """The environment of a child interpreter with ``devices`` fake CPU devices (float32)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    return env


def run_on_devices(code: str, *, devices: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with ``devices`` fake CPU devices, so the rest of the
    suite keeps one device; fails the test (never hangs CI) after ``timeout`` seconds."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=fake_devices_env(devices), cwd=ROOT,
    )  # fmt: skip


def random_params(shapes, seed: int = 0):
    """Random values for a pytree of shapes (e.g. ``jax.eval_shape(objective.init, key)``),
    drawn with NumPy: no XLA compilation, where eager flax init compiles every op (tens of
    seconds on 2 cores). Kernels ~ N(0, 1/fan_in) (stacked block params [L, ...] count fan-in
    without L), norm scales 1 ± 0.1, every other vector ± 0.1: every param matters to the
    output, so a misnamed one shows."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [str(getattr(p, "key", "")) for p in path]
        shape = tuple(leaf.shape)
        noise = rng.standard_normal(shape)
        if len(shape) < 2 or (len(shape) == 2 and "layers" in names):
            base = 1.0 if names[-1] == "scale" else 0.0
            return (base + 0.1 * noise).astype(leaf.dtype)
        fan_in = int(np.prod(shape[1:-1] if "layers" in names else shape[:-1]))
        return (noise / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
