"""The statistics update's block products on an accelerator: `stats._block_matvec_upper` against
a candidate written as plain matrix-vector products, side by side.

Each update reads the old co-moment once through `stats._block_matvec_upper` (entry (i, k): row
i of the symmetric co-moment times network k's block of a vector, read from the upper blocks
only). On an H200 the paper grid's update stalled in XLA's autotuner, which tried a 75.5 GiB
temporary for a fusion of this product ([142336, 100, 1024]: the co-moment's size). The
candidate ``gemv`` computes each network's column as two matrix-vector products on slices of
the upper blocks (the column slab above the diagonal block, the row block after it), which
XLA can hand to BLAS without reshaping the co-moment; `sslsim_jax.host_stats` does the same on
the host with NumPy.

For each form: compile seconds, XLA's temporary bytes (`memory_analysis`), then, with
``--run``, the median time of ``--repeats`` calls on a random co-moment and the largest
difference from the current form. Nothing here changes the library; a form that wins on a GPU
goes into `sslsim_jax.stats` with its test.

    python scripts/bench_block_matvec.py --sizes 768x26 --run          # two base models
    python scripts/bench_block_matvec.py --sizes 768x52 1024x100 --run # the paper grid
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench import machine

from sslsim_jax import stats

HIGHEST = jax.lax.Precision.HIGHEST


def gemv(c: jax.Array, v: jax.Array, sizes) -> jax.Array:
    """The candidate: [D, K] from two matrix-vector products per network on the upper blocks."""
    offsets = np.cumsum((0, *sizes)).tolist()
    columns = []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        above = jnp.dot(c[:hi, lo:hi], v[lo:hi], precision=HIGHEST)  # rows of networks ≤ k
        after = jnp.dot(v[lo:hi], c[lo:hi, hi:], precision=HIGHEST)  # rows of networks > k
        columns.append(jnp.concatenate([above, after]))
    return jnp.stack(columns, axis=1)


def now(c: jax.Array, v: jax.Array, sizes) -> jax.Array:
    with jax.default_matmul_precision("highest"):
        return stats._block_matvec_upper(c, v, sizes)


FORMS = {"now": now, "gemv": gemv}


def parse_sizes(items) -> tuple[int, ...]:
    """``["768x26", "1024x100"]`` -> 26 networks of 768, then 100 of 1024."""
    sizes = []
    for item in items:
        width, _, count = item.partition("x")
        sizes += [int(width)] * int(count or 1)
    return tuple(sizes)


def reference(c: np.ndarray, v: np.ndarray, sizes) -> np.ndarray:
    """float64 NumPy: the upper blocks mirrored, then each network's column block times v's."""
    seg = stats.segment_ids(sizes)
    upper = np.where(seg[:, None] <= seg[None, :], c, c.T).astype(np.float64)
    return np.stack([upper[:, seg == k] @ v[seg == k] for k in range(len(sizes))], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["768x26"], help="WIDTHxCOUNT ...")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--run", action="store_true", help="also run each form (allocates D²)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="small sizes: compare with NumPy")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes)
    d = sum(sizes)
    print(f"# {machine()}; {len(sizes)} networks, D = {d}, co-moment {4 * d * d / 2**30:.1f} GiB")
    print("| form | compile (s) | XLA temporaries (GiB) | run (ms) | max abs diff from now |")
    print("|---|---|---|---|---|")
    c = v = first = None
    if args.run or args.check:
        key_c, key_v = jax.random.split(jax.random.key(0))
        c = jax.random.normal(key_c, (d, d), jnp.float32)
        v = jax.random.normal(key_v, (d,), jnp.float32)
    spec = (jax.ShapeDtypeStruct((d, d), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32))
    for name in args.forms:
        fn = jax.jit(lambda c, v, f=FORMS[name]: f(c, v, sizes))
        start = time.perf_counter()
        compiled = fn.lower(*spec).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**30
        run = diff = "–"
        if c is not None:
            out = jax.block_until_ready(compiled(c, v))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(c, v))
                times.append(time.perf_counter() - start)
            run = f"{1e3 * float(np.median(times)):.1f}"
            first = out if first is None else first
            diff = f"{float(jnp.max(jnp.abs(out - first))):.2e}"
            if args.check:
                want = reference(np.asarray(c), np.asarray(v), sizes)
                err = np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want))
                assert err < 1e-5, f"{name}: relative error {err:.1e} against NumPy"
        print(f"| {name} | {seconds:.1f} | {temp:.2f} | {run} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
