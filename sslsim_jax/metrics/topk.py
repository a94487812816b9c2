"""Top-k similarity (Wu et al. 2020): how much of a score its best neurons or directions carry.

Each of the metrics ``maxcorr``, ``linreg``, ``svcca`` and ``pwcca`` is a mean of per-neuron
or per-direction values; its top-k version averages only the largest fraction k of them. For
x in terms of y and a fraction k, with n the number of values and c = max(1, ⌊k·n + 1e-9⌋)
(the 1e-9 keeps k·n that is an integer in exact arithmetic, e.g. 0.3·10, from rounding down):

- ``maxcorr``: mean of the c largest of x's per-neuron best |r| over y's neurons; n = x's
  valid (not constant, not padding) neurons.
- ``linreg``: mean of the c largest of x's per-neuron √R² from all of y; n as for maxcorr.
- ``svcca``: mean of the c largest canonical correlations; n = min(kx, ky), the number SVCCA
  averages (kx, ky the principal directions each side keeps).
- ``pwcca``: Σ_{i<c} wᵢρᵢ / Σ_{i<c} wᵢ over the first c canonical directions in descending ρ,
  with x's PWCCA weights wᵢ (see `sslsim_jax.metrics.pwcca`); n as for svcca.

At k = 1, c = n and each equals its metric. The top-k means of maxcorr, linreg and svcca are
non-increasing in k (the mean of the largest values can only drop as smaller ones join); the
PWCCA ratio need not be. Everything comes from the same kernels as the metrics
(`sslsim_jax.metrics.kernels`), which hand back the values before averaging; c is looked up in a
static table indexed by n, so k·n is rounded in float64 even when the arrays are float32.

Conventions (from the metrics): a network without valid neurons (or without kept directions)
scores 0 for every k; x-centric metrics (maxcorr, linreg, pwcca) give x in terms of y.

References:
    Wu, Belinkov, Sajjad, Durrani, Dalvi, Glass. Similarity analysis of contextual word
    representation models. ACL 2020 (localization vs distributivity). Their notebooks
    (johnmwu/contextual-corr-analysis ``analysis/analysis-8.ipynb``) compute top-k curves; the
    definitions above are ours as stated, not checked line by line against that notebook.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax import stats
from sslsim_jax.metrics import kernels, registry

__all__ = [
    "DEFAULT_KS",
    "TOPK_METRICS",
    "topk",
    "topk_all_from_moments",
    "topk_from_moments",
    "topk_matrices",
]

DEFAULT_KS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOPK_METRICS = registry.names("moments", topk=True)
_SPECTRAL = set(registry.names("moments", topk=True, spectral=True))


def check_ks(ks: Sequence[float]) -> tuple[float, ...]:
    """ks as a static tuple of floats, each in (0, 1]."""
    if isinstance(ks, (int, float)):
        ks = (ks,)
    ks = tuple(float(k) for k in np.asarray(ks, dtype=np.float64).ravel())
    if not ks or not all(0.0 < k <= 1.0 for k in ks):
        raise ValueError(f"expected ks, fractions in (0, 1], got {ks}")
    return ks


def check_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in TOPK_METRICS]
    if unknown or not metrics:
        raise ValueError(f"expected metric among {TOPK_METRICS}, got {metrics}")
    return metrics


def counts(ks: tuple[float, ...], n_max: int) -> np.ndarray:
    """[len(ks), n_max + 1] int32 table: c = max(1, ⌊k·n + 1e-9⌋) for n = 0 … n_max."""
    n = np.arange(n_max + 1, dtype=np.float64)
    ks_arr = np.asarray(ks, dtype=np.float64)[:, None]
    return np.maximum(1, np.floor(ks_arr * n + 1e-9)).astype(np.int32)


def _top_means(values: jax.Array, mask: jax.Array, ks: tuple[float, ...]) -> jax.Array:
    """[..., len(ks)] mean of the c largest valid entries along the last axis of values.

    values: [..., P]; mask: [..., P] bool (broadcastable). NaN where nothing is valid.
    """
    mask = jnp.broadcast_to(mask, values.shape)
    n = jnp.sum(mask, axis=-1)  # [...]
    # Invalid entries sort last; descending order puts the c largest valid values first.
    ordered = -jnp.sort(jnp.where(mask, -values, jnp.inf), axis=-1)
    total = jnp.cumsum(jnp.where(jnp.isfinite(ordered), ordered, 0), axis=-1)  # [..., P]
    c = jnp.moveaxis(jnp.asarray(counts(ks, values.shape[-1]))[:, n], 0, -1)  # [..., len(ks)]
    top = jnp.take_along_axis(total, c - 1, axis=-1)
    return jnp.where(n[..., None] > 0, top / c.astype(top.dtype), jnp.nan)


def _top_cca(
    pairs: kernels.CanonicalPairs, ks: tuple[float, ...], pwcca: bool
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """[n, len(ks)] top-k SVCCA and PWCCA (both directions, when their weights are present)."""
    n = jnp.sum(pairs.take, axis=-1)  # [n]
    c = jnp.asarray(counts(ks, pairs.rho.shape[-1]))[:, n].T  # [n, len(ks)]
    idx = c - 1
    sv = jnp.take_along_axis(jnp.cumsum(pairs.rho, axis=-1), idx, axis=-1) / c
    sv = jnp.where(n[:, None] > 0, sv, jnp.nan)
    if not pwcca:
        return sv, None, None

    def weighted(w: jax.Array | None) -> jax.Array | None:
        if w is None:
            return None
        num = jnp.take_along_axis(jnp.cumsum(w * pairs.rho, axis=-1), idx, axis=-1)
        den = jnp.take_along_axis(jnp.cumsum(w, axis=-1), idx, axis=-1)
        return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0)

    return sv, weighted(pairs.weight_ab), weighted(pairs.weight_ba)


def topk_matrices(
    b: kernels.Blocks,
    s: kernels.Spectra | None,
    isd: jax.Array,
    *,
    metrics: tuple[str, ...],
    ks: tuple[float, ...],
    width: int,
    parts: kernels.Parts | None = None,
) -> dict[str, jax.Array]:
    """Top-k of every pair: metric -> [Ka, K, len(ks)], from `kernels.metric_matrices`'s inputs.

    Jit-compatible with ``metrics``, ``ks`` and ``width`` static. Entry [a, b, i] is network
    ``b.rows[a]`` in terms of network b at fraction ``ks[i]``.

    Args:
        b: `kernels.Blocks` of all K networks, or a row block (Ka < K rows, sharded statistics).
        s: `kernels.Spectra` of all K networks (gathered when ``b`` is a row block, as in
            `sslsim_jax.sharded`); needed for linreg, svcca, pwcca, else None.
        isd: [K, P] `kernels.inv_sd` of every network.
        metrics: names among `TOPK_METRICS`.
        ks: fractions in (0, 1] (see `check_ks`).
        width: eigen-directions entering each CCA (static; as for `kernels.canonical_pairs`).
        parts: `kernels.pair_parts` of at least ``metrics``, when already computed (for the
            metrics themselves); else computed here.

    Returns:
        metric name -> [Ka, K, len(ks)] array.
    """
    if parts is None:
        parts = kernels.pair_parts(b, s, isd, metrics=metrics, width=width)
    out = {}
    own = b.valid[b.rows][:, None, :]  # [Ka, 1, P]: the row network's valid neurons
    if "maxcorr" in metrics:
        out["maxcorr"] = _top_means(jnp.swapaxes(parts.best, 1, 2), own, ks)
    if "linreg" in metrics:
        out["linreg"] = _top_means(jnp.swapaxes(parts.linreg, 1, 2), own, ks)
    if "svcca" in metrics or "pwcca" in metrics:
        sv, pw_ab, pw_ba = _top_cca(parts.cca, ks, "pwcca" in metrics)
        # A network against itself: every canonical correlation is 1, so every top-k is 1.
        one = jnp.where(s.kept[b.rows] > 0, 1.0, jnp.nan).astype(sv.dtype)  # [Ka]
        own_k = jnp.broadcast_to(one[:, None], (one.shape[0], len(ks)))
        out["svcca"] = kernels.pair_matrix(b, sv, sv, own_k)
        if "pwcca" in metrics:
            out["pwcca"] = kernels.pair_matrix(b, pw_ab, pw_ba, own_k)
    return {m: v for m, v in out.items() if m in metrics}


@functools.partial(
    jax.jit, static_argnames=("metrics", "ks", "width", "rtol", "variance", "variance_rule")
)
def _topk_moments(m, *, metrics, ks, width, rtol, variance, variance_rule):
    b = kernels.blocks(m)
    s = None
    if _SPECTRAL & set(metrics):
        s = kernels.spectra(b, rtol=rtol, variance=variance, variance_rule=variance_rule)
    out = topk_matrices(b, s, kernels.inv_sd(b), metrics=metrics, ks=ks, width=width)
    return out, b.count, b.valid, b.real, b.diag


def _check_options(variance: float, variance_rule: str) -> None:
    # Checked here as well as in `kernels.spectra`, so that maxcorr rejects them alike.
    if variance_rule not in kernels.VARIANCE_RULES:
        raise ValueError(
            f"expected variance_rule in {kernels.VARIANCE_RULES}, got {variance_rule!r}"
        )
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"expected variance in (0, 1], got {variance}")


def topk_from_moments(
    m: stats.Moments,
    metric: str,
    ks: Sequence[float] = DEFAULT_KS,
    *,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """`topk` from the joint statistics of (x, y) (``m.sizes == (Dx, Dy)``)."""
    (metric,) = check_metrics(metric)
    ks = check_ks(ks)
    _check_options(variance, variance_rule)
    kernels.check_two(m)
    out, *checks = _topk_moments(
        m,
        metrics=(metric,),
        ks=ks,
        width=max(m.sizes),
        rtol=rtol,
        variance=variance,
        variance_rule=variance_rule,
    )
    kernels.warn_degenerate(*checks, rank_sensitive=metric in _SPECTRAL)
    return out[metric][0, 1]


def topk(
    x: jax.Array,
    y: jax.Array,
    metric: str,
    ks: Sequence[float] = DEFAULT_KS,
    *,
    where: jax.Array | None = None,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> jax.Array:
    """Top-k similarity of x in terms of y: the metric's mean over its best fraction k.

    See the module docstring for the four definitions. ``ks`` must be static (a tuple of
    Python floats) under `jax.jit`.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        metric: "maxcorr", "linreg", "svcca" or "pwcca".
        ks: fractions k in (0, 1] (default 0.1, 0.2, …, 1.0).
        where: optional [N] boolean frame mask or frequency weights.
        variance, variance_rule, rtol: SVCCA/PWCCA/linreg options, as in
            `sslsim_jax.metrics.svcca` (ignored by maxcorr).

    Returns:
        [len(ks)] scores; at k = 1 the metric itself (``maxcorr(x, y).score``, ``linreg``,
        ``svcca``, ``pwcca``).
    """
    (metric,) = check_metrics(metric)
    x, y = kernels.check_pair(x, y)
    return topk_from_moments(
        kernels.joint_pair(x, y, where),
        metric,
        ks,
        variance=variance,
        variance_rule=variance_rule,
        rtol=rtol,
    )


def topk_all_from_moments(
    m: stats.Moments,
    *,
    metrics: Sequence[str] = TOPK_METRICS,
    ks: Sequence[float] = DEFAULT_KS,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Top-k of every ordered pair of K networks, from their joint statistics.

    The all-pairs counterpart of `topk_from_moments`: `sslsim_jax.pairwise.compare_moments`
    with ``topk`` (one ``eigh`` per network, one SVD per unordered pair).

    Args:
        m: joint `stats.Moments` of the K networks.
        metrics: names among `TOPK_METRICS`.
        ks: fractions in (0, 1].
        variance, variance_rule, rtol: as in `topk`.
        names: K network names for warnings.

    Returns:
        metric -> [K, K, len(ks)] NumPy array; [a, b, i] = topk(network a, network b)[i].
    """
    from sslsim_jax.pairwise import compare_moments  # pairwise builds on this module

    metrics = check_metrics(metrics)
    _check_options(variance, variance_rule)
    if names is None:
        names = [f"network {i}" for i in range(len(m.sizes))]
    out = compare_moments(
        m, names, metrics=(), topk=metrics, ks=ks, variance=variance,
        variance_rule=variance_rule, rtol=rtol,
    )  # fmt: skip
    return {metric: out[f"topk:{metric}"] for metric in metrics}
