"""Joint statistics too large for one device: the co-moment split by network rows over devices.

K networks of width up to P have a joint co-moment of (K·P)² floats: 4 large models with every
layer (100 networks × 1024) need 42 GB in float32. Here it lives split over the S devices of the
``"stats"`` axis of a mesh (`sslsim_jax.distributed.make_mesh(stat_shards=S)`): device s holds
the rows of networks s·K/S … (s+1)·K/S − 1 against all columns, [K·P/S, K·P]. Networks are
padded to the common width P and their count to a multiple of S with all-zero networks (zero
columns are constant neurons: excluded everywhere, and cropped from every result).

- `update` folds a batch of frames (split over ``"data"``) into the row blocks: each device
  multiplies its own rows of the centred batch against all columns, the batch sums are reduced
  over ``"data"``, and the Chan merge of `sslsim_jax.stats` runs on the rows with its few row
  sums reduced over ``"stats"``. Replicates (the bootstrap) are a leading axis.
- `pairwise` computes every metric of `sslsim_jax.pairwise` from the row blocks: per network
  quantities (diagonal, eigendecompositions, block norms) are computed where the network's rows
  live and gathered, [K, P, P] at most; then every device computes its rows of each [K, K]
  metric matrix (one SVD per ordered pair it holds) and of the neuron matches. Statistics split
  over CPU devices run each row block's programs instead, one block after the other, joined on
  the host (`_per_device`).

Memory per device, float32, D = K_pad·P (K_pad = K rounded up to a multiple of S), B bootstrap
replicates, N_b frames per batch on one device:

- statistics: 4·(1 + B)·D²/S bytes (the row blocks; the rest is O(D·K));
- batch update: about 3 × 4·D²/S bytes of temporaries (the batch's rows, the merged rows) plus
  the frames, 4·N_b·D;
- metrics: about 3 × 4·D²/S (the row blocks, neuron correlations, linreg projections) plus the
  gathered eigenvectors 4·K_pad·P² and the CCA pairs 4·(K_pad²/S)·W² (W ≤ P the kept width).

With S = 8 the 42 GB example needs about 5.3 GB of statistics per device.

The statistics equal the unsharded ones up to float32 rounding: the same centring and the same
merge, with sums split differently (`tests/test_sharded.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sslsim_jax import stats
from sslsim_jax.distributed import DATA, STATS, fetch_replicated
from sslsim_jax.metrics import host, kernels, registry

__all__ = ["Layout", "init", "pairwise", "update", "update_replicates"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the networks' columns sit in the padded, sharded statistics.

    Attributes:
        sizes: the K real network widths.
        shards: S, the devices the rows are split over.
    """

    sizes: tuple[int, ...]
    shards: int

    @property
    def width(self) -> int:
        """P, the common (padded) network width."""
        return max(self.sizes)

    @property
    def networks(self) -> int:
        """K_pad: K rounded up to a multiple of S."""
        return math.ceil(len(self.sizes) / self.shards) * self.shards

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        return (self.width,) * self.networks

    @property
    def real(self) -> np.ndarray:
        """[K_pad, P] bool: the column is a real neuron (not padding)."""
        real = np.zeros((self.networks, self.width), bool)
        for k, size in enumerate(self.sizes):
            real[k, :size] = True
        return real

    def pad(self, columns: Sequence[jax.Array]) -> jax.Array:
        """[N, K_pad·P] from the K networks' [N, D_k] activations (zero padding columns)."""
        if len(columns) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} networks, got {len(columns)}")
        n = columns[0].shape[0]
        dtype = jnp.result_type(*columns)
        parts = []
        for x, size in zip(columns, self.sizes, strict=True):
            if x.shape != (n, size):
                raise ValueError(f"expected a network of shape {(n, size)}, got {x.shape}")
            parts.append(jnp.pad(x.astype(dtype), ((0, 0), (0, self.width - size))))
        missing = (self.networks - len(self.sizes)) * self.width
        if missing:
            parts.append(jnp.zeros((n, missing), dtype))
        return jnp.concatenate(parts, axis=1)


