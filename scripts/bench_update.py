"""Streaming statistics update: `stats.update` against merging the batch's own moments.

``stats.merge(m, stats.moments(z))`` forms the batch's [D, D] co-moment, re-centres both sides
and adds them; ``stats.update(m, z)`` adds the batch's Gram and both rank-one shifts to m's
co-moment in its (donated) buffer; ``upper`` is the same with ``upper=True``, the streaming
form (upper blocks only; `stats.mirror_upper` once at the end, not timed, before the results
are compared); ``host`` is what `extract` uses on one CPU device, `host_stats.update`: the same
upper blocks with the co-moment a NumPy array that BLAS ``?gemm`` adds the Gram to in place.
All run side by side on the same random batches: K networks
of width W, N frames per batch. Prints the median time per update (process CPU seconds, which
other jobs on a shared machine inflate less than wall time; pass ``--single-thread`` to pin
XLA and OpenBLAS to one thread so that they are comparable across loads), the largest
difference of the results, and the peak RSS of each method in a fresh process. Then the
re-centring's block product (`stats._block_matvec`) against the dense [D, D] × [D, K] product
it replaces, and the two forms of mirroring.

    python scripts/bench_update.py --networks 26 --width 768 --frames 500
    python scripts/bench_update.py --networks 8 --single-thread
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

METHODS = ("merge", "update", "upper", "host")


def _setup(networks: int, width: int, frames: int):
    import jax.numpy as jnp
    import numpy as np

    from sslsim_jax import stats

    sizes = (width,) * networks
    rng = np.random.default_rng(0)
    d = networks * width
    batches = [
        jnp.asarray(rng.standard_normal((frames, d)).astype(np.float32) * s + o)
        for s, o in ((1.0, 3.0), (2.0, 1.0))
    ]
    return stats, sizes, batches


def _step(method: str):
    import jax

    from sslsim_jax import stats

    if method == "merge":
        return jax.jit(lambda m, z: stats.merge(m, stats.moments(z, sizes=m.sizes)))
    if method == "host":
        from sslsim_jax import host_stats

        return lambda m, z: host_stats.update(m, z)
    upper = method == "upper"
    return jax.jit(lambda m, z: stats.update(m, z, upper=upper), donate_argnums=0)


def run(method: str, networks: int, width: int, frames: int, reps: int):
    """(median CPU s per update, median wall s, final statistics) of ``reps`` updates."""
    import jax

    stats, sizes, batches = _setup(networks, width, frames)
    step = _step(method)
    m = stats.init(sizes)
    if method == "host":
        from sslsim_jax import host_stats

        m = host_stats.to_host(m)
    m = jax.block_until_ready(step(m, batches[0]))
    cpu, wall = [], []
    for i in range(reps):
        c, w = time.process_time(), time.perf_counter()
        m = jax.block_until_ready(step(m, batches[(i + 1) % 2]))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    if method == "upper":  # made whole once, as `extract` does at the end (not timed)
        m = jax.block_until_ready(jax.jit(stats.mirror_upper)(m))
    if method == "host":
        from sslsim_jax import host_stats

        m = host_stats.mirror_upper(m)
    return sorted(cpu)[reps // 2], sorted(wall)[reps // 2], m


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=26)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--single-thread", action="store_true", help="XLA on one thread")
    parser.add_argument("--peak-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single_thread and "intra_op" not in os.environ.get("XLA_FLAGS", ""):
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}"
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    if args.peak_of:  # child: three updates, then the peak RSS in bytes
        from _bench import peak_rss

        run(args.peak_of, args.networks, args.width, args.frames, 3)
        print(peak_rss())
        return 0

    import jax
    import jax.numpy as jnp
    import numpy as np
    from _bench import machine

    from sslsim_jax import stats

    d = args.networks * args.width
    print(f"# machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"# K={args.networks} networks of {args.width} (D={d}, co-moment "
        f"{4 * d * d / 2**30:.2f} GiB), N={args.frames} frames per batch, median of {args.reps}"
        + (", XLA on one thread" if args.single_thread else "")
    )
    print("| method | CPU s / update | wall s / update | peak RSS (GiB) | max rel diff |")
    print("|---|---|---|---|---|")
    results = {}
    for method in METHODS:
        cpu, wall, m = run(method, args.networks, args.width, args.frames, args.reps)
        results[method] = (cpu, wall, m)
        del m
    ref = results["merge"][2]
    for method in METHODS:
        cpu, wall, m = results[method]
        diff = max(
            float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))
            for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(ref), strict=True)
        )
        child = [sys.executable, __file__, "--peak-of", method, "--networks", str(args.networks)]
        child += ["--width", str(args.width), "--frames", str(args.frames)]
        if args.single_thread:
            child.append("--single-thread")
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()
        peak = int(out[-1]) / 2**30
        print(f"| {method} | {cpu:.2f} | {wall:.2f} | {peak:.2f} | {diff:.1e} |", flush=True)
    results.clear()

    sizes = (args.width,) * args.networks
    rng = np.random.default_rng(1)
    c = jnp.asarray(rng.standard_normal((d, d)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal(d).astype(np.float32))
    onehot = jax.nn.one_hot(jnp.asarray(stats.segment_ids(sizes)), len(sizes))
    dense = jax.jit(lambda c, v: jnp.matmul(c, v[:, None] * onehot, precision="highest"))
    block = jax.jit(lambda c, v: stats._block_matvec(c, v, sizes))
    times = {}
    for name, f in (("dense", dense), ("block", block)):
        jax.block_until_ready(f(c, v))
        runs = []
        for _ in range(args.reps):
            start = time.process_time()
            jax.block_until_ready(f(c, v))
            runs.append(time.process_time() - start)
        times[name] = sorted(runs)[args.reps // 2]
    print(
        f"\nre-centring product [D, D] x block-diagonal [D, K]: dense {times['dense'] * 1e3:.0f} "
        f"ms, block {times['block'] * 1e3:.0f} ms CPU ({times['dense'] / times['block']:.1f}x)"
    )
    mirror = jax.jit(stats.mirror_upper, donate_argnums=0)
    m = stats.init(sizes).replace(comoment=c)
    m = jax.block_until_ready(mirror(m))
    start = time.process_time()
    m = jax.block_until_ready(mirror(m))  # donated: m is the result from here on
    seconds = time.process_time() - start
    print(f"mirror_upper (once per run in the streaming form): {seconds:.2f} s CPU")
    from sslsim_jax import host_stats

    m = host_stats.to_host(m)
    start = time.process_time()
    host_stats.mirror_upper(m)
    seconds = time.process_time() - start
    print(f"host_stats.mirror_upper (the host form's): {seconds:.2f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
