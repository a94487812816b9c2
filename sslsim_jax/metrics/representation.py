"""Layer-level (representation) similarity of two networks' activations of the same frames.

Every function takes x: [N, Dx] and y: [N, Dy] (rows = the same N frames), an optional frame
mask or frequency weights ``where: [N]``, and has a ``*_from_moments`` twin taking the joint
`sslsim_jax.stats.Moments` of (x, y) (``sizes == (Dx, Dy)``; use `stats.select` to pick two of
many networks). Both compute the same number by the same code: the raw-array function builds
the statistics and calls the twin. All are pure, jit-able and vmap-able (options are static).

Direction: symmetric measures (``linear_cka``, ``debiased_cka``, ``rbf_cka``, ``svcca``,
``procrustes``) give the same value both ways; ``linreg`` and ``pwcca`` are **x-centric**: they
measure x in terms of y (a mean over x's neurons, resp. weights from x).

Numerical method: co-moments come from `sslsim_jax.stats` (two-pass centred batches, Chan
merge; float32 is within ~1e-5 of float64 even with |mean| / std = 1e4). CCA-type measures
standardise each neuron and eigendecompose (``eigh``) each network's correlation co-moment once;
eigenvalues at most ``rtol`` times the largest (default ``8 * eps`` of the statistics'
dtype, `kernels.RTOL_EPS`) are treated as zero, so whitening uses the numerical rank: with
N <= D (rank deficient) ``linreg`` is 1 (y interpolates every x neuron) and canonical
correlations saturate, but nothing is NaN. Canonical correlations are the singular values
(``svd``) of the whitened cross block. Constant neurons (std below 8 ulps of their scale) are
excluded from standardisation and neuron means; a `ConstantNeuronWarning` /
`RankDeficiencyWarning` is issued once per call outside `jax.jit`, and a `RankCapWarning` when
SVCCA/PWCCA keep fewer directions than their variance rule asks because the others lie below
the numerical rank, or when linreg drops directions above eps that the statistics resolve. A
network with no variance at all scores 0 (distance 2 for procrustes).

Tolerances (tests): against float64 NumPy references, 1e-5 in float64 mode and 1e-4 in float32
for well-conditioned data (condition number of the correlation matrix below ~1e3).

References:
    Raghu, Gilmer, Yosinski, Sohl-Dickstein. SVCCA. NeurIPS 2017.
    Morcos, Raghu, Bengio. Insights on representational similarity in neural networks with
    canonical correlation (PWCCA). NeurIPS 2018.
    Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited
    (CKA). ICML 2019.
    Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence maximization
    (unbiased HSIC). JMLR 2012.
    Ding, Denain, Steinhardt. Grounding representation similarity with statistical testing
    (orthogonal Procrustes distance). NeurIPS 2021.
    Wu, Belinkov, Sajjad, Durrani, Dalvi, Glass. Similarity analysis of contextual word
    representation models. ACL 2020 (linreg / mixedsim).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sslsim_jax import stats
from sslsim_jax.metrics import kernels

__all__ = [
    "linreg",
    "linreg_from_moments",
    "svcca",
    "svcca_from_moments",
    "pwcca",
    "pwcca_from_moments",
    "linear_cka",
    "linear_cka_from_moments",
    "debiased_cka",
    "debiased_cka_from_moments",
    "rbf_cka",
    "rbf_cka_matrix",
    "procrustes",
    "procrustes_from_moments",
]


def _moments(x: jax.Array, y: jax.Array, where: jax.Array | None) -> stats.Moments:
    x, y = kernels.check_pair(x, y)
    return kernels.joint_pair(x, y, where)


def _from_moments(m: stats.Moments, metric: str, spectral: bool, **options) -> jax.Array:
    kernels.check_two(m)
    value, checks, counts = kernels.pair_metric(m, metric=metric, spectral=spectral, **options)
    kernels.warn_degenerate(*checks, rank_sensitive=spectral)
    if counts is not None:
        kernels.warn_rank_capped(
            counts, ("x", "y"), metrics=(metric,), frames=checks[0],
            variance=options.get("variance"),
        )  # fmt: skip
    return value


def linreg_from_moments(m: stats.Moments, *, rtol: float | None = None) -> jax.Array:
    """`linreg` from the joint statistics of (x, y)."""
    return _from_moments(m, "linreg", True, rtol=rtol)


def linreg(
    x: jax.Array, y: jax.Array, *, where: jax.Array | None = None, rtol: float | None = None
) -> jax.Array:
    """Linear-regression similarity (mixedsim) of x in terms of y.

    For each valid x neuron j, R²_j of the least-squares prediction of standardised x_j from all
    of y (with intercept): R²_j = cⱼᵀ C_yy⁺ cⱼ / C_xx,jj, the pseudo-inverse taken on y's
    correlation co-moment over its numerical rank (``rtol``). score = mean_j √R²_j.

    Args:
        x: [N, Dx] activations (predicted).
        y: [N, Dy] activations (predictors) of the same frames.
        where: optional [N] boolean frame mask or frequency weights.
        rtol: relative eigenvalue tolerance of the pseudo-inverse (default 8 · eps).

    Returns:
        [] score in [0, 1]. x-centric.
    """
    return linreg_from_moments(_moments(x, y, where), rtol=rtol)


def svcca_from_moments(
    m: stats.Moments,
    *,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """`svcca` from the joint statistics of (x, y)."""
    return _from_moments(
        m, "svcca", True, variance=variance, variance_rule=variance_rule, rtol=rtol
    )


def svcca(
    x: jax.Array,
    y: jax.Array,
    *,
    where: jax.Array | None = None,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """Singular vector CCA: mean canonical correlation of the leading principal subspaces.

    Each neuron is standardised; each side keeps its leading principal directions (eigenvalues
    of the correlation co-moment, descending): with ``variance_rule="below"`` (default, the rule
    of the reference code of Wu et al.) the k directions whose cumulative variance is *strictly
    below* ``variance`` of the total (at least 1); with ``"reach"`` the smallest k whose
    cumulative variance reaches it. Directions beyond the numerical rank are never kept. The
    canonical correlations ρ (singular values of the whitened cross block of the kept
    directions) number m = min(kx, ky); score = mean ρ. With ``variance=1, variance_rule=
    "reach"`` this is plain CCA, invariant to invertible linear maps of x and y.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.
        variance: fraction of variance that decides how many directions are kept.
        variance_rule: "below" or "reach" (see above).
        rtol: relative eigenvalue tolerance of the numerical rank (default 8 · eps).

    Returns:
        [] score in [0, 1]. Symmetric.
    """
    return svcca_from_moments(
        _moments(x, y, where), variance=variance, variance_rule=variance_rule, rtol=rtol
    )


def pwcca_from_moments(
    m: stats.Moments,
    *,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """`pwcca` from the joint statistics of (x, y)."""
    return _from_moments(
        m, "pwcca", True, variance=variance, variance_rule=variance_rule, rtol=rtol
    )


def pwcca(
    x: jax.Array,
    y: jax.Array,
    *,
    where: jax.Array | None = None,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """Projection-weighted CCA of x in terms of y.

    The canonical correlations ρ_k of `svcca` (same subspaces, same options), weighted by how
    much x's canonical variate h_k (unit norm, in x's kept principal subspace) accounts for x's
    neurons: a_k = Σ_j |⟨h_k, x̃_j⟩| over x's centred neurons x̃_j in their original units (as
    in the reference code of Morcos et al. and Wu et al.; no re-orthonormalisation). score =
    Σ a_k ρ_k / Σ a_k. Works for Dx != Dy.

    Not unique when canonical correlations coincide (y a rotation of x, say): any basis of
    their variates is a valid SVD, and the weights, sums of absolute values, depend on it. On
    such data float32 and float64 (or two SVD routines) may differ by ~3e-3; SVCCA does not.

    Args:
        x: [N, Dx] activations (the side whose weights are used).
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.
        variance: fraction of variance that decides how many directions are kept.
        variance_rule: "below" or "reach" (see `svcca`).
        rtol: relative eigenvalue tolerance of the numerical rank (default 8 · eps).

    Returns:
        [] score in [0, 1]. x-centric.
    """
    return pwcca_from_moments(
        _moments(x, y, where), variance=variance, variance_rule=variance_rule, rtol=rtol
    )


def linear_cka_from_moments(m: stats.Moments) -> jax.Array:
    """`linear_cka` from the joint statistics of (x, y)."""
    return _from_moments(m, "linear_cka", False)


def linear_cka(x: jax.Array, y: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Linear CKA: ‖x̃ᵀỹ‖²_F / (‖x̃ᵀx̃‖_F ‖ỹᵀỹ‖_F) with x̃, ỹ centred.

    Invariant to orthogonal maps and isotropic scaling of either side. 0 if a side is constant.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        [] score in [0, 1]. Symmetric.
    """
    return linear_cka_from_moments(_moments(x, y, where))


