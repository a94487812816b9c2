"""Exact streaming second-moment statistics of one or several networks.

A `Moments` holds, for the K networks whose activations sit side by side in Z: [N, D] (network k
owns the columns ``offsets[k]:offsets[k] + sizes[k]``, D = sum of sizes):

- ``count``: Σ_i w_i, the (weighted) number of frames;
- ``mean``: [D], the weighted mean μ;
- ``comoment``: [D, D], Σ_i w_i (z_i − μ)(z_i − μ)ᵀ (not divided by the count);
- ``row_cross``: [D, K], Σ_i w_i (z_i − μ) r_ikᵀ and ``row_gram``: [K, K], Σ_i w_i r_ik r_il, where
  r_ik = ‖z_i,k − μ_k‖² is the squared norm of frame i's centred activations in network k. These
  are the extra accumulators of the unbiased HSIC (debiased CKA): Zᵀ R and Rᵀ R of DESIGN.md,
  kept centred so that large means do not cancel catastrophically.

Every metric of `sslsim_jax.metrics` is a function of these.

Numerical method: each batch is centred on its own weighted mean (computed in two passes, so a
mean of 1e4 over a spread of 1 loses nothing in float32), and two sets of moments merge with the
pairwise update of Chan, Golub and LeVeque (1979), extended to the row-norm accumulators: both
sides are re-centred on the merged mean with exact polynomial identities, then added. The merge
is associative up to rounding, so batches may be merged in any order and `psum` over a mesh axis
gives the one-pass result. Inputs of any float dtype (bfloat16 included) are promoted to at least
float32 before centring. Matmuls use `matmul_precision`: ``"highest"`` (exact float32: no TF32
or single bf16 passes on accelerators) unless the caller chose otherwise with
``jax.default_matmul_precision``.

Weights are frequency weights: a frame with weight 2 counts as the frame seen twice; a boolean
mask is the weights 0/1. Padded frames must have weight 0.

Use for any [N, D] matrix — e.g. attention cells as samples and heads as neurons::

    m = stats.moments(x)                                      # one network, x: [N, H]
    m = stats.moments(x, where=mask)                          # mask: [N] bool or float weights
    m = stats.moments(jnp.concatenate([x, y], 1), sizes=(Dx, Dy))   # two networks, jointly
    m = stats.update(m, x_next, where=mask_next)              # stream more frames
    m = stats.psum(m, "data")                                 # inside shard_map / pmapped code
    cov = stats.covariance(m)                                 # [D, D]
    sub = stats.select(m, (0, 1))                             # networks 0 and 1 of many

References:
    Chan, Golub, LeVeque. Updating formulae and a pairwise algorithm for computing sample
    variances. COMPSTAT 1982 (Stanford tech. report STAN-CS-79-773, 1979).
    Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence maximization.
    JMLR 13, 2012 (unbiased HSIC).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "Moments",
    "matmul_precision",
    "init",
    "moments",
    "joint_moments",
    "update",
    "mirror_upper",
    "update_replicates",
    "replicate_chunk",
    "map_replicates",
    "merge",
    "psum",
    "select",
    "covariance",
    "segment_ids",
]


def matmul_precision() -> jax.lax.Precision | None:
    """The precision of the matmuls in metric code, read when a function is traced.

    ``Precision.HIGHEST`` (exact float32 on every backend) by default. Inside
    ``with jax.default_matmul_precision(p):`` it is None, so every matmul follows ``p``
    (e.g. ``"tensorfloat32"`` on GPU or ``"bfloat16"`` on TPU: faster, about 3 significant
    digits). ``jax.jit`` keys its cache on that setting, so a compiled function never mixes the
    two. See README "Precision" for what each setting changes.
    """
    if jax.config.jax_default_matmul_precision is None:
        return jax.lax.Precision.HIGHEST
    return None


@struct.dataclass
class Moments:
    """Streaming statistics of K networks over the same frames (see module docstring).

    Attributes:
        count: [] weighted frame count Σ w.
        mean: [D] weighted mean.
        comoment: [D, D] centred co-moment Σ w (z − μ)(z − μ)ᵀ.
        row_cross: [D, K] Σ w (z − μ) r_kᵀ with r_k the centred squared row norm of network k.
        row_gram: [K, K] Σ w r_k r_l.
        sizes: static tuple of the K network widths (sum D).
    """

    count: jax.Array
    mean: jax.Array
    comoment: jax.Array
    row_cross: jax.Array
    row_gram: jax.Array
    sizes: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start column of each network."""
        return tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))


