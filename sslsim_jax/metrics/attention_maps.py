"""Attention layers as networks: layer-level measures (CKA, SVCCA, …) of attention maps.

For ``attention_linear_cka`` / ``attention_svcca`` a layer's heads are the neurons and the valid
(query, key) cells of every utterance are the samples: layer l of a model with H heads is a
network of width H observed on Σ_u T_u² cells. The pipeline's attention stream already folds
layers into the head axis (maps [B, L*H, T, T], layer-major, see `sslsim_jax.metrics.attention`),
so one batch of several models' maps becomes one row block z [B*T*T, Σ_k L_k H_k] with a cell
mask, and `stats.update` adds it to joint `stats.Moments` whose networks are the layers
(``sizes = (H_1,)*L_1 + (H_2,)*L_2 + …``). `sslsim_jax.pairwise.compare_moments` on those
statistics then gives every layer × layer matrix, intra- and inter-model, of every
moment-based measure.

The cell layout comes from `sslsim_jax.metrics.attention.attention_cells` (padded cells are
rows of weight 0 and value 0, so padding, even NaN, never enters a sum); this module only
folds several models and streams them. Memory: the rows are [B*T*T, Σ L_k H_k] floats, e.g.
4 utterances of 10 s (T = 500) of two base models (2 × 144 heads) is 1.15 GB in float32 — size
batches for it.

References:
    El Kheir, Ali, Chowdhury. Speech representation analysis based on inter- and intra-model
    similarities. ICASSP 2024 XAISA workshop (arXiv 2406.16099): attention-level similarity.
    Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
    ICML 2019 (CKA).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sslsim_jax import stats
from sslsim_jax.metrics.attention import attention_cells, frequency_weights

__all__ = ["cell_rows", "init", "layer_sizes", "update", "update_weighted"]


def layer_sizes(layers: Sequence[int], heads: Sequence[int]) -> tuple[int, ...]:
    """Network widths when every layer of every model is a network of its heads.

    Args:
        layers: L_k, attention layers of each model.
        heads: H_k, heads per layer of each model.

    Returns:
        ``(H_1,) * L_1 + (H_2,) * L_2 + …``: Σ_k L_k networks.
    """
    if len(layers) != len(heads) or not layers:
        raise ValueError(
            f"expected layers and heads with one entry per model, got {layers} and {heads}"
        )
    if any(int(x) < 1 for x in (*layers, *heads)):
        raise ValueError(f"expected positive layers and heads, got {layers} and {heads}")
    return tuple(int(h) for l_k, h in zip(layers, heads, strict=True) for _ in range(int(l_k)))


def init(
    layers: Sequence[int], heads: Sequence[int], dtype=jnp.float32, replicates: int | None = None
) -> stats.Moments:
    """Empty joint statistics of every attention layer of the models (see `layer_sizes`); with
    ``replicates`` R, R of them stacked (every field [R, ...]), for `update_weighted`."""
    m = stats.init(layer_sizes(layers, heads), dtype)
    if replicates is None:
        return m
    return jax.tree.map(lambda a: jnp.zeros((int(replicates), *a.shape), a.dtype), m)


def cell_rows(
    maps: Sequence[jax.Array], lengths: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """One batch of several models' folded attention maps as sample rows.

    Args:
        maps: one array per model, [B, L_k*H_k, T, T] (layers folded into the head axis,
            layer-major: column l*H_k + h is head h of layer l), the same B utterances and T
            padded frames for every model.
        lengths: [B] valid frames per utterance; None means all T valid.

    Returns:
        ``(z, w)``: z [B*T*T, Σ_k L_k H_k], models side by side in the order of ``maps``;
        w [B*T*T] 1 for a valid (query, key) cell, 0 for a padded one.
    """
    if not maps:
        raise ValueError("expected at least one array of maps")
    first = jnp.shape(maps[0])
    for k, m in enumerate(maps):
        shape = jnp.shape(m)
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"expected maps[{k}] of shape [B, L*H, T, T], got {tuple(shape)}")
        if shape[0] != first[0] or shape[2] != first[2]:
            raise ValueError(
                f"expected maps[{k}] with the same utterances B and frames T as maps[0], "
                f"got {tuple(shape)} and {tuple(first)}"
            )
    rows = [attention_cells(m, lengths) for m in maps]  # K × ([B*T*T, L_k*H_k], [B*T*T])
    z = jnp.concatenate([c for c, _ in rows], axis=1)  # -> [B*T*T, Σ L_k H_k]
    return z, rows[0][1]


def update(
    m: stats.Moments, maps: Sequence[jax.Array], lengths: jax.Array | None = None
) -> stats.Moments:
    """Add one batch of attention maps to the layer statistics m (a pure, jit-able step).

    Args:
        m: statistics from `init` (``m.sizes`` = `layer_sizes` of the models).
        maps: as in `cell_rows`.
        lengths: [B] valid frames per utterance; None means all T valid.

    Returns:
        The updated `stats.Moments`; merging is exact, so the split into batches does not
        matter.
    """
    z, w = _checked_rows(m, maps, lengths)
    return stats.update(m, z, where=w)


def _checked_rows(
    m: stats.Moments, maps: Sequence[jax.Array], lengths: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """`cell_rows`, checked against the networks of ``m``."""
    z, w = cell_rows(maps, lengths)
    if z.shape[1] != sum(m.sizes):
        raise ValueError(
            f"expected maps with Σ L_k H_k = {sum(m.sizes)} heads in all (m.sizes), "
            f"got {z.shape[1]}"
        )
    return z, w


def _weighted_union(parts: stats.Moments, copies: jax.Array) -> stats.Moments:
    """The statistics of the frames of U parts (each field [U, ...]), part u taken ``copies[u]``
    times: every part re-centred on the union's mean (`stats._shift`, exact identities), then
    the sums added with their weights. Vectorised over the parts (no loop, so no collective
    inside a loop when the parts are split over devices)."""
    c = copies.astype(parts.count.dtype)
    count = jnp.sum(c * parts.count)
    safe = jnp.where(count > 0, count, 1)
    mean = jnp.einsum("u,ud->d", c * parts.count, parts.mean) / safe
    shifted = jax.vmap(lambda p: stats._shift(p, mean - p.mean))(parts)

    def total(a: jax.Array) -> jax.Array:
        return jnp.tensordot(c, a, axes=1)

    return shifted.replace(
        count=count,
        mean=mean,
        comoment=total(shifted.comoment),
        row_cross=total(shifted.row_cross),
        row_gram=total(shifted.row_gram),
    )


def update_weighted(
    m: stats.Moments,
    maps: Sequence[jax.Array],
    lengths: jax.Array | None,
    weights: jax.Array,
) -> stats.Moments:
    """`update` of R stacked statistics, utterance b counted ``weights[r, b]`` times in
    statistics r (integer frequency weights, e.g. Poisson bootstrap draws; row 0 all ones
    gives the full data's statistics beside the replicates).

    Each utterance's cell statistics are computed once ([B] `stats.moments`, the same flops as
    one `update`); each replicate then takes their weighted union (B re-centrings of
    [ΣLH]² sums) and merges it (`stats.merge`).

    Args:
        m: R stacked statistics (`init` with ``replicates``).
        maps, lengths: as in `cell_rows`.
        weights: [R, B] non-negative integers.

    Returns:
        The updated stacked statistics.
    """
    z, w = _checked_rows(m, maps, lengths)
    batch = jnp.shape(maps[0])[0]
    weights = frequency_weights(weights, R=m.count.shape[0], B=batch)
    # [B*T*T, ΣLH] -> [B, T*T, ΣLH]: each utterance's cells apart
    parts = jax.vmap(lambda zb, wb: stats.moments(zb, where=wb, sizes=m.sizes))(
        z.reshape(batch, -1, z.shape[1]), w.reshape(batch, -1)
    )
    return jax.vmap(lambda m_r, w_r: stats.merge(m_r, _weighted_union(parts, w_r)))(m, weights)
