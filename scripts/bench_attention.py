"""Benchmark: all head pairs of two models' attention maps, ours vs a per-head-pair loop.

Compares `sslsim_jax.metrics.attention` (all La*H × Lb*H head pairs at once, streamed over
batches of utterances) with the reference method as the paper's code runs it: a NumPy loop over
utterances and head pairs, each similarity computed separately (vectorised over the rows of one
pair only). The reference loop over all pairs takes hours on a small CPU, so it is timed on a
subset (``--ref-utterances`` utterances × ``--ref-heads`` heads of model a × every head of model
b) and extrapolated linearly to all pairs, which the output says.

Maps are random softmax maps (every query row a distribution over the valid keys), generated
per batch on the device and excluded from the timing. Compilation is timed separately.

Usage::

    python scripts/bench_attention.py                       # 2 × 12 layers × 12 heads, 50 × 5 s
    python scripts/bench_attention.py --utterances 4 --layers 2   # quick check
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench import cpu_model

from sslsim_jax.metrics import attention


def random_maps(key: jax.Array, utterances: int, heads: int, frames: int) -> jax.Array:
    """[U, H, T, T] softmax maps with peaked rows (logit scale 3)."""
    return jax.nn.softmax(3.0 * jax.random.normal(key, (utterances, heads, frames, frames)), -1)


def reference_pair(a: np.ndarray, b: np.ndarray, method: str) -> float:
    """One head pair on one utterance, [T, T] each, as a per-pair reference loop does."""
    if method == "fro":
        return 1.0 - float(np.linalg.norm(a - b))
    if method == "pearson":
        ac = a - a.mean(-1, keepdims=True)
        bc = b - b.mean(-1, keepdims=True)
        r = (ac * bc).sum(-1) / np.sqrt((ac * ac).sum(-1) * (bc * bc).sum(-1))
        return float(r.mean())
    m = 0.5 * (a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_a = np.where(a > 0, a * np.log(a / m), 0.0).sum(-1)
        kl_b = np.where(b > 0, b * np.log(b / m), 0.0).sum(-1)
    return float(1.0 - 0.5 * (kl_a + kl_b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=50)
    parser.add_argument("--frames", type=int, default=249, help="T: 5 s at 50 Hz = 249 frames")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=5, help="utterances per streamed batch")
    parser.add_argument("--methods", nargs="+", default=list(attention.METHODS))
    parser.add_argument("--ref-utterances", type=int, default=2)
    parser.add_argument("--ref-heads", type=int, default=4, help="heads of model a timed")
    parser.add_argument("--block-elements", type=int, default=attention.DEFAULT_JS_BLOCK_ELEMENTS)
    args = parser.parse_args()

    u, t, b = args.utterances, args.frames, args.batch
    h = args.layers * args.heads  # layers folded into heads: [U, L*H, T, T]
    n_batches = -(-u // b)
    print(f"machine: nproc={os.cpu_count()}, cpu={cpu_model()!r}, jax {jax.__version__}")
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    print(
        f"two models of {args.layers} layers × {args.heads} heads: {h} × {h} head pairs, "
        f"{u} utterances of T = {t}, batches of {b}"
    )
    gen = jax.jit(random_maps, static_argnums=(1, 2, 3))
    keys = jax.random.split(jax.random.key(0), 2 * n_batches).reshape(n_batches, 2)
    sizes = [min(b, u - i * b) for i in range(n_batches)]

    rows = []
    for method in args.methods:
        update = jax.jit(
            lambda s, x, y, m=method: attention.update_state(
                s, x, y, None, m, block_elements=args.block_elements
            )
        )
        state = attention.init_state(h, h)
        x = gen(keys[0, 0], sizes[0], h, t)
        y = gen(keys[0, 1], sizes[0], h, t)
        start = time.perf_counter()
        update.lower(state, x, y).compile()
        compile_s = time.perf_counter() - start
        total = 0.0
        for i, size in enumerate(sizes):
            x = gen(keys[i, 0], size, h, t).block_until_ready()
            y = gen(keys[i, 1], size, h, t).block_until_ready()
            start = time.perf_counter()
            state = jax.block_until_ready(update(state, x, y))
            total += time.perf_counter() - start
        s = attention.finalize(state)
        assert bool(jnp.all(jnp.isfinite(s))), method

        # Reference: per utterance, per head pair, on a subset; extrapolated linearly.
        ha = min(args.ref_heads, h)
        ru = min(args.ref_utterances, u)
        ref_x = np.asarray(gen(keys[0, 0], sizes[0], h, t))[:ru]
        ref_y = np.asarray(gen(keys[0, 1], sizes[0], h, t))[:ru]
        ours_subset = np.asarray(attention.head_similarity(ref_x, ref_y, None, method))
        check = np.zeros((ha, h))
        start = time.perf_counter()
        for k in range(ru):
            for i in range(ha):
                for j in range(h):
                    check[i, j] += reference_pair(ref_x[k, i], ref_y[k, j], method) / ru
        ref_s = time.perf_counter() - start
        err = float(np.max(np.abs(check - ours_subset[:ha])))
        pairs_timed = ru * ha * h
        ref_full = ref_s * (u * h * h) / pairs_timed
        rows.append((method, compile_s, total, ref_full, pairs_timed, ref_s, err))
        print(
            f"{method}: ours {total:.2f} s (+{compile_s:.1f} s compile), reference "
            f"{ref_s:.2f} s for {pairs_timed} utterance-pairs -> {ref_full:.0f} s for "
            f"{u * h * h} (extrapolated), ratio {ref_full / total:.0f}x, max |diff| {err:.1e}"
        )

    print()
    print("| method | ours (s) | compile (s) | reference loop (s, extrapolated) | speed-up |")
    print("|---|---|---|---|---|")
    for method, compile_s, total, ref_full, _, _, _ in rows:
        print(
            f"| {method} | {total:.2f} | {compile_s:.1f} | {ref_full:.0f} | "
            f"{ref_full / total:.0f}× |"
        )


if __name__ == "__main__":
    main()
