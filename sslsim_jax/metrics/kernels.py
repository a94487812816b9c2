"""All-pairs kernels shared by the metric functions and `sslsim_jax.compare`.

Everything here works on the joint statistics of K networks laid out as padded blocks
[K, P, K, P] (P the widest network; narrower networks are padded with zero columns, which behave
exactly like constant neurons: excluded from neuron means, zero in every cross product). The
public pair functions call these with K = 2, `compare` with all networks at once, so a pair
function and `compare` compute the same number by the same code.

The co-moment may also be a *row block* [Ka, P, K, P]: the rows of the networks ``Blocks.rows``
only, as one device holds them when the joint statistics are sharded over devices
(`sslsim_jax.sharded`). Every ``*_rows`` kernel then gives the [Ka, K] rows of its metric
matrix from the local block plus small per-network arrays (``diag``, `Spectra`, ``own_sq``) that
hold all K networks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax import stats

# A neuron is constant when its standard deviation is below this many ulps of its scale
# (|mean| or the largest std of its network): below that, float rounding is all it carries.
_CONSTANT_ULPS = 8.0
VARIANCE_RULES = ("below", "reach")


class ConstantNeuronWarning(UserWarning):
    """Some neurons are constant over the frames and were excluded (see docstrings)."""


class RankDeficiencyWarning(UserWarning):
    """Fewer frames than neurons: a network's co-moment is rank deficient."""


class RankCapWarning(UserWarning):
    """SVCCA/PWCCA kept fewer directions than their variance rule asks, or linreg dropped
    directions its statistics resolve: they lie below the numerical rank (ill-conditioned
    activations for the statistics' precision)."""


class Blocks(NamedTuple):
    """Joint statistics of K networks as padded blocks (or the row block of Ka of them).

    Attributes:
        count: [] weighted frame count.
        comoment: [Ka, P, K, P] centred co-moment blocks of the networks ``rows`` (Ka = K and
            ``rows = 0..K-1`` unless sharded).
        valid: [K, P] bool, neuron is real (not padding) and not constant.
        real: [K, P] bool, neuron is real (not padding).
        row_cross: [Ka, P, K] centred Zᵀ R (debiased CKA).
        row_gram: [K, K] centred Rᵀ R (debiased CKA).
        diag: [K, P] co-moment diagonal (the neurons' centred sums of squares).
        rows: [Ka] int, the network of each row block.
    """

    count: jax.Array
    comoment: jax.Array
    valid: jax.Array
    real: jax.Array
    row_cross: jax.Array
    row_gram: jax.Array
    diag: jax.Array
    rows: jax.Array


class Spectra(NamedTuple):
    """Per-network eigendecomposition of the correlation matrix (descending eigenvalues).

    Attributes:
        inv_sd: [K, P] 1 / sqrt(co-moment diagonal) of valid neurons, 0 otherwise.
        whiten: [K, P, P] Q = diag(inv_sd) V Λ^{-1/2} over the numerical rank (zero columns
            beyond it), so Qᵀ C Q is the identity on the rank.
        eigvals: [K, P] eigenvalues of the correlation co-moment, descending.
        rank: [K] numerical rank.
        kept: [K] number of leading directions kept by the SVCCA variance rule, at most rank.
        wanted: [K] the number the variance rule asks for (above ``kept`` when capped).
    """

    inv_sd: jax.Array
    whiten: jax.Array
    eigvals: jax.Array
    rank: jax.Array
    kept: jax.Array
    wanted: jax.Array


def check_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Input check shared by the pair functions: x: [N, Dx], y: [N, Dy]."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"expected x of shape [N, D], got {x.shape}")
    if y.ndim != 2:
        raise ValueError(f"expected y of shape [N, D], got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x and y with the same N frames, got {x.shape} and {y.shape}")
    return x, y


def check_two(m: stats.Moments) -> None:
    if len(m.sizes) != 2:
        raise ValueError(
            f"expected Moments of 2 networks (x, y), got sizes {m.sizes}; use stats.select"
        )


