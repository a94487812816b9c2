"""The paper's grid on one device: the statistics update at full width and the metric stage.

Two timings, compilation apart (each jitted call runs once first; its XLA compile seconds come
from `sslsim_jax.compile_log`):

- ``update``: one batch of ``--frames`` frames folded into the joint statistics of every layer
  of the paper's models (`paper_plan.MODELS`; all eight: 156 networks, 146,432 columns, an
  86 GB co-moment), with the update `extract` runs on a device
  (`stats.update`, upper blocks, statistics donated). Skipped, with the reason, when the
  device cannot hold the co-moment and the batch.
- ``metrics``: the analysis's metric stage (the call of `analysis.tables.pair_values`: the
  default metrics, matched neurons and top-k) over K networks of ``--d`` neurons, from their
  joint statistics over ``--n`` frames, for each K of ``--k``. The seconds are fitted to
  t = a·K + b·K(K+1)/2 (per network, per unordered pair) and extrapolated to the networks of
  ``--models``; with ``--d 1024`` every pair is priced as two large-model layers, an upper
  bound for the base models' 768-wide ones.

    python scripts/bench_paper_grid.py --frames 1000 --k 8 16 32 --n 8192     # on a GPU
    python scripts/bench_paper_grid.py --models wav2vec2-base --k 2 4 --n 2048 --d 256   # CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench import log_compiles, machine
from bench_metrics import make_networks
from paper_plan import MODELS, write_configs

from sslsim_jax import stats
from sslsim_jax.analysis import plan
from sslsim_jax.compile_log import compile_log
from sslsim_jax.memory import format_bytes
from sslsim_jax.metrics import registry
from sslsim_jax.metrics.topk import DEFAULT_KS
from sslsim_jax.pairwise import compare_moments

FRAMES_PER_SECOND = 50  # one frame per 20 ms of audio in every model


def grid_sizes(models: list[str]) -> list[int]:
    """The width of every network an analysis of ``models`` compares, counted as
    ``sslsim analyze --plan`` counts them (`run.planned_networks`)."""
    from sslsim_jax.analysis import Settings
    from sslsim_jax.analysis.run import planned_networks

    with tempfile.TemporaryDirectory() as folder:
        return planned_networks(write_configs(folder, models), Settings())[1]


def first_and_rest(fn, repeats: int) -> tuple[float, float, dict]:
    """(seconds of the first call, median seconds of ``repeats`` more, compile record of the
    first). ``fn`` returns what to wait for."""
    with compile_log() as compiled:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)) if times else float("nan"), compiled


def update_upper(m: stats.Moments, z: jax.Array) -> stats.Moments:
    return stats.update(m, z, upper=True)


def bench_update(sizes: list[int], frames: int, repeats: int) -> None:
    width = sum(sizes)
    need = 4 * width * (width + 2 * frames)  # the co-moment, the batch and its centred copy
    limit, source = plan.memory_limit(jax.devices()[0])
    co = format_bytes(4 * width**2)
    print(f"## update: {len(sizes)} networks, {width} columns, co-moment {co}")
    if need > limit:
        print(f"skipped: needs {format_bytes(need)}, the device holds {format_bytes(limit)} "
              f"({source})")  # fmt: skip
        return
    update = jax.jit(update_upper, donate_argnums=0)
    m = stats.init(sizes)
    z = jax.random.normal(jax.random.key(0), (frames, width), jnp.float32)
    box = [m]

    def step():
        box[0] = update(box[0], z)
        return box[0].comoment

    first, rest, compiled = first_and_rest(step, repeats)
    upper = sum(a * sum(sizes[i:]) for i, a in enumerate(sizes))  # entries of the upper blocks
    flops = 2 * frames * upper
    print("| frames | first call (s) | compile (s) | update (s) | TFLOP/s | audio s/s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {frames} | {first:.2f} | {compiled['compile_seconds']:.2f} | {rest:.3f} | "
        f"{flops / rest / 1e12:.1f} | {frames / FRAMES_PER_SECOND / rest:.0f} |",
        flush=True,
    )


def bench_metrics(ks: list[int], n: int, d: int, repeats: int, sizes: list[int]) -> None:
    metrics = registry.DEFAULT_METRICS
    topk = tuple(m for m in metrics if registry.get(m).topk)
    print(f"## metric stage: K networks of {d}, {n} frames; {', '.join(metrics)}, neurons, top-k")
    print("| K | pairs | first call (s) | compile (s) | metric stage (s) | per pair (ms) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for k in ks:
        nets = make_networks(k, n, d)
        m = jax.block_until_ready(stats.joint_moments(list(nets.values())))
        del nets
        names = [f"net:{i}" for i in range(k)]

        def stage(m=m, names=names):
            return compare_moments(
                m, names, metrics=metrics, neurons=True, topk=topk, ks=DEFAULT_KS
            )

        first, rest, compiled = first_and_rest(stage, repeats)
        pairs = k * (k + 1) // 2
        rows.append((k, rest))
        print(
            f"| {k} | {pairs} | {first:.2f} | {compiled['compile_seconds']:.2f} | {rest:.2f} | "
            f"{1e3 * rest / pairs:.1f} |",
            flush=True,
        )
    if len(rows) < 2:
        return
    k_fit = np.array([r[0] for r in rows], float)
    design = np.stack([k_fit, k_fit * (k_fit + 1) / 2], axis=1)
    (per_net, per_pair), *_ = np.linalg.lstsq(design, np.array([r[1] for r in rows]), rcond=None)
    k = len(sizes)
    total = per_net * k + per_pair * k * (k + 1) / 2
    print(
        f"fit: {per_net:.3f} s per network + {1e3 * per_pair:.1f} ms per pair; "
        f"{k} networks ({k * (k + 1) // 2} pairs): {total:.0f} s extrapolated"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--frames", type=int, default=1000, help="frames per update batch")
    parser.add_argument("--k", type=int, nargs="*", default=[8, 16, 32], help="networks")
    parser.add_argument("--n", type=int, default=8192, help="frames of the metric stage")
    parser.add_argument("--d", type=int, default=1024, help="neurons per network")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="highest", help="matmul precision")
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument(
        "--log-compiles", action="store_true", help="log each compilation as it ends (stderr)"
    )
    args = parser.parse_args()
    if args.log_compiles:
        log_compiles()
    sizes = grid_sizes(args.models)
    print(f"# {machine()}; precision {args.precision}")
    with jax.default_matmul_precision(args.precision):
        if not args.skip_update:
            bench_update(sizes, args.frames, args.repeats)
        if args.k:
            bench_metrics(args.k, args.n, args.d, args.repeats, sizes)


if __name__ == "__main__":
    main()