def debiased_cka_from_moments(m: stats.Moments) -> jax.Array:
    """`debiased_cka` from the joint statistics of (x, y)."""
    return _from_moments(m, "debiased_cka", False)


def debiased_cka(x: jax.Array, y: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """CKA with the unbiased HSIC estimator (Song et al. 2012) on linear kernels.

    With x, y centred, K = x xᵀ, L = y yᵀ, r_x = diag K, r_y = diag L (squared row norms):
    HSIC_u = [‖x̃ᵀỹ‖²_F − r_xᵀr_y + tr(K) tr(L) / ((n−1)(n−2)) − 2 r_xᵀr_y / (n−2)] / (n(n−3)),
    which is Song et al.'s estimator after using the translation invariance of the U-statistic
    (centred columns make K1 = 0). It is exact from the streaming accumulators
    (`stats.Moments.row_cross` / ``row_gram``), no N×N matrix, no mini-batch approximation.
    score = HSIC_u(x, y) / sqrt(HSIC_u(x, x) HSIC_u(y, y)).

    Behaviour at small N: the cross HSIC_u may be negative (independent data); the score is
    then negative, not clipped. If either self-HSIC_u is <= 0 (a constant side, or too few
    frames) the score is 0. With fewer than 4 frames the estimator is undefined: NaN.
    Frequency weights count as repeated frames (n = Σ w).

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        [] score, at most 1. Symmetric.
    """
    return debiased_cka_from_moments(_moments(x, y, where))


def procrustes_from_moments(m: stats.Moments) -> jax.Array:
    """`procrustes` from the joint statistics of (x, y)."""
    return _from_moments(m, "procrustes", False)


def procrustes(x: jax.Array, y: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Orthogonal Procrustes distance 2 − 2‖x̂ᵀŷ‖_* (Ding et al. 2021).

    x̂, ŷ are the centred activations scaled to unit Frobenius norm; the nuclear norm is the sum
    of singular values (``svd``) of the co-moment block. Pads the narrower side with zeros, so
    Dx != Dy is fine. 0 for identical inputs; 2 if a side is constant.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        [] distance in [0, 2]. Symmetric.
    """
    return procrustes_from_moments(_moments(x, y, where))


def _rbf_centred_gram(
    x: jax.Array, valid: jax.Array, threshold: float
) -> tuple[jax.Array, jax.Array]:
    dots = jnp.matmul(x, x.T, precision=stats.matmul_precision())  # [S, S]
    sq = jnp.diagonal(dots)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * dots, 0)
    pair = valid[:, None] & valid[None, :]
    median = jnp.nanmedian(jnp.where(pair, dist, jnp.nan))
    bw = 2 * threshold**2 * median
    gram = jnp.where(pair, jnp.exp(-dist / jnp.where(bw > 0, bw, 1)), 0)
    w = valid.astype(gram.dtype)
    n = jnp.maximum(jnp.sum(w), 1)
    row = jnp.sum(gram, axis=1) / n
    total = jnp.sum(row * w) / n
    centred = gram - row[:, None] - row[None, :] + total
    return jnp.where(pair, centred, 0), bw > 0


@functools.partial(jax.jit, static_argnames=("threshold", "max_frames", "seed"))
def rbf_cka_matrix(
    networks: list[jax.Array],
    *,
    where: jax.Array | None = None,
    threshold: float = 1.0,
    max_frames: int = 4096,
    seed: int = 0,
) -> jax.Array:
    """[K, K] `rbf_cka` of every pair of K networks: one centred Gram per network, then all
    pairwise Frobenius inner products at once. Same options as `rbf_cka`.

    Args:
        networks: K arrays [N, D_k] of the same frames.
        where: optional [N] frame mask.
        threshold: bandwidth as a fraction of the median distance.
        max_frames: subsample size S above which frames are sampled.
        seed: PRNG seed of the subsample.

    Returns:
        [K, K] symmetric scores.
    """
    arrays = [jnp.asarray(x) for x in networks]
    n = arrays[0].shape[0]
    for i, x in enumerate(arrays):
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"expected networks[{i}] of shape [N, D] with N={n}, got {x.shape}")
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    valid = jnp.ones((n,), bool) if where is None else jnp.asarray(where) > 0
    if valid.shape != (n,):
        raise ValueError(f"expected where of shape [N] = ({n},), got {valid.shape}")
    idx = None
    if n > max_frames:
        p = valid.astype(dtype) / jnp.maximum(jnp.sum(valid), 1)
        idx = jax.random.choice(jax.random.key(seed), n, (max_frames,), replace=False, p=p)
        valid = valid[idx]
    grams, oks = [], []
    for x in arrays:
        x = x.astype(dtype) if idx is None else x[idx].astype(dtype)
        g, ok = _rbf_centred_gram(x - jnp.mean(x, axis=0), valid, threshold)
        grams.append(g.reshape(-1))  # [S, S] -> [S*S]
        oks.append(ok)
    flat = jnp.stack(grams)  # [K, S*S]
    ok = jnp.stack(oks)
    inner = jnp.matmul(flat, flat.T, precision=stats.matmul_precision())  # [K, K]
    norm = jnp.sqrt(jnp.diagonal(inner))
    den = norm[:, None] * norm[None, :]
    good = ok[:, None] & ok[None, :] & (den > 0)
    return jnp.where(good, inner / jnp.where(good, den, 1), 0)


def rbf_cka(
    x: jax.Array,
    y: jax.Array,
    *,
    where: jax.Array | None = None,
    threshold: float = 1.0,
    max_frames: int = 4096,
    seed: int = 0,
) -> jax.Array:
    """CKA with Gaussian kernels (Kornblith et al. 2019), on a seeded frame subsample.

    Kernel exp(−‖a − b‖² / (2 σ²)) with σ² = threshold² · median of the squared distances
    between the (valid) frames, diagonal included, as in Kornblith et al.'s code; biased
    (centred-Gram) HSIC. The Gram matrices are [S, S]: when N > ``max_frames`` a subsample of
    S = ``max_frames`` valid frames is drawn without replacement with ``jax.random.key(seed)``
    (the same frames for x and y), so memory is O(max_frames²) regardless of N; at least
    ``max_frames`` frames must then be valid. With N <= max_frames all valid frames are used.
    ``where`` acts as a mask (weight > 0). There is no streaming-statistics twin: the kernel is
    not a function of second moments.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] frame mask.
        threshold: bandwidth as a fraction of the median distance.
        max_frames: subsample size S above which frames are sampled (default 4096: two
            float32 [S, S] Grams = 128 MiB).
        seed: PRNG seed of the subsample.

    Returns:
        [] score in [0, 1]; 0 if a side is constant. Symmetric.
    """
    x, y = kernels.check_pair(x, y)
    return rbf_cka_matrix(
        [x, y], where=where, threshold=threshold, max_frames=max_frames, seed=seed
    )[0, 1]
