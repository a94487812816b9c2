"""Neuron-level similarity: Pearson correlations, best-matching neurons, Wu et al. rankings.

Conventions: x: [N, Dx] and y: [N, Dy] hold the activations of the same N frames. Scores are
**x-centric**: they average over x's neurons how well each is matched in y, so
``maxcorr(x, y) != maxcorr(y, x)`` in general.

Numerical method: the correlations are the centred co-moment block scaled by the neurons'
standard deviations, all from `sslsim_jax.stats` (exact streaming statistics, float32 accurate
to about 1e-5 even for |mean| / std = 1e4). A **constant neuron** (standard deviation below
8 ulps of its scale, see `sslsim_jax.metrics.kernels`) has correlation 0 with everything: as an x
neuron it is excluded from the mean (``valid`` is False, ``matched`` is -1), as a y neuron it is
never matched; a `ConstantNeuronWarning` is issued once per call (outside `jax.jit`). If no x
neuron is valid the score is 0. Nothing is NaN for any N >= 1.

References:
    Bau, Belinkov, Sajjad, Durrani, Dalvi, Glass. Identifying and controlling important neurons
    in neural machine translation. ICLR 2019 (MaxCorr / MinCorr rankings).
    Wu, Belinkov, Sajjad, Durrani, Dalvi, Glass. Similarity analysis of contextual word
    representation models. ACL 2020 (neuronsim).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sslsim_jax import stats
from sslsim_jax.metrics import kernels

__all__ = [
    "NeuronMatch",
    "correlations",
    "maxcorr",
    "mincorr",
    "maxcorr_from_moments",
    "mincorr_from_moments",
    "neuron_ranking",
]


class NeuronMatch(NamedTuple):
    """Result of `maxcorr` / `mincorr`.

    Attributes:
        score: [] mean of ``best`` over valid x neurons.
        best: [Dx] per x neuron, max over y's neurons of |r| (with several other networks:
            the max, resp. min, of that over the networks).
        matched: [Dx] int32 index of the best y neuron (-1 for an invalid x neuron); with
            several other networks, [M, Dx], one row per network.
        valid: [Dx] bool, the x neuron is not constant.
    """

    score: jax.Array
    best: jax.Array
    matched: jax.Array
    valid: jax.Array


def correlations(x: jax.Array, y: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Pearson correlations of every x neuron with every y neuron.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        [Dx, Dy] correlations; 0 in the rows and columns of constant neurons.
    """
    x, y = kernels.check_pair(x, y)
    m = _joint([x, y], where)
    b = kernels.blocks(m)
    s = kernels.inv_sd(b)
    dx, dy = m.sizes
    return (b.comoment[0, :, 1, :] * s[0][:, None] * s[1][None, :])[:dx, :dy]


def _others(y) -> tuple[list[jax.Array], bool]:
    if isinstance(y, (list, tuple)):
        if not y:
            raise ValueError("expected at least one network in y")
        return list(y), True
    return [y], False


@functools.partial(jax.jit, static_argnames=("reduce", "several"))
def _neuron_match_impl(m: stats.Moments, reduce: str, several: bool):
    b = kernels.blocks(m)
    best, matched = kernels.neuron_best(b, kernels.inv_sd(b))
    dx = m.sizes[0]
    best = best[0, :dx, 1:]  # [Dx, M]
    matched = matched[0, :dx, 1:]
    valid = b.valid[0, :dx]
    # NaN marks an undefined match (a y network with no varying neuron): skipped when another
    # y network has an answer, NaN when none has.
    agg = jnp.nanmax(best, axis=1) if reduce == "max" else jnp.nanmin(best, axis=1)
    score = jnp.where(
        jnp.any(valid) & (b.count >= 2),
        jnp.sum(jnp.where(valid, agg, 0)) / jnp.maximum(jnp.sum(valid), 1),
        jnp.nan,
    )
    match = NeuronMatch(
        score=score, best=agg, matched=matched.T if several else matched[:, 0], valid=valid
    )
    return match, b.count, b.valid, b.real, b.diag


def _neuron_match(m: stats.Moments, reduce: str, several: bool) -> NeuronMatch:
    match, *checks = _neuron_match_impl(m, reduce, several)
    kernels.warn_degenerate(*checks, rank_sensitive=False)
    return match


_joint = jax.jit(lambda arrays, where: stats.joint_moments(arrays, where=where))


def maxcorr(
    x: jax.Array, y: jax.Array | Sequence[jax.Array], *, where: jax.Array | None = None
) -> NeuronMatch:
    """Neuron max-correlation (neuronsim) of x in terms of y.

    score = mean over x's valid neurons i of max_j |r(x_i, y_j)|. With a sequence of other
    networks ``[y_1, ..., y_M]``, ``best[i]`` is the max over the networks of that value: sorting
    x's neurons by it is the MaxCorr ranking of Bau et al. / Wu et al. (see `neuron_ranking`).

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames, or a sequence of such arrays.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        `NeuronMatch` (score, best, matched, valid). Direction: x-centric.
    """
    ys, several = _others(y)
    arrays = [kernels.check_pair(x, yy)[1] for yy in ys]
    m = _joint([jnp.asarray(x), *arrays], where)
    return _neuron_match(m, "max", several)


def mincorr(
    x: jax.Array, y: jax.Array | Sequence[jax.Array], *, where: jax.Array | None = None
) -> NeuronMatch:
    """Like `maxcorr`, but ``best[i]`` is the *min* over the other networks of the best |r|.

    With a single y this equals `maxcorr` (there is one network to take the min over); with
    ``y = [y_1, ..., y_M]`` sorting x's neurons by ``best`` is the MinCorr ranking of Bau et al.
    / Wu et al.: neurons whose best match is strong in *every* other network come first.

    Args:
        x: [N, Dx] activations.
        y: [N, Dy] activations of the same frames, or a sequence of such arrays.
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        `NeuronMatch`; ``matched`` holds the best neuron in each other network.
    """
    ys, several = _others(y)
    arrays = [kernels.check_pair(x, yy)[1] for yy in ys]
    m = _joint([jnp.asarray(x), *arrays], where)
    return _neuron_match(m, "min", several)


def maxcorr_from_moments(m: stats.Moments) -> NeuronMatch:
    """`maxcorr` from joint statistics: network 0 is x, networks 1.. are the others."""
    if len(m.sizes) < 2:
        raise ValueError(f"expected Moments of at least 2 networks, got sizes {m.sizes}")
    return _neuron_match(m, "max", len(m.sizes) > 2)


def mincorr_from_moments(m: stats.Moments) -> NeuronMatch:
    """`mincorr` from joint statistics: network 0 is x, networks 1.. are the others."""
    if len(m.sizes) < 2:
        raise ValueError(f"expected Moments of at least 2 networks, got sizes {m.sizes}")
    return _neuron_match(m, "min", len(m.sizes) > 2)


def neuron_ranking(best: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
    """Order of neurons by decreasing ``best`` (invalid neurons last).

    Args:
        best: [D] per-neuron value, e.g. ``maxcorr(x, others).best`` (MaxCorr ranking) or
            ``mincorr(x, others).best`` (MinCorr ranking).
        valid: optional [D] bool; invalid neurons go to the end.

    Returns:
        [D] int32 neuron indices, most important first (ties keep index order).
    """
    best = jnp.asarray(best)
    if best.ndim != 1:
        raise ValueError(f"expected best of shape [D], got {best.shape}")
    key = -best if valid is None else jnp.where(valid, -best, jnp.inf)
    return jnp.argsort(key, stable=True).astype(jnp.int32)