def segment_ids(sizes: Sequence[int]) -> np.ndarray:
    """[D] index of the network that owns each column."""
    return np.repeat(np.arange(len(sizes)), sizes)


def _accum_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _check_sizes(sizes: Sequence[int] | None, d: int) -> tuple[int, ...]:
    if sizes is None:
        return (d,)
    sizes = tuple(int(s) for s in sizes)
    if any(s <= 0 for s in sizes) or sum(sizes) != d:
        raise ValueError(f"expected positive sizes summing to D={d}, got {sizes}")
    return sizes


def frame_weights(where: jax.Array | None, n: int, dtype) -> jax.Array:
    """[N] frame weights of ``dtype`` from an optional [N] mask or weights (default all 1)."""
    if where is None:
        return jnp.ones((n,), dtype)
    where = jnp.asarray(where)
    if where.shape != (n,):
        raise ValueError(f"expected where of shape [N] = ({n},), got {where.shape}")
    return where.astype(dtype)


def init(sizes: Sequence[int], dtype=jnp.float32, *, zeros=jnp.zeros) -> Moments:
    """Empty statistics (count 0) for networks of the given widths; ``zeros=np.zeros`` makes
    them host arrays (`sslsim_jax.host_stats`)."""
    sizes = tuple(int(s) for s in sizes)
    d, k = sum(sizes), len(sizes)
    z = zeros
    return Moments(
        count=z((), dtype),
        mean=z((d,), dtype),
        comoment=z((d, d), dtype),
        row_cross=z((d, k), dtype),
        row_gram=z((k, k), dtype),
        sizes=sizes,
    )


def moments(
    z: jax.Array, *, where: jax.Array | None = None, sizes: Sequence[int] | None = None
) -> Moments:
    """Statistics of one batch of frames.

    Args:
        z: [N, D] activations; several networks side by side when ``sizes`` is given.
        where: optional [N] boolean frame mask or non-negative frequency weights.
        sizes: widths of the networks in z (default: one network of width D).

    Returns:
        The batch's `Moments`. Only the upper blocks of the symmetric co-moment are multiplied
        (one matmul per network against the networks after it), the rest is mirrored.
    """
    z = jnp.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"expected z of shape [N, D], got {z.shape}")
    sizes = _check_sizes(sizes, z.shape[1])
    dtype = _accum_dtype(z.dtype)
    z = z.astype(dtype)
    w = frame_weights(where, z.shape[0], dtype)
    n, mean, zc, zw = centre(z, w)
    d = z.shape[1]
    comoment = _add_upper_gram(jnp.zeros((d, d), dtype), zw, zc, sizes)
    r = row_norms(zc, sizes)  # [N, K]
    row_cross = jnp.einsum("nd,nk->dk", zw, r, precision=matmul_precision())
    row_gram = jnp.einsum("n,nk,nl->kl", w, r, r, precision=matmul_precision())
    return Moments(
        count=n,
        mean=jnp.where(n > 0, mean, 0),
        comoment=comoment,
        row_cross=row_cross,
        row_gram=row_gram,
        sizes=sizes,
    )


def _identity(x):
    return x


