"""Attention-head similarity: Frobenius, Pearson and Jensen–Shannon, streamed over utterances.

For one utterance with T valid frames a head's attention map A is [T, T]; each query row is a
distribution over keys. For heads h of one layer (or model) and g of another, computed on the
same utterances and frames, the similarity S[h, g] is

- ``"fro"``: 1 − mean over utterances of ‖A_h − B_g‖_F over the valid T×T block;
- ``"pearson"``: the Pearson r between the two query rows over the valid keys, summed over all
  valid query rows of all utterances and divided by the number of those rows (the true r);
- ``"js"``: 1 − the Jensen–Shannon divergence (natural log, 0·log 0 = 0) between the two query
  rows, averaged the same way.

The layer score of a in terms of b is the mean over a's heads of the best-matching head of b
(``layer_score``), x-centric like the neuron measures.

Every function takes a padded batch ``maps`` [U, H, T, T] (U utterances, H heads, T padded
frames) with ``lengths`` [U] valid frames. Padded queries and keys never enter a sum, whatever
they hold (even NaN). All heads of all layers are compared at once by folding layers into the
head axis, ``maps`` [U, L*H, T, T]; ``split_layers`` and ``layer_score`` undo the folding.

Statistics are sums and counts (``HeadSimilarityState``), so batches stream with
``update_state`` and devices merge with ``merge_states`` or ``jax.lax.psum``; the result does
not depend on how utterances were split. ``utterance_sums`` keeps each utterance's sums apart,
and ``add_utterances`` adds them with integer weights to R stacked states at once (bootstrap
replicates of a resampled corpus, for the cost of one computation).

Deliberate differences from the reference code of El Kheir et al.:

- Pearson is the true correlation coefficient. We do not reproduce the reference's scaling by
  (T − 1)/T, nor its variant that correlates every head against the first head only.
- Jensen–Shannon uses ``xlogy`` so zero probabilities give 0·log 0 = 0, never NaN.
- Utterances with T < 2 (Pearson undefined) or T = 0 (nothing to compare) are skipped and
  counted in ``HeadSimilarityState.skipped``.

Attention CKA / CCA treats heads as neurons and valid (query, key) cells as samples:
``attention_cells`` turns a padded batch into a [U*T*T, H] matrix with a validity weight per
row, and ``cell_moments`` / ``update_cell_moments`` stream those cells into
`sslsim_jax.stats.Moments`, on which every layer-level measure of `sslsim_jax.metrics` applies
(e.g. ``linear_cka_from_moments``).

References:
  El Kheir, Ali, Chowdhury, *Speech Representation Analysis based on Inter- and Intra-Model
  Similarities*, ICASSP 2024 XAISA workshop, arXiv:2406.16099.
  Wu et al., *Similarity Analysis of Contextual Word Representation Models*, ACL 2020.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslsim_jax import stats

__all__ = [
    "METHODS",
    "HeadSimilarityState",
    "add_utterances",
    "attention_cells",
    "cell_moments",
    "finalize",
    "frequency_weights",
    "head_similarity",
    "head_similarity_sums",
    "init_state",
    "js_block_shape",
    "layer_score",
    "merge_states",
    "split_layers",
    "update_cell_moments",
    "update_state",
    "utterance_sums",
]

Method = Literal["fro", "pearson", "js"]
METHODS: tuple[str, ...] = ("fro", "pearson", "js")

# Default bound on the elements one Jensen–Shannon step materialises: 2**22 float32 = 16 MiB.
DEFAULT_JS_BLOCK_ELEMENTS = 2**22


class HeadSimilarityState(NamedTuple):
    """Streaming sums for one head-similarity matrix; every field merges by addition.

    Attributes:
      total: [Ha, Hb] sum of per-item similarities: 1 − ‖A − B‖_F per utterance (``"fro"``),
        r per valid query row (``"pearson"``), 1 − JS per valid query row (``"js"``).
      count: [] int32 number of items summed: utterances (``"fro"``) or valid query rows.
      skipped: [] int32 utterances that contributed nothing: T < 2 for ``"pearson"``, T = 0
        otherwise.
    """

    total: jax.Array
    count: jax.Array
    skipped: jax.Array


def _check_maps(name: str, maps: jax.Array) -> None:
    shape = jnp.shape(maps)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"expected {name} of shape [U, H, T, T], got {tuple(shape)}")


def _check_inputs(
    maps_a: jax.Array, maps_b: jax.Array, lengths: jax.Array | None, method: str | None = None
) -> None:
    _check_maps("maps_a", maps_a)
    _check_maps("maps_b", maps_b)
    ua, _, ta, _ = jnp.shape(maps_a)
    ub, _, tb, _ = jnp.shape(maps_b)
    if (ua, ta) != (ub, tb):
        raise ValueError(
            "expected maps_a and maps_b with the same utterances U and frames T, got "
            f"{tuple(jnp.shape(maps_a))} and {tuple(jnp.shape(maps_b))}"
        )
    if lengths is not None and tuple(jnp.asarray(lengths).shape) != (ua,):
        raise ValueError(
            f"expected lengths of shape [U] = ({ua},), got {tuple(jnp.asarray(lengths).shape)}"
        )
    if method is not None and method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")


def _lengths(lengths: jax.Array | None, u: int, t: int) -> jax.Array:
    """Valid frames per utterance, [U] int32, clipped to [0, T]."""
    if lengths is None:
        return jnp.full((u,), t, jnp.int32)
    return jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, t)


def _compute_dtype(*maps: jax.Array) -> jnp.dtype:
    """At least float32: attention maps may arrive in bfloat16, statistics stay in float32."""
    return jnp.result_type(*[jnp.dtype(m.dtype) for m in maps], jnp.float32)


def _masked(maps: jax.Array, n: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Zeroes padded cells (``where``, so padded NaN cannot leak) and returns the cell mask."""
    t = maps.shape[-1]
    frame_ok = jnp.arange(t) < n[:, None]  # [U, T]
    cell_ok = frame_ok[:, None, :, None] & frame_ok[:, None, None, :]  # [U, 1, T, T]
    return jnp.where(cell_ok, maps.astype(dtype), 0), cell_ok


