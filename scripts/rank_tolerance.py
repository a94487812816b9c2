"""How small an eigenvalue float32 statistics resolve, and what the rank tolerance costs.

The CCA-type metrics (linreg, SVCCA, PWCCA) whiten each network over the numerical rank of its
correlation co-moment: eigenvalues at most ``rtol`` times the largest count as zero
(`sslsim_jax.metrics.kernels.default_rtol`). Too large a tolerance drops real directions of
ill-conditioned layers; too small a one whitens rounding noise. This script measures both sides
on two random-weight base models (every layer, 2 × 13 networks of 768) over N seconds of speech
(the shipped clips, tiled into 10 s segments):

- ``noise``: the statistics' own noise floor. One network's frames are projected onto their
  top 300 principal directions (so the other 468 eigenvalues are exactly zero), streamed through
  `stats.update` in B batches (the frames repeated to reach B), and the largest of the 468
  eigenvalues of the float32 statistics is printed relative to the largest eigenvalue, with
  float32 and float64 ``eigh``;
- ``rtol``: linreg, SVCCA and PWCCA of all 26 × 26 pairs from float32 statistics (streamed two
  segments a batch, float32 metrics) at several tolerances, against float64 statistics and
  metrics of the same activations: the largest absolute difference of each metric, and how many
  networks keep fewer SVCCA directions than the 99 % rule asks.

    python scripts/rank_tolerance.py --seconds 60
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from _bench import machine
from bench_scale import random_model

from sslsim_jax import audio, pairwise, stats
from sslsim_jax.metrics import kernels

METRICS = ("linreg", "svcca", "pwcca")


def activations(seconds: float) -> np.ndarray:
    """[N, 26 · 768] float32 hidden states of both models, every layer, 10 s segments."""
    speech = np.concatenate([audio.load(p) for p in audio.demo_audio_paths()])
    speech = np.tile(speech, int(np.ceil(seconds * 16000 / len(speech))))[: int(seconds * 16000)]
    models = [random_model("base", 0), random_model("base", 1)]
    frames = []
    for start in range(0, len(speech), 160000):
        x, lens = audio.pad([speech[start : start + 160000]], multiple_of=320, steps=1)
        x = audio.normalize(x, lens)
        columns = []
        for model in models:
            out = model.intermediates(x, lens)
            t = int(out.frame_lengths[0])
            columns += [np.asarray(h[0, :t]) for h in out.hidden_states]
        frames.append(np.concatenate(columns, axis=1))
    return np.concatenate(frames)


def noise_floor(z: np.ndarray, batches: list[int], rank: int = 300) -> None:
    zd = z.astype(np.float64)
    mean = zd.mean(0)
    _, _, vt = np.linalg.svd(zd - mean, full_matrices=False)
    low = (mean + (zd - mean) @ vt[:rank].T @ vt[:rank]).astype(np.float32)
    update = jax.jit(stats.update)
    print(f"noise floor: one network ({z.shape[1]} wide) projected onto rank {rank}")
    print("| batches | frames | null eigenvalue, float32 eigh | float64 eigh | last real |")
    print("|---|---|---|---|---|")
    for b in batches:
        tiled = np.tile(low, (max(1, -(-b * 300 // len(low))), 1))
        m = stats.init((z.shape[1],))
        for chunk in np.array_split(tiled, b):
            m = update(m, jnp.asarray(chunk))
        c = np.asarray(m.comoment, np.float64)
        d = 1 / np.sqrt(np.diag(c))
        corr = c * d[:, None] * d[None, :]
        lam32 = np.linalg.eigvalsh(corr.astype(np.float32))[::-1]
        lam64 = np.linalg.eigvalsh(corr)[::-1]
        print(
            f"| {b} | {len(tiled)} | {lam32[rank] / lam32[0]:.1e} | {lam64[rank] / lam64[0]:.1e} "
            f"| {lam64[rank - 1] / lam64[0]:.1e} |",
            flush=True,
        )


def tolerances(z: np.ndarray, width: int) -> None:
    k = z.shape[1] // width
    names = [f"n{i}" for i in range(k)]
    segments = np.array_split(z, max(1, len(z) // 1000))
    m32 = stats.init((width,) * k)
    update = jax.jit(stats.update)
    for i in range(0, len(segments), 2):
        m32 = update(m32, jnp.asarray(np.concatenate(segments[i : i + 2])))
    eps = float(np.finfo(np.float32).eps)
    cases = [
        ("10 P eps (before)", 10 * width * eps),
        ("P eps", width * eps),
        ("1e-5", 1e-5),
        ("1e-6", 1e-6),
        ("8 eps (default)", kernels.default_rtol(jnp.float32)),
        ("eps", eps),
    ]
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        z64 = jnp.asarray(z, jnp.float64)
        m64 = stats.joint_moments([z64[:, i * width : (i + 1) * width] for i in range(k)])
        del z64
        truth = pairwise.compare_moments(m64, names, metrics=METRICS)
    del m64
    print(f"\nrtol: float32 statistics and metrics against float64, {k} networks, {len(z)} frames")
    print("| rtol | value | " + " | ".join(f"max abs diff {m}" for m in METRICS) + " | capped |")
    print("|---|---|" + "---|" * (len(METRICS) + 1))
    for label, rtol in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = pairwise.compare_moments(m32, names, metrics=METRICS, rtol=rtol)
            _, s, _ = kernels.prepare(
                m32, variance=0.99, variance_rule="below", rtol=rtol, spectral=True
            )
        capped = int(np.sum(np.asarray(s.kept) < np.asarray(s.wanted)))
        diffs = " | ".join(f"{np.nanmax(np.abs(got[m] - truth[m])):.1e}" for m in METRICS)
        print(f"| {label} | {rtol:.1e} | {diffs} | {capped} of {k} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of speech")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--network", type=int, default=12, help="the noise-floor network")
    args = parser.parse_args()
    print(machine())
    z = activations(args.seconds)
    width = 768
    noise_floor(z[:, args.network * width : (args.network + 1) * width], args.batches)
    tolerances(z, width)


if __name__ == "__main__":
    main()
