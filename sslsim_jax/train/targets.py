"""HuBERT's first-iteration targets: k-means clusters of MFCC features, computed in JAX.

MFCCs are computed on the model's own frame grid (window = the conv encoder's receptive
field, hop = its stride: 400 and 320 samples for released models), so frame t of the targets
is frame t of the model.

References:
    Hsu et al., *HuBERT* (TASLP 2021), section III-A: 39-dimensional MFCC (13 coefficients with
    first and second differences), k-means with 100 clusters for the first iteration.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000


def _mel(hz):
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_filterbank(num_bins: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """[n_fft // 2 + 1, num_bins] triangular filters equally spaced on the mel scale."""
    edges_mel = np.linspace(0.0, _mel(sample_rate / 2), num_bins + 2)
    edges_hz = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _dct_matrix(num_bins: int, num_coeffs: int) -> np.ndarray:
    """[num_bins, num_coeffs] orthonormal DCT-II."""
    n = np.arange(num_bins)[:, None]
    k = np.arange(num_coeffs)[None, :]
    basis = np.cos(np.pi / num_bins * (n + 0.5) * k) * np.sqrt(2.0 / num_bins)
    basis[:, 0] /= np.sqrt(2.0)
    return basis.astype(np.float32)


def _delta(x: jax.Array) -> jax.Array:
    """Central difference over frames (axis -2), edges repeated."""
    padded = jnp.concatenate([x[..., :1, :], x, x[..., -1:, :]], axis=-2)
    return (padded[..., 2:, :] - padded[..., :-2, :]) / 2.0


def mfcc(
    waveforms: jax.Array,
    *,
    window: int = 400,
    hop: int = 320,
    num_mel_bins: int = 40,
    num_coeffs: int = 13,
    sample_rate: int = SAMPLE_RATE,
) -> jax.Array:
    """MFCCs with first and second differences: [B, S] -> [B, T, 3 · num_coeffs].

    Hamming window, power spectrum (FFT size the next power of two), mel filterbank, natural
    log (floored at 1e-6), orthonormal DCT-II. T = (S - window) // hop + 1.
    """
    waveforms = jnp.asarray(waveforms, jnp.float32)
    if waveforms.ndim != 2:
        raise ValueError(f"expected waveforms of shape [B, S], got {waveforms.shape}")
    samples = waveforms.shape[1]
    if samples < window:
        raise ValueError(f"expected at least {window} samples (one window), got {samples}")
    frames = (samples - window) // hop + 1
    index = jnp.arange(frames)[:, None] * hop + jnp.arange(window)[None, :]  # [T, W]
    framed = waveforms[:, index] * jnp.hamming(window)  # [B, T, W]
    n_fft = 1 << math.ceil(math.log2(window))
    power = jnp.abs(jnp.fft.rfft(framed, n=n_fft)) ** 2  # [B, T, F]
    mel = power @ _mel_filterbank(num_mel_bins, n_fft, sample_rate)  # [B, T, M]
    coeffs = jnp.log(jnp.maximum(mel, 1e-6)) @ _dct_matrix(num_mel_bins, num_coeffs)
    first = _delta(coeffs)
    return jnp.concatenate([coeffs, first, _delta(first)], axis=-1)


def _assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    # ||x - c||² up to the constant ||x||²: [N, D] x [K, D] -> [N, K]
    distance = jnp.sum(centroids**2, axis=1)[None, :] - 2.0 * x @ centroids.T
    return jnp.argmin(distance, axis=1)


@partial(jax.jit, static_argnames=("num_clusters", "iterations"))
def kmeans(key: jax.Array, x: jax.Array, *, num_clusters: int, iterations: int = 50) -> jax.Array:
    """Lloyd's k-means: centroids [K, D] of points x: [N, D].

    Initialised with K distinct points drawn uniformly; a cluster that loses all its points
    keeps its previous centroid. Plain Lloyd iterations (no k-means++), a fixed number of them.
    """
    if x.ndim != 2 or x.shape[0] < num_clusters:
        raise ValueError(f"expected x of shape [N >= {num_clusters}, D], got {x.shape}")
    start = jax.random.choice(key, x.shape[0], (num_clusters,), replace=False)

    def update(_, centroids):
        onehot = jax.nn.one_hot(_assign(x, centroids), num_clusters, dtype=x.dtype)  # [N, K]
        counts = onehot.sum(axis=0)[:, None]
        sums = onehot.T @ x
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids)

    return jax.lax.fori_loop(0, iterations, update, x[start])


def cluster_ids(features: jax.Array, centroids: jax.Array) -> jax.Array:
    """Nearest centroid of every frame: features [..., D], centroids [K, D] -> [...] int32."""
    flat = features.reshape(-1, features.shape[-1])
    return _assign(flat, centroids).astype(jnp.int32).reshape(features.shape[:-1])


def frame_mfcc(config, waveforms: jax.Array) -> jax.Array:
    """`mfcc` on ``config``'s frame grid (window = receptive field, hop = frame stride), cropped
    or zero-padded to the model's frame count: [B, S] -> [B, T, 39]."""
    feats = mfcc(waveforms, window=config.receptive_field, hop=config.frame_stride)
    frames = config.num_frames(waveforms.shape[1])
    feats = feats[:, :frames]
    return jnp.pad(feats, ((0, 0), (0, frames - feats.shape[1]), (0, 0)))


def fit_mfcc_clusters(
    key: jax.Array,
    config,
    waveforms: jax.Array,
    lengths: jax.Array,
    *,
    num_clusters: int,
    iterations: int = 50,
) -> dict[str, jax.Array]:
    """k-means of the standardised MFCCs of every valid frame of ``waveforms`` [B, S].

    Returns:
        ``{"mean": [39], "std": [39], "centroids": [K, 39]}``, the input of `mfcc_targets`.
    """
    feats = frame_mfcc(config, jnp.asarray(waveforms))  # [B, T, 39]
    valid = np.asarray(config.frame_lengths(np.asarray(lengths)))
    frames = np.arange(feats.shape[1])[None, :] < valid[:, None]
    points = np.asarray(feats)[frames]  # [N, 39]
    mean, std = points.mean(axis=0), points.std(axis=0) + 1e-5
    centroids = kmeans(
        key, jnp.asarray((points - mean) / std), num_clusters=num_clusters, iterations=iterations
    )
    return {"mean": jnp.asarray(mean), "std": jnp.asarray(std), "centroids": centroids}


def mfcc_targets(config, waveforms: jax.Array, clusters: dict[str, jax.Array]) -> jax.Array:
    """Cluster id of every frame: [B, S] -> [B, T] int32 (padded frames get ids too; the
    loss masks them)."""
    feats = (frame_mfcc(config, waveforms) - clusters["mean"]) / clusters["std"]
    return cluster_ids(feats, clusters["centroids"])