def _specs(m: stats.Moments, leading: int = 0) -> stats.Moments:
    """PartitionSpecs of sharded `stats.Moments` (``leading`` replicate axes in front)."""
    lead = (None,) * leading
    return stats.Moments(
        count=P(),
        mean=P(),
        comoment=P(*lead, STATS),
        row_cross=P(*lead, STATS),
        row_gram=P(),
        sizes=m.sizes,
    )


def shardings(m: stats.Moments, mesh: Mesh, leading: int = 0) -> stats.Moments:
    """The `NamedSharding` of each field of sharded statistics."""
    specs = _specs(m, leading)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def init(layout: Layout, mesh: Mesh, replicates: int | None = None) -> stats.Moments:
    """Empty sharded statistics (or ``replicates`` of them), allocated on their devices."""
    if mesh.shape[STATS] != layout.shards:
        raise ValueError(
            f"expected a mesh with {layout.shards} devices along {STATS!r}, got {mesh.shape}"
        )
    one = stats.init(layout.padded_sizes)
    abstract = jax.eval_shape(lambda: one)
    if replicates is not None:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((replicates, *a.shape), a.dtype), abstract
        )
    out = shardings(one, mesh, 0 if replicates is None else 1)
    return jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
        out_shardings=out,
    )()


def _psum_data(x):
    return jax.lax.psum(x, DATA)


def _psum_stats(x):
    return jax.lax.psum(x, STATS)


def _rows_start(m: stats.Moments):
    rows = m.comoment.shape[0]
    return jax.lax.axis_index(STATS) * rows, rows


def _batch_rows(z: jax.Array, w: jax.Array, sizes, start, rows: int) -> stats.Moments:
    """The batch's statistics, rows ``start:start + rows`` only; frames reduced over "data"."""
    prec = stats.matmul_precision()
    n, mean, zc, zw = stats.centre(z, w, _psum_data)
    zw_rows = jax.lax.dynamic_slice_in_dim(zw, start, rows, axis=1)  # [N, R]
    r = stats.row_norms(zc, sizes)  # [N, K]
    return stats.Moments(
        count=n,
        mean=jnp.where(n > 0, mean, 0),
        comoment=_psum_data(jnp.einsum("nr,nd->rd", zw_rows, zc, precision=prec)),
        row_cross=_psum_data(jnp.einsum("nr,nk->rk", zw_rows, r, precision=prec)),
        row_gram=_psum_data(jnp.einsum("n,nk,nl->kl", w, r, r, precision=prec)),
        sizes=sizes,
    )


def _update_rows(m: stats.Moments, z: jax.Array, w: jax.Array) -> stats.Moments:
    start, rows = _rows_start(m)
    z = z.astype(m.comoment.dtype)
    batch = _batch_rows(z, w.astype(z.dtype), m.sizes, start, rows)
    return stats.merge(m, batch, start=start, reduce=_psum_stats)


@functools.cache
def _updater(mesh: Mesh, sizes: tuple[int, ...], replicated_weights: bool):
    template = stats.init(sizes)
    if replicated_weights:  # replicates: [R, ...] statistics, [R, N] weights
        body = jax.vmap(_update_rows, in_axes=(0, None, 0))
        m_spec, w_spec = _specs(template, 1), P(None, DATA)
    else:
        body = _update_rows
        m_spec, w_spec = _specs(template), P(DATA)
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(m_spec, P(DATA), w_spec), out_specs=m_spec, check_vma=False
    )
    return jax.jit(mapped, donate_argnums=0)


def update(m: stats.Moments, z: jax.Array, where: jax.Array, mesh: Mesh) -> stats.Moments:
    """Folds frames z: [N, K_pad·P] (split over ``"data"``) with weights [N] into sharded m.

    ``m`` is donated: its buffers are reused for the result.
    """
    return _updater(mesh, m.sizes, False)(m, z, where)


def update_replicates(
    m: stats.Moments, z: jax.Array, weights: jax.Array, mesh: Mesh
) -> stats.Moments:
    """`update` of R replicates at once: m with a leading [R] axis, weights [R, N]."""
    return _updater(mesh, m.sizes, True)(m, z, weights)