def blocks(m: stats.Moments) -> Blocks:
    """Pad the joint statistics of m to [K, P, K, P] and find the constant neurons."""
    sizes = m.sizes
    k, p = len(sizes), max(sizes)
    dtype = m.comoment.dtype
    diag = jnp.diagonal(m.comoment)  # [D]
    if all(s == p for s in sizes):
        comoment = m.comoment.reshape(k, p, k, p)  # [K*P, K*P] -> [K, P, K, P]
        row_cross = m.row_cross.reshape(k, p, k)
        mean = m.mean.reshape(k, p)
        diag = diag.reshape(k, p)
        real = np.ones((k, p), bool)
    else:
        seg = stats.segment_ids(sizes)
        pos = np.concatenate([np.arange(s) for s in sizes]) + seg * p  # column -> padded slot
        comoment = jnp.zeros((k * p, k * p), dtype).at[np.ix_(pos, pos)].set(m.comoment)
        comoment = comoment.reshape(k, p, k, p)
        row_cross = jnp.zeros((k * p, k), dtype).at[pos].set(m.row_cross).reshape(k, p, k)
        mean = jnp.zeros((k * p,), dtype).at[pos].set(m.mean).reshape(k, p)
        diag = jnp.zeros((k * p,), dtype).at[pos].set(diag).reshape(k, p)
        real = np.zeros((k * p,), bool)
        real[pos] = True
        real = real.reshape(k, p)
    return Blocks(
        count=m.count,
        comoment=comoment,
        valid=valid_neurons(m.count, mean, diag, real),
        real=jnp.asarray(real),
        row_cross=row_cross,
        row_gram=m.row_gram,
        diag=diag,
        rows=jnp.arange(k),
    )


def valid_neurons(count: jax.Array, mean: jax.Array, diag: jax.Array, real) -> jax.Array:
    """[K, P] real neurons whose spread is above float rounding of their scale (not constant)."""
    eps = jnp.finfo(diag.dtype).eps
    scale = count * mean**2 + jnp.max(diag, axis=1, keepdims=True)
    return jnp.asarray(real) & (diag > (_CONSTANT_ULPS * eps) ** 2 * scale) & (diag > 0)


def defined(b: Blocks) -> jax.Array:
    """[K] networks whose similarities are defined: at least 2 frames and one varying neuron.

    A pair with an undefined network gets NaN in every metric, never a number: an all-constant
    network (e.g. a layer of all-silent audio) has no correlation, regression or subspace to
    compare, and a 0 there would read as "dissimilar".
    """
    return jnp.any(b.valid, axis=1) & (b.count >= 2)


def _pairs_defined(b: Blocks, values: jax.Array) -> jax.Array:
    """[Ka, K] ``values`` where both networks are `defined`, NaN elsewhere."""
    ok = defined(b)
    return jnp.where(ok[b.rows][:, None] & ok[None, :], values, jnp.nan)


def own_blocks(b: Blocks) -> jax.Array:
    """[Ka, P, P] each row network's own (diagonal) co-moment block."""
    return b.comoment[jnp.arange(b.comoment.shape[0]), :, b.rows, :]


def own_sq(b: Blocks) -> jax.Array:
    """[Ka] ‖C_aa‖²_F of each row network (linear and debiased CKA's normalisers)."""
    return jnp.sum(own_blocks(b) ** 2, axis=(1, 2))


# The default numerical rank of a correlation co-moment: eigenvalues above RTOL_EPS · eps(dtype)
# of the largest. Streamed float32 statistics carry null-space eigenvalues of 1e-8 (one batch)
# to 7e-8 (1000 batches) of the largest, float32 ``eigh`` adds none above that, and ill-
# conditioned layers hold real directions down to 4e-7 (docs/benchmarks.md, "The numerical rank
# of the statistics"; scripts/rank_tolerance.py): 8 · eps ≈ 9.5e-7 sits 13x above that noise.
RTOL_EPS = 8.0


def default_rtol(dtype) -> float:
    """Relative eigenvalue tolerance of the correlation co-moment: `RTOL_EPS` · eps(dtype)."""
    return RTOL_EPS * float(jnp.finfo(dtype).eps)


