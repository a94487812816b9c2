"""How much a piece of work compiled: XLA compilations and their seconds, from JAX's own
monitoring events (``jax.monitoring``), for ``run.json`` and the benchmarks."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax

# JAX's duration events (jax/_src/dispatch.py): tracing to a jaxpr, lowering to StableHLO,
# and XLA's backend compile (not sent on a persistent-cache hit).
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
    "/jax/core/compile/backend_compile_duration": "compile_seconds",
}


@contextlib.contextmanager
def compile_log() -> Iterator[dict[str, float]]:
    """Yields a dict that, while the block runs, counts ``compilations`` (XLA backend compiles)
    and sums ``trace_seconds``, ``lower_seconds`` and ``compile_seconds``."""
    record = {"compilations": 0, **dict.fromkeys(EVENTS.values(), 0.0)}
    lock = threading.Lock()

    def listen(event: str, seconds: float, **_: object) -> None:
        key = EVENTS.get(event)
        if key is None:
            return
        with lock:
            record[key] += seconds
            if key == "compile_seconds":
                record["compilations"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield record
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        for key in EVENTS.values():
            record[key] = round(record[key], 3)