def centre(
    z: jax.Array, w: jax.Array, reduce=_identity
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(count, mean, z − mean, (z − mean)·w) of weighted frames z: [N, D], w: [N].

    Two passes: the second corrects the rounding of the first when |mean| >> spread.
    ``reduce`` sums over the frames of other devices (``lax.psum`` over a mesh axis).
    """
    prec = matmul_precision()
    n = reduce(jnp.sum(w))
    safe_n = jnp.where(n > 0, n, 1)
    mean0 = reduce(jnp.einsum("n,nd->d", w, z, precision=prec)) / safe_n
    mean = mean0 + reduce(jnp.einsum("n,nd->d", w, z - mean0, precision=prec)) / safe_n
    zc = z - mean
    return n, mean, zc, zc * w[:, None]


def row_norms(zc: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """[N, K] r_ik = ‖z_i,k − μ_k‖², each frame's centred squared norm in each network."""
    onehot = jax.nn.one_hot(jnp.asarray(segment_ids(sizes)), len(sizes), dtype=zc.dtype)
    return jnp.einsum("nd,dk->nk", zc * zc, onehot, precision=matmul_precision())


def joint_moments(networks: Sequence[jax.Array], *, where: jax.Array | None = None) -> Moments:
    """Joint statistics of several networks' activations of the same frames.

    Args:
        networks: K arrays [N, D_k].
        where: optional [N] boolean frame mask or frequency weights.

    Returns:
        `Moments` with ``sizes = (D_1, ..., D_K)``.
    """
    arrays = [jnp.asarray(x) for x in networks]
    if not arrays:
        raise ValueError("expected at least one network")
    n = arrays[0].shape[0] if arrays[0].ndim == 2 else None
    for i, x in enumerate(arrays):
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"expected networks[{i}] of shape [N, D] with N={n}, got {x.shape}")
    dtype = jnp.result_type(*arrays)
    z = jnp.concatenate([x.astype(dtype) for x in arrays], axis=1)  # [N, sum D_k]
    return moments(z, where=where, sizes=[x.shape[1] for x in arrays])


def _runs(sizes: Sequence[int]):
    """(start, stop, count, width) of each run of consecutive networks of equal width."""
    start = 0
    for width, run in itertools.groupby(sizes):
        count = len(list(run))
        yield start, start + count * width, count, width
        start += count * width