def inv_sd(b: Blocks) -> jax.Array:
    """[K, P] 1 / sqrt(co-moment diagonal) of valid neurons, 0 for constant or padding."""
    return jnp.where(b.valid, jax.lax.rsqrt(jnp.where(b.valid, b.diag, 1)), 0)


def spectra(
    b: Blocks, *, rtol: float | None = None, variance: float = 0.99, variance_rule: str = "below"
) -> Spectra:
    """Eigendecompose each row network's correlation co-moment once (``eigh``, vmapped).

    Returns `Spectra` of the Ka row networks (all K unless ``b`` is a row block).
    """
    if variance_rule not in VARIANCE_RULES:
        raise ValueError(f"expected variance_rule in {VARIANCE_RULES}, got {variance_rule!r}")
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"expected variance in (0, 1], got {variance}")
    p = b.valid.shape[1]
    if rtol is None:
        rtol = default_rtol(b.comoment.dtype)
    own = own_blocks(b)  # [Ka, P, P]
    isd = inv_sd(b)[b.rows]
    corr = own * isd[:, :, None] * isd[:, None, :]
    lam, vec = jnp.linalg.eigh(corr)
    lam, vec = lam[:, ::-1], vec[:, :, ::-1]  # descending
    lam = jnp.maximum(lam, 0)
    in_rank = lam > rtol * lam[:, :1]
    rank = jnp.sum(in_rank, axis=1)
    whiten = vec * jnp.where(in_rank, jax.lax.rsqrt(jnp.where(in_rank, lam, 1)), 0)[:, None, :]
    whiten = isd[:, :, None] * whiten
    cum = jnp.cumsum(lam, axis=1)
    below = jnp.sum(cum < variance * cum[:, -1:], axis=1)
    if variance_rule == "below":
        kept = jnp.maximum(below, 1)
    else:
        kept = jnp.minimum(below + 1, p)
    return Spectra(
        inv_sd=isd, whiten=whiten, eigvals=lam, rank=rank, kept=jnp.minimum(kept, rank), wanted=kept
    )


def rank_counts(s: Spectra) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """What `warn_rank_capped` reads: (kept, wanted, rank) [K] each and eigvals [K, P]."""
    return s.kept, s.wanted, s.rank, s.eigvals


def warn_rank_capped(
    counts: tuple[jax.Array, ...],
    names: Sequence[str],
    *,
    metrics: Sequence[str],
    frames: jax.Array,
    variance: float | None = None,
) -> None:
    """Warn (outside jit) when the numerical rank (``rtol``) cuts directions a metric would use:

    - SVCCA/PWCCA keep fewer directions of a network than the variance rule asks: float32
      statistics of ill-conditioned activations (the deep layers of random or collapsed models)
      put the rest below the numerical rank;
    - linreg's pseudo-inverse drops directions whose eigenvalues the statistics resolve (above
      eps of the largest, their rounding noise lying below) but the tolerance treats as zero.

    The values then differ from a float64 computation's. ``counts``: `rank_counts`;
    ``names``: the networks' (extra entries of padding are ignored); ``metrics``: the names
    computed; ``frames``: the (weighted) frame count, which bounds the true rank (frames − 1);
    ``variance``: the SVCCA rule's (needed when SVCCA or PWCCA is among them).
    """
    if is_traced(*counts, frames):
        return
    kept, wanted, rank, lam = (np.asarray(c) for c in counts)
    # What the statistics resolve: eigenvalues above eps of the largest (their rounding noise
    # lies below), never more than frames - 1 (beyond, it is noise and linreg is 1 anyway).
    resolved = np.sum(lam > np.finfo(lam.dtype).eps * lam[:, :1], axis=1)
    resolved = np.minimum(resolved, max(int(np.asarray(frames)) - 1, 0))

    def short(have, want, label: str) -> str:  # "name: <label>have of want" where have < want
        pairs = zip(names, have, want, strict=False)
        return ", ".join(f"{n}: {label}{h} of {w}" for n, h, w in pairs if h < w)

    messages = []
    if needs_cca(metrics) and (detail := short(kept, wanted, "")):
        messages.append(
            f"SVCCA/PWCCA keep fewer directions than the {variance:g} variance rule asks "
            f"({detail}): the others' eigenvalues lie below these statistics' numerical rank "
            "(rtol), so the values are less reliable; float64 statistics (jax_enable_x64), a "
            "smaller rtol or a lower variance (--svcca-variance) avoid it"
        )
    if "linreg" in metrics and (detail := short(rank, resolved, "rank ")):
        messages.append(
            f"linreg treats as zero directions these statistics resolve ({detail}): their "
            f"eigenvalues lie between eps and the rank tolerance (rtol, {RTOL_EPS:g} eps) of the "
            "largest, so linreg may be too low; float64 statistics (jax_enable_x64) keep them"
        )
    for message in messages:
        warnings.warn(message, RankCapWarning, stacklevel=3)