def _local_blocks(m: stats.Moments, width: int, diag, valid, real, first) -> kernels.Blocks:
    """A device's row block as `kernels.Blocks` [Ka, P, K, P]: networks first … first + Ka − 1."""
    k = len(m.sizes)
    ka = m.comoment.shape[0] // width
    rows = first + jnp.arange(ka)
    return kernels.Blocks(
        count=m.count,
        comoment=m.comoment.reshape(ka, width, k, width),
        valid=valid,
        real=real,
        row_cross=m.row_cross.reshape(ka, width, k),
        row_gram=m.row_gram,
        diag=diag,
        rows=rows,
    )


def _gather(x):
    return jax.lax.all_gather(x, STATS, tiled=True)


def _first_row(m: stats.Moments, width: int):
    """The first network of this device's row block (inside ``shard_map``)."""
    return jax.lax.axis_index(STATS) * (m.comoment.shape[0] // width)


def _own_diag(m, real, first, *, width):
    """[Ka, P] the co-moment diagonal of a row block's networks."""
    own = kernels.own_blocks(_local_blocks(m, width, None, None, real, first))
    return jnp.diagonal(own, axis1=1, axis2=2)


def _row_spectra(m, real, diag, first, *, width, spectral, rtol, variance, variance_rule):
    """(valid [K, P], ‖C_aa‖² [Ka], `kernels.Spectra` of the Ka row networks or None), from
    every network's diagonal ``diag`` [K, P]."""
    k = len(m.sizes)
    valid = kernels.valid_neurons(m.count, m.mean.reshape(k, width), diag, real)
    b = _local_blocks(m, width, diag, valid, real, first)
    s = None
    if spectral:
        s = kernels.spectra(b, rtol=rtol, variance=variance, variance_rule=variance_rule)
    return valid, kernels.own_sq(b), s


def _stage1(m, real, *, width, **options):
    first = _first_row(m, width)
    diag = _gather(_own_diag(m, real, first, width=width))  # [K, P]
    valid, norms, s = _row_spectra(m, real, diag, first, width=width, **options)
    return diag, valid, _gather(norms), jax.tree.map(_gather, s)


def _stage2(m, real, diag, valid, norms, s, cca, *, width, **options):
    first = _first_row(m, width)
    return _pair_rows(m, real, diag, valid, norms, s, cca, first, width=width, **options)


def _pair_rows(
    m, real, diag, valid, norms, s, cca, first, *, width, metrics, cca_width, neurons, topk, ks
):
    """Every value of `sslsim_jax.pairwise.pair_values` for a row block's networks."""
    from sslsim_jax.pairwise import pair_values

    b = _local_blocks(m, width, diag, valid, real, first)
    return pair_values(
        b, s, kernels.inv_sd(b), metrics=metrics, width=cca_width, norms=norms, neurons=neurons,
        topk=topk, ks=ks, cca=cca,
    )  # fmt: skip


def _host_pair_blocks(
    blocks: list[tuple[int, stats.Moments]],
    s: kernels.Spectra,
    *,
    width: int,
    cca_width: int,
    weights: bool,
) -> dict[int, kernels.CanonicalPairs]:
    """Each row block's CCA pairs (against every network, `kernels.cca_index` order) computed
    on the host from its co-moment rows (`_row_blocks`) and the host spectra ``s``, keyed by
    the block's first network. On the host each pair runs at its own shape on every core, and
    no XLA SVD runs on several CPU devices at once (see `_per_device`)."""
    pairs = {}
    for first, b in blocks:
        k, ka = len(b.sizes), b.comoment.shape[0] // width
        ia, ib = np.repeat(np.arange(ka), k), np.tile(np.arange(k), ka)
        found = host.pairs(
            b.comoment.reshape(ka, width, k, width), first + np.arange(ka), s.whiten, s.kept,
            ia, ib, width=cca_width, weights=weights, both=False,
        )  # fmt: skip
        pairs[first] = kernels.CanonicalPairs(*found)
    return pairs


def _stacked(blocks: dict[int, kernels.CanonicalPairs], mesh: Mesh) -> kernels.CanonicalPairs:
    """`_host_pair_blocks` stacked along ``"stats"``, as `_stage2` reads them."""
    parts = [blocks[first] for first in sorted(blocks)]
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(STATS)))
    return jax.tree.map(lambda *x: put(np.concatenate(x)), *parts)


