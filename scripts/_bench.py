"""Shared helpers of the benchmark scripts: describing the machine and timing a call."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> str:
    """One line: CPU, core count, jax version and backend."""
    import jax

    backend = jax.devices()[0].platform
    return f"{cpu_model()}, nproc={os.cpu_count()}, jax {jax.__version__}, {backend}"


def timed(
    fn: Callable[[], object],
    repeats: int,
    *,
    warmup: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``repeats`` calls of ``fn`` (after one untimed warm-up call): wall time,
    or process CPU time with ``clock=time.process_time``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: a child forked from a large parent inherits the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def log_compiles(min_seconds: float = 0.5) -> None:
    """From now on, print each XLA compilation of at least ``min_seconds`` as it ends: the jitted
    function's name and the seconds (stderr, flushed), so a run cut short still says what it
    was compiling."""
    import sys

    import jax

    from sslsim_jax.compile_log import EVENTS

    def listen(event: str, seconds: float, fun_name: str = "?", **_: object) -> None:
        if EVENTS.get(event) == "compile_seconds" and seconds >= min_seconds:
            print(f"# compiled {fun_name} in {seconds:.1f} s", file=sys.stderr, flush=True)

    jax.monitoring.register_event_duration_secs_listener(listen)