def _centre_rows(maps: jax.Array, cell_ok: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row means over the valid keys [U, H, T] and the row-centred, masked maps [U, H, T, T]."""
    mean = maps.sum(-1) / jnp.maximum(n, 1).astype(maps.dtype)[:, None, None]
    return mean, jnp.where(cell_ok, maps - mean[..., None], 0)


# The kernels (_fro_parts, _pearson_parts, _js_parts) return every utterance's sums apart
# (`utterance_sums`). They are jitted so that eager calls compile once per shape; under an
# outer jit they are inlined.
@functools.partial(jax.jit, static_argnames=("precision",))
def _fro_parts(
    maps_a: jax.Array, maps_b: jax.Array, n: jax.Array, precision: lax.PrecisionLike
) -> HeadSimilarityState:
    dtype = _compute_dtype(maps_a, maps_b)
    u, _, t, _ = maps_a.shape
    a, cell_ok = _masked(maps_a, n, dtype)
    b, _ = _masked(maps_b, n, dtype)
    mean_a, ca = _centre_rows(a, cell_ok, n)
    mean_b, cb = _centre_rows(b, cell_ok, n)
    # Centred rows sum to zero, so ‖A − B‖² = ‖Ac − Bc‖² + T Σ_q (μa_q − μb_q)²: both terms come
    # from Gram matrices, and centring shrinks the norms that cancel in ‖Ac‖² + ‖Bc‖² − 2⟨Ac, Bc⟩.
    ca = ca.reshape(u, ca.shape[1], t * t)  # [U, Ha, T, T] -> [U, Ha, T*T]
    cb = cb.reshape(u, cb.shape[1], t * t)  # [U, Hb, T, T] -> [U, Hb, T*T]
    cross = jnp.einsum("uhn,ugn->uhg", ca, cb, precision=precision)
    mean_cross = jnp.einsum("uhq,ugq->uhg", mean_a, mean_b, precision=precision)
    sq_a = (
        jnp.sum(ca * ca, -1)[:, :, None]
        + n[:, None, None] * jnp.sum(mean_a * mean_a, -1)[:, :, None]
    )
    sq_b = (
        jnp.sum(cb * cb, -1)[:, None, :]
        + n[:, None, None] * jnp.sum(mean_b * mean_b, -1)[:, None, :]
    )
    dist2 = sq_a + sq_b - 2 * (cross + n[:, None, None] * mean_cross)  # [U, Ha, Hb]
    # Rounding can push a zero distance slightly below zero; clamp so sqrt never gives NaN.
    dist = jnp.sqrt(jnp.maximum(dist2, 0))
    used = n >= 1
    return HeadSimilarityState(
        total=jnp.where(used[:, None, None], 1 - dist, 0),
        count=used.astype(jnp.int32),
        skipped=(~used).astype(jnp.int32),
    )


def _standardised_rows(maps: jax.Array, cell_ok: jax.Array, n: jax.Array) -> jax.Array:
    """Rows centred and scaled to unit norm over the valid keys; constant rows become zero."""
    _, centred = _centre_rows(maps, cell_ok, n)
    # Constant rows (exactly equal valid entries) have no correlation; detect them exactly
    # rather than through a centred norm that rounding leaves slightly above zero.
    hi = jnp.max(jnp.where(cell_ok, maps, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(cell_ok, maps, jnp.inf), axis=-1)
    norm = jnp.sqrt(jnp.sum(centred * centred, axis=-1))
    varies = (hi > lo) & (norm > 0)
    return jnp.where(varies[..., None], centred / jnp.where(varies, norm, 1)[..., None], 0)


@functools.partial(jax.jit, static_argnames=("precision",))
def _pearson_parts(
    maps_a: jax.Array, maps_b: jax.Array, n: jax.Array, precision: lax.PrecisionLike
) -> HeadSimilarityState:
    dtype = _compute_dtype(maps_a, maps_b)
    u, _, t, _ = maps_a.shape
    used = n >= 2
    # Skipped utterances have no valid cells at all, so they add nothing below.
    n_used = jnp.where(used, n, 0)
    a, cell_ok = _masked(maps_a, n_used, dtype)
    b, _ = _masked(maps_b, n_used, dtype)
    za = _standardised_rows(a, cell_ok, n_used)
    zb = _standardised_rows(b, cell_ok, n_used)
    # Σ over rows of r = Σ over rows and keys of za·zb: a Gram matrix per utterance.
    za = za.reshape(u, za.shape[1], t * t)  # [U, Ha, T, T] -> [U, Ha, T*T]
    zb = zb.reshape(u, zb.shape[1], t * t)  # [U, Hb, T, T] -> [U, Hb, T*T]
    return HeadSimilarityState(
        total=jnp.einsum("uhn,ugn->uhg", za, zb, precision=precision),
        count=n_used.astype(jnp.int32),
        skipped=(~used).astype(jnp.int32),
    )


def js_block_shape(
    heads_a: int,
    heads_b: int,
    frames: int,
    *,
    utterances: int = 1,
    block_elements: int = DEFAULT_JS_BLOCK_ELEMENTS,
) -> tuple[int, int, int]:
    """Block sizes (heads of a, heads of b, query rows) of one Jensen–Shannon step.

    One step compares ``ba`` heads of a with ``bb`` heads of b on ``rb`` query rows of every
    utterance of the batch, materialising at most
    ``utterances * ba * bb * rb * frames <= max(block_elements, utterances * frames)``
    elements. Blocks are as large as the budget allows and balanced so that the last block of
    heads is not mostly overlap.

    Args:
      heads_a: Ha.
      heads_b: Hb.
      frames: T, the padded frame count.
      utterances: U, the utterances of one batch (all are processed in every step).
      block_elements: the budget in elements (not bytes).

    Returns:
      ``(ba, bb, rb)``.
    """
    if min(heads_a, heads_b, frames, utterances, block_elements) < 1:
        raise ValueError(
            "expected positive heads_a, heads_b, frames, utterances and block_elements, got "
            f"{(heads_a, heads_b, frames, utterances, block_elements)}"
        )
    pair_rows = max(1, block_elements // (utterances * frames))  # (head pair, row) per step
    if heads_a * heads_b <= pair_rows:
        return heads_a, heads_b, min(frames, pair_rows // (heads_a * heads_b))
    bb = min(heads_b, pair_rows)
    ba = max(1, pair_rows // bb)
    ba = -(-heads_a // -(-heads_a // ba))  # balance: same number of blocks, evenly filled
    bb = -(-heads_b // -(-heads_b // bb))
    return ba, bb, 1


@functools.partial(jax.jit, static_argnames=("block_elements",))
def _js_parts(
    maps_a: jax.Array, maps_b: jax.Array, n: jax.Array, block_elements: int
) -> HeadSimilarityState:
    dtype = _compute_dtype(maps_a, maps_b)
    u, ha, t, _ = maps_a.shape
    hb = maps_b.shape[1]
    ba, bb, rb = js_block_shape(ha, hb, t, utterances=u, block_elements=block_elements)
    na, nb, nq = -(-ha // ba), -(-hb // bb), -(-t // rb)
    log2 = jnp.asarray(math.log(2.0), dtype)
    key_ok = jnp.arange(t) < n[:, None]  # [U, T]
    zero = jnp.int32(0)  # slice indices share one integer type, also under x64

    def row_terms(p: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sum(p, -1), jnp.sum(jax.scipy.special.xlogy(p, p), -1)

    def block(a0: jax.Array, b0: jax.Array, q0: jax.Array, own_row: jax.Array) -> jax.Array:
        # Utterances stay a batch axis (never sliced), so a batch sharded over U needs no
        # communication inside the loop.
        row_ok = own_row & (q0 + jnp.arange(rb) < n[:, None])  # [U, rb]
        cell_ok = (row_ok[:, :, None] & key_ok[:, None, :])[:, None]  # [U, 1, rb, T]
        p = lax.dynamic_slice(maps_a, (zero, a0, q0, zero), (u, ba, rb, t))  # [U, ba, rb, T]
        r = lax.dynamic_slice(maps_b, (zero, b0, q0, zero), (u, bb, rb, t))  # [U, bb, rb, T]
        p = jnp.where(cell_ok, p.astype(dtype), 0)
        r = jnp.where(cell_ok, r.astype(dtype), 0)
        sum_p, ent_p = row_terms(p)  # [U, ba, rb]
        sum_r, ent_r = row_terms(r)  # [U, bb, rb]
        s = p[:, :, None] + r[:, None, :]  # [U, ba, bb, rb, T]
        # JS = ½ Σ_k [p log p + r log r − s log(s/2)] with s = p + r: one log per pair element.
        # Padded rows are all zeros and give exactly 0.
        js = 0.5 * (
            ent_p[:, :, None]
            + ent_r[:, None, :]
            - jnp.sum(jax.scipy.special.xlogy(s, s), -1)
            + log2 * (sum_p[:, :, None] + sum_r[:, None, :])
        )  # [U, ba, bb, rb]
        return js.sum(-1)  # [U, ba, bb]

    def step(i: jax.Array, acc: jax.Array) -> jax.Array:
        # i enumerates (a block, b block, query block), query block fastest. The last block of
        # each axis is shifted back inside the array (no padded copies of the maps); what it
        # shares with the previous block is masked out, so nothing counts twice.
        i = i.astype(jnp.int32)  # int64 under x64; slice indices must share one type
        iq, rest = i % nq, i // nq
        ib, ia = rest % nb, rest // nb
        a0 = jnp.minimum(ia * ba, ha - ba)
        b0 = jnp.minimum(ib * bb, hb - bb)
        q0 = jnp.minimum(iq * rb, t - rb)
        own_row = q0 + jnp.arange(rb) >= iq * rb  # [rb]
        own_a = a0 + jnp.arange(ba) >= ia * ba  # [ba]
        own_b = b0 + jnp.arange(bb) >= ib * bb  # [bb]
        contrib = block(a0, b0, q0, own_row)
        contrib = jnp.where(own_a[:, None] & own_b[None, :], contrib, 0)
        old = lax.dynamic_slice(acc, (zero, a0, b0), (u, ba, bb))
        return lax.dynamic_update_slice(acc, old + contrib, (zero, a0, b0))

    # Per-utterance sums [U, Ha, Hb], reduced over utterances once at the end. zeros_like gives
    # the carry the sharding (jit) or device variance (shard_map) of the data without naming
    # any mesh axis here.
    acc = jnp.zeros((u, ha, hb), dtype)
    for x in (maps_a[:, :1, :1, 0], maps_b[:, :1, :1, 0], n[:, None, None]):  # [U, 1, 1]
        acc = acc + jnp.zeros_like(x, dtype=dtype)
    js_total = lax.fori_loop(0, na * nb * nq, step, acc)
    return HeadSimilarityState(
        total=n.astype(dtype)[:, None, None] - js_total,
        count=n.astype(jnp.int32),
        skipped=(n < 1).astype(jnp.int32),
    )


def head_similarity_sums(
    maps_a: jax.Array,
    maps_b: jax.Array,
    lengths: jax.Array | None = None,
    method: Method = "fro",
    *,
    precision: lax.PrecisionLike | None = None,
    block_elements: int = DEFAULT_JS_BLOCK_ELEMENTS,
) -> HeadSimilarityState:
    """Similarity sums of every head pair over one padded batch of utterances.

    Methods (T valid frames of an utterance, rows and keys restricted to them):

    - ``"fro"``: per utterance ‖A − B‖² = ‖Ac − Bc‖² + T Σ_q (μa_q − μb_q)², with Ac the
      row-centred map and μ the row means; both terms are Gram matrices of the flattened maps,
      one batched matmul [U, Ha, T²] × [U, T², Hb]. Cancellation in the Gram identity limits
      how well a distance near zero is resolved: in float32 an exact zero comes back as up to
      ≈ 10 √ε ‖Ac‖ (ε = 2⁻²³; measured ≈ 3e-3 for peaked maps with T = 40, where typical
      distances between different heads are ≈ 4). Pass float64 maps under ``jax.enable_x64``
      to resolve near-identical heads; distances of the size of real head differences are
      accurate to ~1e-5.
    - ``"pearson"``: rows centred and scaled to unit norm over the valid keys, so the sum of
      row correlations over an utterance is a Gram matrix of the flattened maps (one batched
      matmul). A constant row (all valid entries equal, e.g. a uniform softmax) has no defined
      r; it contributes r = 0 and still counts as a row.
    - ``"js"``: JS(p, r) = ½ Σ_k [p log p + r log r − s log(s/2)], s = p + r, elementwise with
      ``xlogy``, accumulated by a ``fori_loop`` over blocks of (heads of a, heads of b, query
      rows), each block taken from all U utterances; block sizes from ``js_block_shape``.
      Peak memory bound: beyond the inputs and the [U, Ha, Hb] per-utterance sums, one step
      materialises at most ``max(block_elements, U·T)`` elements, so the temporaries are a few
      such buffers whatever T and the head counts (never [U, Ha, Hb, T, T]). Values are
      computed as given; rows are expected to be distributions.

    Utterances stay a batch axis in every method (no slicing or contraction across U before
    the final sum), so a batch sharded over U under ``jax.jit`` needs one reduction at the end.

    Args:
      maps_a: [U, Ha, T, T] attention maps (query, key) of the first layer(s); any float dtype,
        computed in at least float32.
      maps_b: [U, Hb, T, T] attention maps of the second layer(s), same utterances and frames.
      lengths: [U] valid frames per utterance (clipped to [0, T]); None means all T valid.
      method: ``"fro"``, ``"pearson"`` or ``"js"``.
      precision: matmul precision of the Gram matrices; None: ``stats.matmul_precision()``
        ("highest" unless set with ``jax.default_matmul_precision``). Float32 maps on GPU or
        TPU need "highest" for the accuracy stated above.
      block_elements: element budget of one Jensen–Shannon step (``"js"`` only).

    Returns:
      ``HeadSimilarityState`` with ``total`` [Ha, Hb], ``count`` and ``skipped``.
    """
    parts = utterance_sums(
        maps_a, maps_b, lengths, method, precision=precision, block_elements=block_elements
    )
    return add_utterances(
        init_state(maps_a.shape[1], maps_b.shape[1], dtype=parts.total.dtype), parts
    )


def utterance_sums(
    maps_a: jax.Array,
    maps_b: jax.Array,
    lengths: jax.Array | None = None,
    method: Method = "fro",
    *,
    precision: lax.PrecisionLike | None = None,
    block_elements: int = DEFAULT_JS_BLOCK_ELEMENTS,
) -> HeadSimilarityState:
    """`head_similarity_sums` of each utterance apart: ``total`` [U, Ha, Hb], ``count`` [U]
    and ``skipped`` [U] (0 or 1). Their sums over U are `head_similarity_sums`; weighted sums
    (`add_utterances` with weights) are those of a resampled corpus, e.g. a bootstrap
    replicate. Arguments as in `head_similarity_sums`."""
    _check_inputs(maps_a, maps_b, lengths, method)
    u, _, t, _ = jnp.shape(maps_a)
    n = _lengths(lengths, u, t)
    if t == 0:  # no frames at all: every utterance is skipped
        return HeadSimilarityState(
            total=jnp.zeros((u, maps_a.shape[1], maps_b.shape[1]), _compute_dtype(maps_a, maps_b)),
            count=jnp.zeros((u,), jnp.int32),
            skipped=jnp.ones((u,), jnp.int32),
        )
    if precision is None:
        precision = stats.matmul_precision()
    if method == "fro":
        return _fro_parts(maps_a, maps_b, n, precision)
    if method == "pearson":
        return _pearson_parts(maps_a, maps_b, n, precision)
    return _js_parts(maps_a, maps_b, n, block_elements)


def init_state(
    heads_a: int, heads_b: int, *, dtype: jnp.dtype = jnp.float32, replicates: int | None = None
) -> HeadSimilarityState:
    """An empty ``HeadSimilarityState`` for Ha × Hb head pairs; with ``replicates`` R, R of them
    stacked (``total`` [R, Ha, Hb], ``count`` [R]; ``skipped`` stays one count), for
    `add_utterances` with weights."""
    lead = () if replicates is None else (int(replicates),)
    return HeadSimilarityState(
        total=jnp.zeros((*lead, heads_a, heads_b), dtype),
        count=jnp.zeros(lead, jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def add_utterances(
    state: HeadSimilarityState, parts: HeadSimilarityState, weights: jax.Array | None = None
) -> HeadSimilarityState:
    """Adds per-utterance sums (`utterance_sums`) to ``state``.

    Args:
      state: [Ha, Hb] sums, or with ``weights`` R stacked ones (`init_state` with replicates).
      parts: `utterance_sums` of U utterances.
      weights: None, or [R, U] integer frequency weights (utterance u counted w[r, u] times in
        state r, e.g. Poisson bootstrap draws). ``skipped`` counts each skipped utterance once,
        whatever its weights.

    Returns:
      The merged state.
    """
    if weights is None:
        sums = jax.tree.map(lambda a: a.sum(0), parts)
        return merge_states(state, sums)
    w = frequency_weights(weights, R=None, U=parts.count.shape[0])
    total = jnp.einsum(
        "ru,uhg->rhg", w.astype(parts.total.dtype), parts.total, precision=stats.matmul_precision()
    )
    count = jnp.sum(w.astype(jnp.int32) * parts.count[None, :], axis=1)
    return merge_states(state, HeadSimilarityState(total, count, parts.skipped.sum()))


def frequency_weights(weights: jax.Array, **shape: int | None) -> jax.Array:
    """``weights`` as an array, checked to be integers of ``shape`` (axis name: size, None for
    any size); the error names the expected shape, e.g. ``[R, U=5]``."""
    w = jnp.asarray(weights)
    sizes = tuple(shape.values())
    if (
        not jnp.issubdtype(w.dtype, jnp.integer)
        or w.ndim != len(sizes)
        or any(n is not None and n != m for n, m in zip(sizes, w.shape, strict=True))
    ):
        expected = ", ".join(k if n is None else f"{k}={n}" for k, n in shape.items())
        raise ValueError(
            f"expected integer weights of shape [{expected}], got {w.dtype} {tuple(w.shape)}"
        )
    return w


def merge_states(a: HeadSimilarityState, b: HeadSimilarityState) -> HeadSimilarityState:
    """Merges two states (sums add); ``jax.lax.psum(state, axis)`` does the same across devices."""
    return HeadSimilarityState(
        total=a.total + b.total.astype(a.total.dtype),
        count=a.count + b.count,
        skipped=a.skipped + b.skipped,
    )


def update_state(
    state: HeadSimilarityState,
    maps_a: jax.Array,
    maps_b: jax.Array,
    lengths: jax.Array | None = None,
    method: Method = "fro",
    *,
    precision: lax.PrecisionLike | None = None,
    block_elements: int = DEFAULT_JS_BLOCK_ELEMENTS,
) -> HeadSimilarityState:
    """Adds one padded batch to ``state``; see ``head_similarity_sums`` for the arguments.

    Use the same ``method`` for every batch of one state.
    """
    _check_inputs(maps_a, maps_b, lengths, method)
    if tuple(state.total.shape) != (maps_a.shape[1], maps_b.shape[1]):
        raise ValueError(
            f"expected state.total of shape [Ha, Hb] = {(maps_a.shape[1], maps_b.shape[1])}, "
            f"got {tuple(state.total.shape)}"
        )
    sums = head_similarity_sums(
        maps_a, maps_b, lengths, method, precision=precision, block_elements=block_elements
    )
    return merge_states(state, sums)


def finalize(state: HeadSimilarityState) -> jax.Array:
    """S = total / count, [Ha, Hb] (or [R, Ha, Hb] for stacked states); all zeros (never NaN)
    while a state's ``count`` is 0."""
    count = state.count.astype(state.total.dtype)[..., None, None]
    return jnp.where(count > 0, state.total / jnp.maximum(count, 1), 0)


def head_similarity(
    maps_a: jax.Array,
    maps_b: jax.Array,
    lengths: jax.Array | None = None,
    method: Method = "fro",
    *,
    precision: lax.PrecisionLike | None = None,
    block_elements: int = DEFAULT_JS_BLOCK_ELEMENTS,
) -> jax.Array:
    """Similarity S [Ha, Hb] of every head of ``maps_a`` with every head of ``maps_b``.

    Equal to ``finalize(head_similarity_sums(...))``; see ``head_similarity_sums`` for the
    methods, their numerics and the memory bound of ``"js"``. Pure and jit-able with ``method``
    and ``block_elements`` static. To compare all layers at once, fold layers into heads
    (``maps.reshape(U, L * H, T, T)`` from [U, L, H, T, T]) and split the result with
    ``split_layers``.

    Args:
      maps_a: [U, Ha, T, T] attention maps of the first layer(s).
      maps_b: [U, Hb, T, T] attention maps of the second layer(s), same utterances and frames.
      lengths: [U] valid frames per utterance; None means all T valid.
      method: ``"fro"``, ``"pearson"`` or ``"js"``.
      precision: matmul precision of the Gram matrices.
      block_elements: element budget of one Jensen–Shannon step.

    Returns:
      [Ha, Hb] similarities; 1 means identical maps for every method, higher is more similar.
      All zeros when no utterance counted (e.g. only T < 2 for ``"pearson"``).
    """
    return finalize(
        head_similarity_sums(
            maps_a, maps_b, lengths, method, precision=precision, block_elements=block_elements
        )
    )


def split_layers(s: jax.Array, layers_a: int, layers_b: int) -> jax.Array:
    """[La*Ha, Lb*Hb] similarities of layer-folded heads -> [La, Lb, Ha, Hb] per layer pair."""
    if s.ndim != 2 or s.shape[0] % layers_a or s.shape[1] % layers_b:
        raise ValueError(
            f"expected s of shape [La*Ha, Lb*Hb] with La = {layers_a}, Lb = {layers_b}, "
            f"got {tuple(s.shape)}"
        )
    ha, hb = s.shape[0] // layers_a, s.shape[1] // layers_b
    s = s.reshape(layers_a, ha, layers_b, hb)  # [La*Ha, Lb*Hb] -> [La, Ha, Lb, Hb]
    return s.transpose(0, 2, 1, 3)


def layer_score(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Layer score of a in terms of b: mean over a's heads of the best head of b.

    Args:
      s: [..., Ha, Hb] head similarities (e.g. [La, Lb, Ha, Hb] from ``split_layers``).

    Returns:
      ``(score, matched)``: score [...] = mean_h max_g s[..., h, g], and matched [..., Ha]
      int32, the index g of the best head of b for every head of a.
    """
    if s.ndim < 2:
        raise ValueError(f"expected s of shape [..., Ha, Hb], got {tuple(s.shape)}")
    return jnp.mean(jnp.max(s, axis=-1), axis=-1), jnp.argmax(s, axis=-1).astype(jnp.int32)


def attention_cells(
    maps: jax.Array, lengths: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Heads as neurons, valid (query, key) cells as samples, for attention CKA / CCA.

    Static shapes: every padded cell stays as a row with weight 0 (and value 0), so the layer
    statistics can consume the result as ``x`` with a sample mask.

    Args:
      maps: [U, H, T, T] attention maps.
      lengths: [U] valid frames per utterance; None means all T valid.

    Returns:
      ``(cells, weights)``: cells [U*T*T, H] (dtype at least float32) and weights [U*T*T],
      1 for a valid cell and 0 for a padded one; Σ weights = Σ_u T_u².
    """
    _check_maps("maps", maps)
    u, h, t, _ = maps.shape
    if lengths is not None and tuple(jnp.asarray(lengths).shape) != (u,):
        raise ValueError(
            f"expected lengths of shape [U] = ({u},), got {tuple(jnp.asarray(lengths).shape)}"
        )
    n = _lengths(lengths, u, t)
    masked, cell_ok = _masked(maps, n, _compute_dtype(maps))
    cells = masked.transpose(0, 2, 3, 1).reshape(u * t * t, h)  # [U, H, T, T] -> [U*T*T, H]
    weights = cell_ok.reshape(u * t * t).astype(cells.dtype)  # [U, 1, T, T] -> [U*T*T]
    return cells, weights


def cell_moments(maps: Sequence[jax.Array], lengths: jax.Array | None = None) -> stats.Moments:
    """Joint statistics of K layers' attention cells over one padded batch.

    Heads are the neurons and valid (query, key) cells the samples (Σ_u T_u² of them); padded
    cells get weight 0. Network k of the result is ``maps[k]``; pass two layers (or
    ``stats.select`` two of many) to a ``*_from_moments`` measure, e.g.
    ``linear_cka_from_moments(cell_moments([maps_a, maps_b], lengths))``.

    Args:
      maps: K arrays [U, H_k, T, T] of attention maps of the same utterances and frames.
      lengths: [U] valid frames per utterance; None means all T valid.

    Returns:
      `stats.Moments` with ``sizes = (H_1, ..., H_K)`` and count Σ_u T_u².
    """
    if not maps:
        raise ValueError("expected at least one array of maps")
    for k, m in enumerate(maps):
        _check_maps(f"maps[{k}]", m)
        if m.shape[0] != maps[0].shape[0] or m.shape[2] != maps[0].shape[2]:
            raise ValueError(
                f"expected maps[{k}] with the same utterances U and frames T as maps[0], "
                f"got {tuple(m.shape)} and {tuple(maps[0].shape)}"
            )
    pairs = [attention_cells(m, lengths) for m in maps]
    cells = jnp.concatenate([c for c, _ in pairs], axis=1)  # K × [U*T*T, H_k] -> [U*T*T, ΣH]
    return stats.moments(cells, where=pairs[0][1], sizes=[m.shape[1] for m in maps])


def update_cell_moments(
    m: stats.Moments, maps: Sequence[jax.Array], lengths: jax.Array | None = None
) -> stats.Moments:
    """Adds one padded batch of attention cells to ``m`` (see ``cell_moments``)."""
    return stats.merge(m, cell_moments(maps, lengths))