def _per_device(m: stats.Moments) -> bool:
    """Whether `pairwise` runs each row block's programs one block after the other (on the
    default device, from NumPy views of the blocks) instead of one program over the mesh:
    statistics split over several CPU devices of this process.

    CPU devices share the cores and XLA's intra-op thread pool, so running the blocks at once
    gains nothing, and it can deadlock: jaxlib's batched LAPACK kernels (``eigh``, ``svd``)
    run on a pool worker, split the batch over the same pool and wait for it. With as many
    devices in such a kernel as the pool has workers (2 on a 2-core machine), every worker
    waits and none is left to do the work (native stacks of the two-process test, which hung
    about one run in ten: both ``tf_XLAEigen`` workers in ``ParallelBatchMap``'s wait)."""
    c = m.comoment
    return host.in_host_memory(c) and len(c.devices()) > 1


_own_diag_jit = jax.jit(_own_diag, static_argnames="width")
_row_spectra_jit = jax.jit(
    _row_spectra, static_argnames=("width", "spectral", "rtol", "variance", "variance_rule")
)
_pair_rows_jit = jax.jit(
    _pair_rows, static_argnames=("width", "metrics", "cca_width", "neurons", "topk", "ks")
)


def _row_blocks(m: stats.Moments, width: int) -> list[tuple[int, stats.Moments]]:
    """(first network, its `stats.Moments` as NumPy views of the CPU buffers) of each row
    block, in row order (``m`` in host memory, `host.in_host_memory`): each block's programs
    then run on the default device, compiled once for all blocks."""

    def on(x, device):
        return np.asarray(next(s.data for s in x.addressable_shards if s.device == device))

    blocks = {}
    for shard in m.comoment.addressable_shards:
        first = (shard.index[0].start or 0) // width
        blocks[first] = jax.tree.map(functools.partial(on, device=shard.device), m)
    return [(first, blocks[first]) for first in sorted(blocks)]


def _serial(calls: Iterable[Callable[[], Any]]) -> list:
    """Host copies of each call's result, each finished before the next starts (`_per_device`)."""
    return [jax.device_get(call()) for call in calls]


def _concat(parts: Sequence) -> Any:
    """Per-block pytrees (host arrays) joined along their leading (row) axis."""
    return jax.tree.map(lambda *x: np.concatenate(x), *parts)


def _stage1_each(blocks, real, *, width, **options):
    """`_stage1` one row block (`_row_blocks`) at a time, joined on the host."""
    diag = _concat(
        _serial(
            functools.partial(_own_diag_jit, b, real, first, width=width) for first, b in blocks
        )
    )
    rows = _serial(
        functools.partial(_row_spectra_jit, b, real, diag, first, width=width, **options)
        for first, b in blocks
    )
    valid = rows[0][0]  # every network's, the same from each block
    norms, s = _concat([r[1:] for r in rows])
    return diag, valid, norms, s


def _stage2_each(blocks, real, diag, valid, norms, s, cca, **options):
    """`_stage2` one row block at a time, as `_stage1_each`; ``cca``: `_host_pair_blocks`."""
    calls = (
        functools.partial(
            _pair_rows_jit, b, real, diag, valid, norms, s, cca and cca[first], first, **options
        )
        for first, b in blocks
    )
    return _concat(_serial(calls))


