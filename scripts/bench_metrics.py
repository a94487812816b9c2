"""Benchmark `sslsim_jax.compare` against the paper's per-pair method and the joint Gram floor.

Three timings on the same K networks of N frames x D neurons (float32):

1. ``compare(networks, metrics=(maxcorr, linreg, svcca, pwcca, linear_cka))``: one joint
   statistics pass (upper Gram blocks only) and all pairs at once;
2. the per-pair method of the reference code (Wu et al. 2020, reused by El Kheir et al. 2024),
   re-implemented here in jitted JAX: per network standardise and SVD of the [N, D] activations,
   per pair the cross products of each metric (correlation matrix, linreg projections, CCA of
   the kept principal subspaces with PWCCA weights, CKA's three Gram matrices);
3. the floor: one joint Gram matmul Zᵀ Z, Z = [N, K·D].

Compile time is excluded (one warm-up run of each). ``--precisions`` then times ``compare``
under other ``jax.default_matmul_precision`` settings and prints each metric's largest change
from the "highest" (exact float32) result. Usage::

    python scripts/bench_metrics.py --k 4 --n 20000 --d 768
    python scripts/bench_metrics.py --precisions tensorfloat32 bfloat16   # on a GPU or TPU
"""

from __future__ import annotations

import argparse
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from _bench import cpu_model, timed

from sslsim_jax import compare

METRICS = ("maxcorr", "linreg", "svcca", "pwcca", "linear_cka")


def make_networks(k: int, n: int, d: int, seed: int = 0) -> dict[str, jax.Array]:
    """K float32 networks sharing a latent with a decaying spectrum (a few hundred PCs for 99%)."""
    key = jax.random.key(seed)
    k_lat, *keys = jax.random.split(key, 2 * k + 1)
    latent = jax.random.normal(k_lat, (n, d)) * (1.0 + jnp.arange(d)) ** -0.7  # [N, D]
    out = {}
    for i in range(k):
        mix = jax.random.normal(keys[2 * i], (d, d)) / jnp.sqrt(d)
        noise = 0.05 * jax.random.normal(keys[2 * i + 1], (n, d))
        out[f"net:{i}"] = jax.block_until_ready(latent @ mix + noise)
    return out


@jax.jit
def _prepare(x):
    # Per network, as the reference code: standardise, thin SVD of the [N, D] activations.
    xc = x - x.mean(0)
    xs = xc / jnp.sqrt(jnp.mean(xc**2, 0))
    u, s, vt = jnp.linalg.svd(xs, full_matrices=False)
    return xc, xs, u, s


@jax.jit
def _pair_corr(xs, ys):
    corr = xs.T @ ys / xs.shape[0]  # [Dx, Dy]
    a = jnp.abs(corr)
    return a.max(1).mean(), a.max(0).mean()


@jax.jit
def _pair_linreg(uy, xs):
    b = uy.T @ xs  # [Dy, Dx]: coefficients of x on y's left singular vectors
    return jnp.mean(jnp.linalg.norm(b, axis=0) / jnp.linalg.norm(xs, axis=0))


@jax.jit
def _pair_cca(ux, uy, kx, ky, xc, yc):
    ux = ux * (jnp.arange(ux.shape[1]) < kx)  # kept principal directions, masked
    uy = uy * (jnp.arange(uy.shape[1]) < ky)
    u, rho, vt = jnp.linalg.svd(ux.T @ uy)
    m = jnp.minimum(kx, ky)
    take = jnp.arange(rho.shape[0]) < m
    sv = jnp.sum(jnp.where(take, rho, 0)) / m
    ax = jnp.where(take, jnp.abs((ux @ u).T @ xc).sum(1), 0)
    ay = jnp.where(take, jnp.abs((uy @ vt.T).T @ yc).sum(1), 0)
    return sv, (ax * rho).sum() / ax.sum(), (ay * rho).sum() / ay.sum()


