"""Test-session settings and the helpers every test module shares."""

import os
import subprocess
import sys
import textwrap

# In-process and child `sslsim` runs of the tests keep no persistent compilation cache; the
# one test of the cache sets its own directory.
os.environ.setdefault("SSLSIM_CACHE_DIR", "none")

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