def _block_matvec(mat: jax.Array, v: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """[R, K] whose column k is ``mat[:, block_k] @ v[block_k]``: the product of mat [R, D] with
    the block-diagonal [D, K] matrix holding v's network blocks, in R·D flops instead of R·D·K.

    Runs of networks of equal width are reshaped to [R, count, width] and contracted at once.
    """
    out = []
    for start, stop, count, width in _runs(sizes):
        # A fused multiply-reduce, one read of mat (a batched dot would transpose it first).
        # Summed over a leading axis into `lanes` partial sums: XLA's CPU code vectorizes a
        # reduction across the minor axis, not along it (float adds are not reassociated).
        lanes = 8 if width % 8 == 0 else 1
        block = mat[:, start:stop].reshape(mat.shape[0], count, width // lanes, lanes)
        part = jnp.sum(block * v[start:stop].reshape(1, count, width // lanes, lanes), axis=2)
        out.append(jnp.sum(part, axis=-1))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


def _shifted_rows(
    row_cross: jax.Array,
    row_gram: jax.Array,
    count: jax.Array,
    sizes: Sequence[int],
    delta: jax.Array,
    diag: jax.Array,
    c_delta: jax.Array,
    start=0,
    reduce=_identity,
) -> tuple[jax.Array, jax.Array]:
    """``row_cross`` and ``row_gram`` (of ``count`` frames, networks of ``sizes``) re-centred
    on mean + delta (exact identities).

    Args:
        row_cross: [R, K], possibly the rows ``start:start + R`` only; row_gram: [K, K].
        delta: [D] the shift of the mean.
        diag: [R] the co-moment's diagonal on m's rows (Σ w (z − μ)² per column).
        c_delta: [R, K] `_block_matvec` of the co-moment's rows with delta.
        start, reduce: for row blocks (``reduce`` sums over the other row blocks).
    """
    prec = matmul_precision()
    k, rows = len(sizes), row_cross.shape[0]
    onehot = jax.nn.one_hot(jnp.asarray(segment_ids(sizes)), k, dtype=delta.dtype)  # [D, K]
    if rows == delta.shape[0]:
        onehot_r, delta_r = onehot, delta
    else:
        onehot_r = jax.lax.dynamic_slice_in_dim(onehot, start, rows)
        delta_r = jax.lax.dynamic_slice_in_dim(delta, start, rows)
    big_delta_r = delta_r[:, None] * onehot_r  # [R, K]: delta_k in network k's rows of column k
    q = jnp.einsum("d,dk->k", delta * delta, onehot, precision=prec)  # [K] ‖δ_k‖²
    s = reduce(jnp.matmul(diag, onehot_r, precision=prec))  # [K] Σ w r_k
    dp = reduce(jnp.matmul(big_delta_r.T, row_cross, precision=prec))  # [K, K]
    row_gram = (
        row_gram
        - 2 * (dp + dp.T)
        + 4 * reduce(jnp.matmul(big_delta_r.T, c_delta, precision=prec))
        + jnp.outer(s, q)
        + jnp.outer(q, s)
        + count * jnp.outer(q, q)
    )
    row_cross = row_cross - 2 * c_delta - jnp.outer(delta_r, s) - count * jnp.outer(delta_r, q)
    return row_cross, row_gram


def _shift(m: Moments, delta: jax.Array, start=0, reduce=_identity) -> Moments:
    """Re-centre the accumulators of m on mean + delta (exact identities, no new data).

    ``m.comoment`` [R, D] and ``m.row_cross`` [R, K] may be the rows ``start:start + R`` only
    (sharded statistics); ``reduce`` then sums the row sums over the other row blocks.
    """
    rows, d = m.comoment.shape
    if rows == d:
        diag, delta_r = jnp.diagonal(m.comoment), delta
    else:
        idx = jnp.arange(rows)
        diag = m.comoment[idx, start + idx]
        delta_r = jax.lax.dynamic_slice_in_dim(delta, start, rows)
    c_delta = _block_matvec(m.comoment, delta, m.sizes)  # [R, K]
    row_cross, row_gram = _shifted_rows(
        m.row_cross, m.row_gram, m.count, m.sizes, delta, diag, c_delta, start, reduce
    )
    comoment = m.comoment + m.count * jnp.outer(delta_r, delta)
    return m.replace(mean=m.mean + delta, comoment=comoment, row_cross=row_cross, row_gram=row_gram)


def merge(a: Moments, b: Moments, *, start=0, reduce=_identity) -> Moments:
    """Statistics of the union of the frames of a and b (Chan et al. pairwise update).

    ``start``, ``reduce``: for row blocks of sharded statistics (see `_shift`).
    """
    if a.sizes != b.sizes:
        raise ValueError(f"expected equal network sizes, got {a.sizes} and {b.sizes}")
    n = a.count + b.count
    safe_n = jnp.where(n > 0, n, 1)
    # Shift both sides onto the *stored* merged mean: each delta is then an exact difference of
    # two nearby floats, so the accumulators stay consistent with the centre they claim.
    mean = a.mean + (b.count / safe_n) * (b.mean - a.mean)
    sa = _shift(a, mean - a.mean, start, reduce)
    sb = _shift(b, mean - b.mean, start, reduce)
    return Moments(
        count=n,
        mean=mean,
        comoment=sa.comoment + sb.comoment,
        row_cross=sa.row_cross + sb.row_cross,
        row_gram=sa.row_gram + sb.row_gram,
        sizes=a.sizes,
    )


def update(
    m: Moments, z: jax.Array, *, where: jax.Array | None = None, upper: bool = False
) -> Moments:
    """Add one batch z: [N, D] (networks side by side as in m) with optional mask/weights.

    Equals ``merge(m, moments(z, where=where, sizes=m.sizes))`` — the same centring and the
    same identities — without forming the batch's [D, D] co-moment: the batch's Gram of the
    upper blocks and both sides' rank-one shifts (as two more frames) are added to m's
    co-moment block by block, one pass over it that XLA does in place when m is donated, and
    the row-norm accumulators shift with block products (D·D flops, not D·D·K).

    ``upper=True`` is the streaming form (`sslsim_jax.analysis.extract`): only the upper blocks
    of the co-moment (network a's rows against networks b ≥ a) are read and written, the
    strictly lower blocks are left as they are, whatever they hold. Mirroring them every batch
    costs more than a third of the update at 26 networks (`scripts/bench_update.py`);
    `mirror_upper` does it once, when the statistics are read.
    """
    z, w = _checked_batch(m, z, where)
    b = fold_batch(m.count, m.mean, z, w)
    if upper:
        c_a = _block_matvec_upper(m.comoment, b.delta_a, m.sizes)  # [D, K]
    else:
        c_a = _block_matvec(m.comoment, b.delta_a, m.sizes)
    row_cross, row_gram = fold_rows(m, b, jnp.diagonal(m.comoment), c_a)
    comoment = _add_upper_gram(m.comoment, *gram_factors(m.count, b), m.sizes, mirror=not upper)
    return Moments(
        count=b.count,
        mean=b.mean,
        comoment=comoment,
        row_cross=row_cross,
        row_gram=row_gram,
        sizes=m.sizes,
    )


def _checked_batch(m: Moments, z, where) -> tuple[jax.Array, jax.Array]:
    """(z, weights) of a batch for `update`, shape checked, in the statistics' dtype."""
    d = m.mean.shape[-1]
    z = jnp.asarray(z)
    if z.ndim != 2 or z.shape[1] != d:
        raise ValueError(f"expected z of shape [N, D={d}], got {z.shape}")
    dtype = jnp.promote_types(m.comoment.dtype, _accum_dtype(z.dtype))
    z = z.astype(dtype)
    return z, frame_weights(where, z.shape[0], dtype)


class Batch(NamedTuple):
    """One batch folded into statistics of ``count`` frames with mean ``mean`` (`fold_batch`):
    the batch's own count, mean and centred frames, and the merged count and mean."""

    batch_count: jax.Array
    zc: jax.Array  # [N, D] the frames about the batch's own mean
    zw: jax.Array  # [N, D] zc times the frame weights
    w: jax.Array  # [N] the frame weights
    count: jax.Array  # the merged count
    mean: jax.Array  # [D] the merged mean
    delta_a: jax.Array  # [D] merged mean − the statistics' mean
    delta_b: jax.Array  # [D] merged mean − the batch's mean


def fold_batch(count: jax.Array, mean: jax.Array, z: jax.Array, w: jax.Array) -> Batch:
    """The parts of `update` that do not read the co-moment: the batch centred on its own
    mean (`centre`) and the merged count and mean."""
    n_b, mean_b, zc, zw = centre(z, w)  # the batch about its own mean
    n = count + n_b
    merged = mean + (n_b / jnp.where(n > 0, n, 1)) * (mean_b - mean)
    return Batch(n_b, zc, zw, w, n, merged, merged - mean, merged - mean_b)


def fold_rows(m: Moments, b: Batch, diag: jax.Array, c_a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`update`'s row-norm accumulators: m's re-centred on the merged mean plus the batch's.

    Of m, only ``count``, ``row_cross``, ``row_gram`` and ``sizes`` are read: ``diag`` ([D],
    the co-moment's diagonal) and ``c_a`` ([D, K], `_block_matvec` of the co-moment with
    ``b.delta_a``) are all they need of the co-moment.
    """
    prec = matmul_precision()
    sizes = m.sizes
    row_cross_a, row_gram_a = _shifted_rows(
        m.row_cross, m.row_gram, m.count, sizes, b.delta_a, diag, c_a
    )
    # The batch's, about its own mean, then re-centred: its co-moment's block products with
    # delta_b are zwᵀ (zc's per-network products with delta_b), never the co-moment itself.
    r = row_norms(b.zc, sizes)  # [N, K]
    c_b = jnp.einsum("nd,nk->dk", b.zw, _block_matvec(b.zc, b.delta_b, sizes), precision=prec)
    diag_b = jnp.einsum("n,nd->d", b.w, b.zc * b.zc, precision=prec)
    row_cross_b, row_gram_b = _shifted_rows(
        jnp.einsum("nd,nk->dk", b.zw, r, precision=prec),
        jnp.einsum("n,nk,nl->kl", b.w, r, r, precision=prec),
        b.batch_count,
        sizes,
        b.delta_b,
        diag_b,
        c_b,
    )
    return row_cross_a + row_cross_b, row_gram_a + row_gram_b


def gram_factors(count: jax.Array, b: Batch) -> tuple[jax.Array, jax.Array]:
    """(left, right), both [N + 2, D]: what `update` adds to the co-moment is leftᵀ right.

    m's co-moment + count·δ_aδ_aᵀ + Σ w zc zcᵀ + n_b·δ_bδ_bᵀ: the two shifts are two more
    frames of weight 1.
    """
    shifts = jnp.stack([jnp.sqrt(count) * b.delta_a, jnp.sqrt(b.batch_count) * b.delta_b])
    return jnp.concatenate([b.zw, shifts]), jnp.concatenate([b.zc, shifts])


def _add_upper_gram(
    c: jax.Array, zw: jax.Array, zc: jax.Array, sizes: Sequence[int], *, mirror: bool = True
) -> jax.Array:
    """c + zwᵀ zc for symmetric results: one matmul per network against the networks after it
    (the upper blocks), each added to its block and, with ``mirror``, into the lower one."""
    offsets = np.cumsum((0,) + tuple(sizes))
    d = c.shape[0]
    for a in range(len(sizes)):
        lo, hi = int(offsets[a]), int(offsets[a + 1])
        # [N, D_a]^T [N, D - lo] -> [D_a, D - lo]: block row a from its diagonal block on.
        row = jnp.einsum("na,nb->ab", zw[:, lo:hi], zc[:, lo:], precision=matmul_precision())
        c = jax.lax.dynamic_update_slice(c, c[lo:hi, lo:] + row, (lo, lo))
        if mirror and hi < d:
            c = jax.lax.dynamic_update_slice(c, c[hi:, lo:hi] + row[:, hi - lo :].T, (hi, lo))
    return c


def _block_vecmat(mat: jax.Array, v: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """[K, C] whose row k is ``v[block_k] @ mat[block_k, :]`` (mat [D, C]), in D·C flops: a
    multiply summed over a leading axis, which XLA vectorizes across the columns."""
    out = []
    for start, stop, count, width in _runs(sizes):
        block = mat[start:stop].reshape(count, width, mat.shape[1])
        out.append(jnp.sum(block * v[start:stop].reshape(count, width, 1), axis=1))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)


def _block_matvec_upper(c: jax.Array, v: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """`_block_matvec` of a symmetric [D, D] matrix of which only the upper blocks are read:
    entry (i, k) for i in network a ≤ k from c's column block k, for a > k from its row block k
    (c[block_k, i] = c[i, block_k] by symmetry)."""
    seg = jnp.asarray(segment_ids(sizes))
    below = seg[:, None] > jnp.arange(len(sizes))[None, :]  # [D, K]: row's network after k
    return jnp.where(below, _block_vecmat(c, v, sizes).T, _block_matvec(c, v, sizes))


def mirror_upper(m: Moments) -> Moments:
    """Statistics whose co-moment's strictly lower blocks are copied from the upper ones: the
    result of `update` with ``upper=True`` made whole (any leading replicate axes are kept).
    One transpose per network, so the cost of one mirroring, not of one per batch."""
    offsets = np.cumsum((0,) + tuple(m.sizes))
    c = m.comoment
    d = c.shape[-1]
    for a in range(len(m.sizes)):
        lo, hi = int(offsets[a]), int(offsets[a + 1])
        if hi < d:
            lower = jnp.swapaxes(c[..., lo:hi, hi:], -1, -2)  # [..., D - hi, D_a]
            c = jax.lax.dynamic_update_slice(c, lower, (0,) * (c.ndim - 2) + (hi, lo))
    return m.replace(comoment=c)


# Temporaries one chunk of `update_replicates` may take by default.
REPLICATE_CHUNK_BYTES = 256 * 2**20


def replicate_chunk(
    width: int,
    frames: int,
    replicates: int,
    *,
    chunk: int | None = None,
    budget_bytes: int = REPLICATE_CHUNK_BYTES,
) -> int:
    """Replicates `update_replicates` folds at once: ``chunk`` (default: as many as keep the
    temporaries of `sslsim_jax.memory.bootstrap_bytes` within ``budget_bytes``), at most R,
    rounded down to a divisor of R — a remainder step would concatenate its results with the
    rest's, a copy of all R replicates' statistics."""
    r = int(replicates)
    if chunk is None:
        per_replicate = 4 * (3 * int(frames) * int(width) + 2 * int(width) ** 2)
        chunk = int(budget_bytes) // per_replicate
    elif int(chunk) < 1:
        raise ValueError(f"expected chunk >= 1 or None, got {chunk}")
    chunk = max(1, min(int(chunk), r))
    return max(c for c in range(1, chunk + 1) if r % c == 0)


def update_replicates(
    m: Moments, z: jax.Array, weights: jax.Array, *, chunk: int | None = None, upper: bool = False
) -> Moments:
    """`update` of R bootstrap replicates: the same frames z, each replicate with its weights.

    Equals ``jax.vmap(lambda mr, w: update(mr, z, where=w))(m, weights)``, but folds ``chunk``
    replicates at a time (``jax.lax.map``): each replicate centres z on its own weighted mean,
    so the vmap materialises [R, N, D] centred copies of the batch at once; chunked, the
    temporaries are [chunk, N, D] whatever R is (`sslsim_jax.memory.bootstrap_bytes`).

    Args:
        m: R replicates' statistics, every field with a leading [R] axis.
        z: [N, D] the batch's frames (networks side by side as in m).
        weights: [R, N] each replicate's frame weights (0 on padded frames).
        chunk: replicates per step, rounded down to a divisor of R (`replicate_chunk`);
            None: as many as keep the temporaries ≤ 256 MiB.
        upper: the streaming form of `update` (upper blocks only).

    Returns:
        The updated [R]-stacked `Moments`.
    """
    if m.count.ndim != 1:
        raise ValueError(f"expected m with a leading [R] axis (count [R]), got {m.count.shape}")
    r = m.count.shape[0]
    z = jnp.asarray(z)
    if z.ndim != 2 or z.shape[1] != m.mean.shape[-1]:
        raise ValueError(f"expected z of shape [N, D={m.mean.shape[-1]}], got {z.shape}")
    weights = jnp.asarray(weights)
    if weights.shape != (r, z.shape[0]):
        raise ValueError(
            f"expected weights of shape [R, N] = ({r}, {z.shape[0]}), got {weights.shape}"
        )
    chunk = replicate_chunk(z.shape[1], z.shape[0], r, chunk=chunk)
    return map_replicates(
        lambda mr, w: update(mr, z, where=w, upper=upper), m, weights, chunk=chunk
    )


def map_replicates(fn, m: Moments, weights: jax.Array, *, chunk: int) -> Moments:
    """``jax.vmap(fn)(m, weights)`` run ``chunk`` replicates at a time (``chunk`` divides R).

    The loop of `update_replicates`, for other per-replicate updates (e.g. the row blocks of
    `sslsim_jax.sharded`, inside ``shard_map``): ``fn(m_r, w_r) -> m_r``.

    Args:
        fn: one replicate's update.
        m: [R]-stacked statistics (any pytree with leading [R] axes).
        weights: [R, ...] per-replicate weights.
        chunk: replicates per step; must divide R.
    """
    r = weights.shape[0]
    if chunk < 1 or r % chunk:
        raise ValueError(f"expected a chunk that divides R = {r}, got {chunk}")

    def one(args):
        return fn(*args)

    if chunk == r:
        return jax.vmap(one)((m, weights))
    # [R, ...] -> [R / chunk, chunk, ...]: lax.map over the steps, vmap within one.
    steps = jax.tree.map(lambda a: a.reshape((r // chunk, chunk) + a.shape[1:]), (m, weights))
    out = jax.lax.map(jax.vmap(one), steps)
    return jax.tree.map(lambda a: a.reshape((r,) + a.shape[2:]), out)


def psum(m: Moments, axis_name, *, start=0, reduce=_identity) -> Moments:
    """All-reduce statistics over a mesh axis; equals one pass over all devices' frames.

    Each device re-centres its accumulators on the global mean, then the sums are reduced.
    The global mean is found as a small correction to a shared reference (the mean of the
    non-empty devices' means); every device then shifts onto that stored value exactly.
    ``start``, ``reduce``: for row blocks of sharded statistics (see `_shift`).
    """
    has = (m.count > 0).astype(m.mean.dtype)
    n_has = jax.lax.psum(has, axis_name)
    ref = jax.lax.psum(has * m.mean, axis_name) / jnp.maximum(n_has, 1)
    n = jax.lax.psum(m.count, axis_name)
    safe_n = jnp.where(n > 0, n, 1)
    correction = jax.lax.psum(m.count * (m.mean - ref), axis_name) / safe_n
    mean = ref + correction
    shifted = _shift(m, mean - m.mean, start, reduce)
    return Moments(
        count=n,
        mean=mean,
        comoment=jax.lax.psum(shifted.comoment, axis_name),
        row_cross=jax.lax.psum(shifted.row_cross, axis_name),
        row_gram=jax.lax.psum(shifted.row_gram, axis_name),
        sizes=m.sizes,
    )


def select(m: Moments, networks: Sequence[int]) -> Moments:
    """The statistics of a subset of the networks, in the given order (static indices)."""
    k = len(m.sizes)
    networks = tuple(int(i) for i in networks)
    if any(not 0 <= i < k for i in networks):
        raise ValueError(f"expected network indices in [0, {k}), got {networks}")
    offsets = m.offsets
    cols = np.concatenate([np.arange(offsets[i], offsets[i] + m.sizes[i]) for i in networks])
    idx = np.asarray(networks)
    return Moments(
        count=m.count,
        mean=m.mean[cols],
        comoment=m.comoment[np.ix_(cols, cols)],
        row_cross=m.row_cross[np.ix_(cols, idx)],
        row_gram=m.row_gram[np.ix_(idx, idx)],
        sizes=tuple(m.sizes[i] for i in networks),
    )


def covariance(m: Moments, *, ddof: int = 1) -> jax.Array:
    """[D, D] covariance ``comoment / (count - ddof)`` (0 where count <= ddof)."""
    denom = m.count - ddof
    return jnp.where(denom > 0, m.comoment / jnp.where(denom > 0, denom, 1), 0)