@jax.jit
def _pair_cka(xc, yc):
    xtx = jnp.linalg.norm(xc.T @ xc)
    yty = jnp.linalg.norm(yc.T @ yc)
    ytx = jnp.linalg.norm(yc.T @ xc)
    return ytx**2 / (xtx * yty)


def per_pair(nets: dict[str, jax.Array], variance: float = 0.99) -> dict:
    """The reference code's method: per network SVD, per pair the cross products."""
    prep = {}
    for name, x in nets.items():
        xc, xs, u, s = _prepare(x)
        cum = np.cumsum(np.asarray(s) ** 2)
        prep[name] = (xc, xs, u, max(int((cum < variance * cum[-1]).sum()), 1))
    out = {}
    for a, b in itertools.combinations(nets, 2):
        xc, xs, ux, kx = prep[a]
        yc, ys, uy, ky = prep[b]
        out[a, b, "maxcorr"], out[b, a, "maxcorr"] = _pair_corr(xs, ys)
        out[a, b, "linreg"] = _pair_linreg(uy, xs)
        out[b, a, "linreg"] = _pair_linreg(ux, ys)
        sv, pab, pba = _pair_cca(ux, uy, kx, ky, xc, yc)
        out[a, b, "svcca"] = out[b, a, "svcca"] = sv
        out[a, b, "pwcca"], out[b, a, "pwcca"] = pab, pba
        out[a, b, "linear_cka"] = out[b, a, "linear_cka"] = _pair_cka(xc, yc)
    return jax.block_until_ready(out)


_gram = jax.jit(lambda z: z.T @ z)


def gram_floor(nets: dict[str, jax.Array]) -> jax.Array:
    z = jnp.concatenate(list(nets.values()), axis=1)  # [N, K*D]
    return jax.block_until_ready(_gram(z))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="numbers of networks")
    parser.add_argument("--n", type=int, default=20000, help="frames")
    parser.add_argument("--d", type=int, default=768, help="neurons per network")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-pair-repeats", type=int, default=1)
    parser.add_argument("--precisions", nargs="*", default=[], help="also time these precisions")
    args = parser.parse_args()
    print(
        f"# {cpu_model()}, nproc={os.cpu_count()}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, N={args.n}, D={args.d}, float32"
    )
    print(
        "| K | Gram floor (s) | compare (s) | per-pair (s) | compare / floor | per-pair / compare |"
    )
    print("|---|---|---|---|---|---|")
    for k in args.k:
        nets = make_networks(k, args.n, args.d)
        t_floor = timed(lambda nets=nets: gram_floor(nets), args.repeats)
        t_ours = timed(lambda nets=nets: compare(nets, metrics=METRICS), args.repeats)
        t_pair = timed(lambda nets=nets: per_pair(nets), args.per_pair_repeats)
        df = compare(nets, metrics=METRICS)
        ref = per_pair(nets)
        got = {(r.network_a, r.network_b, r.metric): r.value for r in df.itertuples()}
        worst = max(abs(got[key] - float(v)) for key, v in ref.items())
        print(
            f"| {k} | {t_floor:.2f} | {t_ours:.2f} | {t_pair:.2f} | {t_ours / t_floor:.2f}x | "
            f"{t_pair / t_ours:.1f}x |  (max |compare - per-pair| = {worst:.1e})",
            flush=True,
        )
        for precision in args.precisions:
            with jax.default_matmul_precision(precision):
                t = timed(lambda nets=nets: compare(nets, metrics=METRICS), args.repeats)
                other = compare(nets, metrics=METRICS)
            delta = (other.value - df.value).abs().groupby(df.metric).max()
            changes = ", ".join(f"{m} {v:.1e}" for m, v in delta.items())
            print(
                f"#   K={k} precision={precision}: compare {t:.2f} s; max |Δ| vs highest: {changes}"
            )


if __name__ == "__main__":
    main()