def pairwise(
    m: stats.Moments,
    layout: Layout,
    mesh: Mesh,
    names: Sequence[str],
    *,
    metrics: Sequence[str],
    neurons: bool = False,
    topk: Sequence[str] = (),
    ks: Sequence[float] = (),
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
) -> dict[str, np.ndarray]:
    """Every metric for every ordered pair of the K real networks, from sharded statistics.

    Args:
        m: statistics in ``layout`` (host arrays or sharded device arrays).
        layout: the `Layout` of m.
        mesh: a mesh whose ``"stats"`` axis has ``layout.shards`` devices.
        names: the K network names (warnings).
        metrics: names among `sslsim_jax.pairwise.METRICS` except "rbf_cka"; may be empty
            with ``topk`` or ``neurons``.
        neurons: also return "best", "matched" [K, P, K] (as `kernels.neuron_best`) and
            "valid" [K, P].
        topk, ks: also return Wu et al.'s top-k of these metrics (`sslsim_jax.metrics.topk`)
            at fractions ``ks``, as "topk:METRIC" [K, K, len(ks)].
        variance, variance_rule, rtol: as in `sslsim_jax.pairwise.compare_moments`.

    Returns:
        metric name -> [K, K] NumPy array, as `sslsim_jax.pairwise.compare_moments`.
    """
    from sslsim_jax.pairwise import check_requests, is_spectral, needed

    metrics, topk, ks = check_requests(metrics, topk, ks, neurons=neurons)
    k, width = len(layout.sizes), layout.width
    if m.sizes != layout.padded_sizes:
        raise ValueError(f"expected statistics of sizes {layout.padded_sizes}, got {m.sizes}")
    if len(names) != k:
        raise ValueError(f"expected {k} names, got {len(names)}")
    # One copy along "data" is enough: the other rows of the mesh would repeat the same work.
    mesh = Mesh(mesh.devices[:1], mesh.axis_names, axis_types=mesh.axis_types)
    m = jax.device_put(m, shardings(m, mesh))
    real = jnp.asarray(layout.real)
    spectral = is_spectral(metrics) or any(registry.get(name).spectral for name in topk)
    m_spec = _specs(m)
    options1 = dict(spectral=spectral, rtol=rtol, variance=variance, variance_rule=variance_rule)
    # Row blocks in host memory: their CCA pairs run on the host, and on several CPU devices
    # every program runs one block at a time.
    blocks = _row_blocks(m, width) if host.in_host_memory(m.comoment) else None
    per_device = blocks is not None and _per_device(m)
    if per_device:
        diag, valid, norms, s = _stage1_each(blocks, layout.real, width=width, **options1)
    else:
        stage1 = jax.jit(
            jax.shard_map(
                functools.partial(_stage1, width=width, **options1),
                mesh=mesh,
                in_specs=(m_spec, P()),
                out_specs=P(),
                check_vma=False,
            )
        )
        diag, valid, norms, s = stage1(m, real)
    # The checks read host copies of these small replicated arrays: an eager slice of them would
    # be one more program over every device of the mesh.
    count, diag_h, valid_h, s_h = fetch_replicated((m.count, diag, valid, s))
    kernels.warn_degenerate(
        count, valid_h[:k], layout.real[:k], diag_h[:k], rank_sensitive=spectral,
        names=tuple(names),
    )  # fmt: skip
    parts = needed(metrics, neurons, topk)
    cca_width = max(1, int(np.max(s_h.kept[:k]))) if spectral else 1
    if spectral:
        kernels.warn_rank_capped(
            kernels.rank_counts(s_h), names, metrics=parts, frames=count, variance=variance
        )
    cca = None
    if blocks is not None and kernels.needs_cca(parts):
        cca = _host_pair_blocks(
            blocks, s_h, width=width, cca_width=cca_width, weights="pwcca" in parts
        )
    options2 = dict(
        width=width, metrics=metrics, cca_width=cca_width, neurons=neurons, topk=topk, ks=ks
    )
    if per_device:
        out = _stage2_each(blocks, layout.real, diag, valid_h, norms, s_h, cca, **options2)
    else:
        stage2 = jax.jit(
            jax.shard_map(
                functools.partial(_stage2, **options2),
                mesh=mesh,
                in_specs=(m_spec, P(), P(), P(), P(), P(), P(STATS)),
                out_specs=P(STATS),
                check_vma=False,
            )
        )
        out = stage2(m, real, diag, valid, norms, s, None if cca is None else _stacked(cca, mesh))
    results = {name: np.asarray(value)[:k, :k] for name, value in out.items() if value.ndim == 2}
    for name in topk:
        results[f"topk:{name}"] = np.asarray(out[f"topk:{name}"])[:k, :k]
    if neurons:
        results["best"] = np.asarray(out["best"])[:k, :, :k]
        results["matched"] = np.asarray(out["matched"])[:k, :, :k]
        results["valid"] = valid_h[:k]
    return results