def _masked_mean(values: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    total = jnp.sum(jnp.where(mask, values, 0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0)


def neuron_best(b: Blocks, isd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """best[a, i, b] = max_j |r(a_i, b_j)| and its argmax j: [Ka, P, K] each; NaN and -1 where
    a_i is constant or padding, or b has no varying neuron (undefined, not "uncorrelated")."""
    corr = b.comoment * isd[b.rows][:, :, None, None] * isd[None, None, :, :]
    corr = jnp.abs(corr)
    best = jnp.max(corr, axis=3)
    matched = jnp.argmax(corr, axis=3).astype(jnp.int32)
    has = b.valid[b.rows][:, :, None] & jnp.any(b.valid, axis=1)[None, None, :]
    return jnp.where(has, best, jnp.nan), jnp.where(has, matched, -1)


def linear_cka_all(b: Blocks, norms: jax.Array | None = None) -> jax.Array:
    """[Ka, K] ‖C_ab‖²_F / (‖C_aa‖_F ‖C_bb‖_F), NaN where a network has no variance.

    ``norms``: [K] `own_sq` of every network (default: from ``b``, which must hold all rows).
    """
    sq = jnp.sum(b.comoment**2, axis=(1, 3))  # [Ka, K]
    d = own_sq(b) if norms is None else norms
    den = jnp.sqrt(d[b.rows][:, None] * d[None, :])
    return jnp.where(den > 0, sq / jnp.where(den > 0, den, 1), jnp.nan)


def debiased_cka_all(b: Blocks, norms: jax.Array | None = None) -> jax.Array:
    """[Ka, K] CKA with the unbiased HSIC estimator, from centred accumulators (see docs).

    ``norms``: as in `linear_cka_all`.
    """
    n = b.count
    safe = jnp.where(n > 3, n, 4.0)
    tr = jnp.sum(b.diag, axis=1)  # [K]

    def hsic(sq, m, tr_a, tr_b):  # tr(K L) = ‖C_ab‖²_F for centred linear kernels
        return (sq - m + tr_a * tr_b / ((safe - 1) * (safe - 2)) - 2 * m / (safe - 2)) / (
            safe * (safe - 3)
        )

    sq = jnp.sum(b.comoment**2, axis=(1, 3))  # [Ka, K]
    cross = hsic(sq, b.row_gram[b.rows], tr[b.rows][:, None], tr[None, :])
    d = hsic(own_sq(b) if norms is None else norms, jnp.diagonal(b.row_gram), tr, tr)  # [K]
    ok = (d[b.rows][:, None] > 0) & (d[None, :] > 0)
    den = jnp.sqrt(jnp.where(ok, d[b.rows][:, None] * d[None, :], 1))
    out = jnp.where(ok, cross / den, jnp.nan)
    return jnp.where(n > 3, out, jnp.nan)


def pair_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Static indices of the unordered pairs a < b."""
    ia, ib = np.triu_indices(k, 1)
    return ia, ib


def is_full(b: Blocks) -> bool:
    """Whether ``b`` holds every row network (rows 0..K-1), not a row block of them."""
    return b.comoment.shape[0] == b.valid.shape[0]


def cca_index(b: Blocks) -> tuple[np.ndarray, np.ndarray, bool]:
    """The pairs whose canonical correlations the CCA metrics need, and whether each stands for
    both directions: the unordered pairs a < b when ``b`` holds every row (one SVD gives both),
    else every (row block, network) pair."""
    if is_full(b):
        return (*pair_index(b.valid.shape[0]), True)
    ka, k = b.comoment.shape[0], b.valid.shape[0]
    return np.repeat(np.arange(ka), k), np.tile(np.arange(k), ka), False


def pair_matrix(b: Blocks, ab: jax.Array, ba: jax.Array | None, own: jax.Array) -> jax.Array:
    """[Ka, K, ...] matrix of per-pair values of the pairs `cca_index` lists.

    Args:
        ab: [n, ...] value of each pair (row network, network).
        ba: [n, ...] value of the reversed pairs when the pairs are unordered, else ignored.
        own: [Ka, ...] value of each row network against itself.
    """
    k, ka = b.valid.shape[0], b.comoment.shape[0]
    if is_full(b):
        ia, ib = pair_index(k)
        eye = jnp.zeros((k, k, *ab.shape[1:]), ab.dtype).at[np.arange(k), np.arange(k)].set(own)
        return eye.at[ia, ib].set(ab).at[ib, ia].set(ab if ba is None else ba)
    self_pair = (b.rows[:, None] == jnp.arange(k)[None, :]).reshape(ka, k, *(1,) * (ab.ndim - 1))
    return jnp.where(self_pair, own[:, None], ab.reshape(ka, k, *ab.shape[1:]))


class Parts(NamedTuple):
    """The per-neuron and per-direction values the moments metrics average, computed once for
    the metrics, their top-k (`sslsim_jax.metrics.topk`) and the matched-neuron tables.

    Attributes:
        best, matched: [Ka, P, K] `neuron_best` (maxcorr), or None.
        linreg: [Ka, P, K] `linreg_neurons`, or None.
        cca: `CanonicalPairs` of the pairs `cca_index` lists (svcca, pwcca), or None.
    """

    best: jax.Array | None
    matched: jax.Array | None
    linreg: jax.Array | None
    cca: CanonicalPairs | None


def needs_cca(metrics) -> bool:
    """Whether ``metrics`` (names) need `canonical_pairs`."""
    return "svcca" in metrics or "pwcca" in metrics


def pair_parts(
    b: Blocks,
    s: Spectra | None,
    isd: jax.Array,
    *,
    metrics,
    width: int,
    cca: CanonicalPairs | None = None,
) -> Parts:
    """The `Parts` that ``metrics`` (names; others are ignored) need, each computed once.

    ``width``: the static SVD width of `canonical_pairs`. ``cca``: its result for
    (``cca_index(b)``, ``weights="pwcca" in metrics``) when already computed (on the host).
    """
    best = matched = linreg = None
    if "maxcorr" in metrics:
        best, matched = neuron_best(b, isd)
    if "linreg" in metrics:
        linreg = linreg_neurons(b, s)
    if not needs_cca(metrics):
        cca = None
    elif cca is None:
        ia, ib, both = cca_index(b)
        cca = canonical_pairs(b, s, ia, ib, width=width, weights="pwcca" in metrics, both=both)
    return Parts(best, matched, linreg, cca)


def pwcca_ratio(weight: jax.Array, rho: jax.Array) -> jax.Array:
    """[n] Σ w·ρ / Σ w over the last axis (0 where every weight is 0)."""
    total = jnp.sum(weight, axis=-1)
    return jnp.where(total > 0, jnp.sum(weight * rho, axis=-1) / jnp.maximum(total, 1e-30), 0)


def _procrustes(b: Blocks, ia: np.ndarray, ib: np.ndarray) -> jax.Array:
    """[n] 2 − 2‖C_ab‖_* / sqrt(tr C_aa tr C_bb) of the pairs (row block ia, network ib)."""
    tr = jnp.sum(b.diag, axis=1)  # [K]
    nuc = jnp.sum(jnp.linalg.svd(b.comoment[ia, :, ib, :], compute_uv=False), axis=1)
    den = jnp.sqrt(tr[b.rows[ia]] * tr[ib])
    return jnp.where(den > 0, 2 - 2 * nuc / jnp.where(den > 0, den, 1), jnp.nan)


def procrustes_all(b: Blocks) -> jax.Array:
    """[Ka, K] 2 − 2‖C_ab‖_* / sqrt(tr C_aa tr C_bb); NaN where a network has no variance."""
    ia, ib, _ = cca_index(b)
    dist = _procrustes(b, ia, ib)
    self_dist = jnp.where(jnp.sum(b.diag, axis=1)[b.rows] > 0, 0.0, jnp.nan).astype(dist.dtype)
    return pair_matrix(b, dist, None, self_dist)


def metric_matrices(
    b: Blocks,
    s: Spectra | None,
    isd: jax.Array,
    *,
    metrics: tuple[str, ...],
    width: int,
    norms: jax.Array | None = None,
    parts: Parts | None = None,
) -> dict[str, jax.Array]:
    """The requested metrics' [Ka, K] matrices (``b`` may be a row block, with ``norms``).

    ``parts``: the `pair_parts` of ``metrics`` when already computed (e.g. for their top-k).
    """
    if parts is None:
        parts = pair_parts(b, s, isd, metrics=metrics, width=width)
    own = b.valid[b.rows][:, :, None]  # [Ka, P, 1]
    out = {}
    if "maxcorr" in metrics:
        out["maxcorr"] = _pairs_defined(b, _masked_mean(parts.best, own, axis=1))
    if "linreg" in metrics:
        out["linreg"] = _pairs_defined(b, _masked_mean(parts.linreg, own, axis=1))
    if "svcca" in metrics or "pwcca" in metrics:
        c = parts.cca
        one = jnp.ones(b.comoment.shape[0], c.rho.dtype)
        sv = _masked_mean(c.rho, c.take, axis=1)
        out["svcca"] = _pairs_defined(b, pair_matrix(b, sv, sv, one))
        if "pwcca" in metrics:
            ba = None if c.weight_ba is None else pwcca_ratio(c.weight_ba, c.rho)
            pw = pair_matrix(b, pwcca_ratio(c.weight_ab, c.rho), ba, one)
            out["pwcca"] = _pairs_defined(b, pw)
    if "linear_cka" in metrics:
        out["linear_cka"] = linear_cka_all(b, norms)
    if "debiased_cka" in metrics:
        out["debiased_cka"] = debiased_cka_all(b, norms)
    if "procrustes" in metrics:
        out["procrustes"] = procrustes_all(b)
    return {k: v for k, v in out.items() if k in metrics}


def is_traced(*arrays) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(arrays))


class UndefinedSimilarityWarning(UserWarning):
    """A network has no varying neuron: its similarities are NaN (undefined), not 0."""


def warn_degenerate(
    count: jax.Array,
    valid: jax.Array,
    real: jax.Array,
    diag: jax.Array,
    *,
    rank_sensitive: bool,
    names: tuple[str, ...] | None = None,
) -> None:
    """Check the statistics outside jit: errors for what has no answer, warnings for what is
    excluded or undefined (once per call; nothing under jit, where values are NaN instead).

    Args:
        count: [] frame count; valid, real: [K, P] masks of `Blocks`; diag: [K, P] co-moment
            diagonal (non-finite when an activation was NaN or Inf).
        rank_sensitive: also warn when N <= D (whitening-based metrics).
        names: K network names for the messages.

    Raises:
        ValueError: fewer than 2 frames (no variance is defined), or NaN/Inf activations in a
            network (named): a similarity of them would be meaningless.
    """
    if is_traced(count, valid, real, diag):
        return
    names = names or tuple(f"network {i}" for i in range(valid.shape[0]))
    n = float(count)
    if not n >= 2:
        raise ValueError(
            f"expected at least 2 frames, got {n:g}: similarities of fewer frames are undefined"
        )
    finite = np.asarray(jnp.all(jnp.isfinite(jnp.where(real, diag, 0)), axis=1))
    if not finite.all():
        bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
        raise ValueError(f"NaN or Inf activations in {', '.join(bad)}: no similarity is defined")
    const = np.asarray(jnp.sum(real & ~valid, axis=1))
    widths = np.asarray(jnp.sum(real, axis=1))
    empty = [name for name, c, w in zip(names, const, widths, strict=True) if c == w]
    if empty:
        warnings.warn(
            f"no varying neuron in {', '.join(empty)}: its similarities are NaN (undefined); "
            "is the audio silent or the layer dead?",
            UndefinedSimilarityWarning,
            stacklevel=3,
        )
    partly = [(name, c, w) for name, c, w in zip(names, const, widths, strict=True) if 0 < c < w]
    if partly:
        detail = ", ".join(f"{name}: {c}/{w}" for name, c, w in partly)
        warnings.warn(
            f"constant neurons excluded ({detail}); they count in no neuron mean and match nothing",
            ConstantNeuronWarning,
            stacklevel=3,
        )
    if rank_sensitive and (widths >= n).any():
        warnings.warn(
            f"N={n:g} frames <= D={int(widths.max())} neurons: co-moments are rank deficient; "
            "whitening uses the numerical rank (linreg reaches 1, CCA saturates)",
            RankDeficiencyWarning,
            stacklevel=3,
        )


@functools.partial(
    jax.jit, static_argnames=("variance", "variance_rule", "rtol", "spectral", "padded")
)
def _prepare(m, *, variance, variance_rule, rtol, spectral, padded):
    b = blocks(m)
    s = spectra(b, rtol=rtol, variance=variance, variance_rule=variance_rule) if spectral else None
    return b if padded else b._replace(comoment=None), s, inv_sd(b)


def prepare(
    m: stats.Moments, *, variance: float, variance_rule: str, rtol: float | None, spectral: bool
) -> tuple[Blocks, Spectra | None, jax.Array]:
    """The per-network intermediates of every all-pairs metric: `blocks`, `spectra` (when
    ``spectral``) and `inv_sd`, in one compiled program.

    When every network has the same width and the co-moment is a host array, the blocks'
    [K, P, K, P] co-moment is the same memory reshaped, not a copy out of the program (GBs;
    `sslsim_jax.host_stats` allocates it so that JAX takes it without a copy too).
    """
    k, p = len(m.sizes), max(m.sizes)
    view = isinstance(m.comoment, np.ndarray) and all(s == p for s in m.sizes)
    kw = dict(variance=variance, variance_rule=variance_rule, rtol=rtol, spectral=spectral)
    b, s, isd = _prepare(m, padded=not view, **kw)
    if view:
        b = b._replace(comoment=jax.device_put(m.comoment.reshape(k, p, k, p)))
    return b, s, isd


joint_pair = jax.jit(lambda x, y, where: stats.joint_moments([x, y], where=where))


@functools.partial(
    jax.jit, static_argnames=("metric", "spectral", "rtol", "variance", "variance_rule")
)
def pair_metric(
    m: stats.Moments,
    *,
    metric: str,
    spectral: bool,
    rtol: float | None = None,
    variance: float = 0.99,
    variance_rule: str = "below",
):
    """Value [] of one metric for networks (0, 1) of m, the masks `warn_degenerate` needs and
    the `rank_counts` `warn_rank_capped` needs (None unless spectral).

    The same dispatch as `compare` (`metric_matrices` with K = 2 and every eigen-direction).
    """
    b = blocks(m)
    s = spectra(b, rtol=rtol, variance=variance, variance_rule=variance_rule) if spectral else None
    value = metric_matrices(b, s, inv_sd(b), metrics=(metric,), width=b.valid.shape[1])[metric]
    counts = None if s is None else rank_counts(s)
    return value[0, 1], (b.count, b.valid, b.real, b.diag), counts


# ---------------------------------------------------------------------------------------------
# By-products of the pair metrics: the per-neuron and per-direction values that the metrics
# average, for analyses that need more than the mean (Wu et al.'s top-k, `metrics.topk`).


def linreg_neurons(b: Blocks, s: Spectra) -> jax.Array:
    """[Ka, P, K] √R² of predicting neuron i of row network a from all of network b.

    The values the linreg metric averages over a's valid neurons (0 for constant or padding
    ones): the squared row norms of C_ab Q_b, rows scaled to standardised a.
    """
    prec = stats.matmul_precision()
    if is_full(b):
        # C_ab = C_baᵀ: contract network b's own row slab C[b] (contiguous, [P, K, P]) with
        # Q_b, one network at a time, rather than the strided column slabs of every row.
        def one(slab_q):
            slab, q = slab_q
            proj = jnp.einsum("qap,qr->apr", slab, q, precision=prec)
            return jnp.sum(proj**2, axis=2)  # [K, P]

        sq = jnp.moveaxis(jax.lax.map(one, (b.comoment, s.whiten)), 0, 2)  # [K, P, K]
    else:
        proj = jnp.einsum("apbq,bqr->apbr", b.comoment, s.whiten, precision=prec)
        sq = jnp.sum(proj**2, axis=3)  # [Ka, P, K]
    r2 = jnp.clip(sq * s.inv_sd[b.rows][:, :, None] ** 2, 0, 1)
    return jnp.where(b.valid[b.rows][:, :, None], jnp.sqrt(r2), 0)


class CanonicalPairs(NamedTuple):
    """Canonical correlations of n network pairs (a, b), the values SVCCA and PWCCA average.

    Attributes:
        rho: [n, W] canonical correlations, descending, clipped to [0, 1].
        take: [n, W] bool, direction w is one of the min(kept_a, kept_b) canonical pairs.
        weight_ab: [n, W] PWCCA weights of a's canonical variates (0 outside ``take``), or None.
        weight_ba: [n, W] the same for b's variates (``both``), or None.
    """

    rho: jax.Array
    take: jax.Array
    weight_ab: jax.Array | None
    weight_ba: jax.Array | None


def canonical_pairs(
    b: Blocks,
    s: Spectra,
    ia: np.ndarray,
    ib: np.ndarray,
    *,
    width: int,
    weights: bool,
    both: bool,
) -> CanonicalPairs:
    """Per-direction canonical correlations (and PWCCA weights) of the pairs (ia, ib).

    One SVD per pair of the whitened cross block of the kept directions: ``svcca =
    mean(rho[take])``, ``pwcca = Σ weight·rho / Σ weight``. ``ia`` indexes row blocks, ``ib``
    networks (and row blocks too when ``both``). ``width`` (static) is how many leading
    eigen-directions enter each SVD; any value at least ``max(s.kept)`` gives the same result.
    """
    keep = jnp.arange(width)[None, :] < s.kept[:, None]  # [K, W]
    qk = s.whiten[:, :, :width] * keep[:, None, :]  # [K, P, W]
    ga = b.rows[ia]
    cross = b.comoment[ia, :, ib, :]  # [n, P, P]
    prec = stats.matmul_precision()
    # [n, W, P] @ [n, P, P] @ [n, P, W]: whitened cross block of kept directions.
    mat = jnp.einsum("npx,npq,nqy->nxy", qk[ga], cross, qk[ib], precision=prec)
    u, rho, vt = jnp.linalg.svd(mat, full_matrices=False)
    m = jnp.minimum(s.kept[ga], s.kept[ib])  # [n]
    take = jnp.arange(width)[None, :] < m[:, None]  # [n, W]
    rho = jnp.where(take, jnp.clip(rho, 0, 1), 0)
    if not weights:
        return CanonicalPairs(rho, take, None, None)
    load = jnp.einsum("kpw,kpq->kwq", qk[b.rows], own_blocks(b), precision=prec)  # <U_w, x_q>

    def weight(vecs: jax.Array, side: np.ndarray) -> jax.Array:
        # [n, W, W]^T x [n, W, P] -> [n, W(canonical), P]: <h_k, x_j>.
        align = jnp.abs(jnp.einsum("nwc,nwq->ncq", vecs, load[side], precision=prec))
        return jnp.where(take, jnp.sum(align, axis=2), 0)

    w_ba = weight(jnp.swapaxes(vt, 1, 2), ib) if both else None
    return CanonicalPairs(rho, take, weight(u, ia), w_ba)
