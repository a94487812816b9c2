"""The CCA pairs of `kernels.canonical_pairs` computed on the host, for statistics in CPU memory.

On a CPU, XLA runs a batched SVD on one thread and needs every pair padded to the widest kept
width. Here each pair's whitened cross block, its SVD and its PWCCA weights are computed at the
pair's own [kept_a, kept_b] shape, the pairs spread over one thread per core with BLAS held to
one thread each (`threadpoolctl`), and the SVD is LAPACK's ``gesdd`` called with the GIL
released. For the 26 networks of two base models (325 pairs keeping 135-692 directions) on 2
cores: 7.0 s against 24 s for the padded XLA program. Same maths, same float32 products.

`canonical_pairs` is the entry point for `kernels.Blocks` on one device (`applies` says whether
they can take it); `pairs` is its NumPy core, which `sslsim_jax.sharded` calls on each device's
row block of split statistics.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax import lapack
from sslsim_jax.memory import usable_cores
from sslsim_jax.metrics import kernels

__all__ = ["applies", "canonical_pairs", "in_host_memory", "pairs", "svd"]


def in_host_memory(x: Any) -> bool:
    """Whether ``x`` is a concrete float32/64 array whose buffers are all CPU buffers of this
    process (so NumPy views of them cost no copy)."""
    return (
        isinstance(x, jax.Array)
        and not kernels.is_traced(x)
        and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.devices())
        and x.dtype in (jnp.float32, jnp.float64)
    )


def applies(b: kernels.Blocks) -> bool:
    """Whether ``b``'s co-moment is in host memory (`in_host_memory`) on one device."""
    return in_host_memory(b.comoment) and len(b.comoment.devices()) == 1


@functools.cache
def _gesdd(dtype: str):
    """LAPACK ``?gesdd`` as a ctypes function (`sslsim_jax.lapack`: the GIL released for the
    call, which scipy's own wrappers do not) and its pointer type, or None."""
    real = lapack.real_pointer(dtype)
    ints = ctypes.POINTER(ctypes.c_int)
    args = (ctypes.c_char_p, ints, ints, real, ints, real, real, ints, real, ints, real, ints)
    name = {"float32": "sgesdd", "float64": "dgesdd"}[dtype]
    found = lapack.routine("lapack", name, *args, ints, ints)
    return None if found is None else (found, real)


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``x = (u * s) @ vt`` of a [r, c] float32/64 matrix by LAPACK ``gesdd``, the GIL
    released (threads factorise matrices in parallel). Raises `np.linalg.LinAlgError` when
    ``gesdd`` does not converge or ``x`` is not finite."""
    x = np.asarray(x)
    found = _gesdd(x.dtype.name) if x.dtype in (np.float32, np.float64) else None
    if found is None:
        import scipy.linalg

        return scipy.linalg.svd(x, full_matrices=False, check_finite=True)
    if not np.isfinite(x).all():
        raise np.linalg.LinAlgError("SVD of a matrix that is not finite")
    gesdd, real = found
    r, c = x.shape
    k = min(r, c)
    # x in C order is the column-major [c, r] matrix xᵀ = U S Vᵀ, so x = Vᵀᵀ S Uᵀ: LAPACK's
    # column-major Vᵀ [k, r] read in C order is x's left vectors [r, k], and its U [c, k] is
    # x's right vectors transposed [k, c].
    a = np.array(x, order="C")  # overwritten
    s = np.empty(k, x.dtype)
    left, right = np.empty((r, k), x.dtype), np.empty((k, c), x.dtype)
    iwork = np.empty(8 * max(k, 1), np.intc)
    info = ctypes.c_int(0)

    def call(work: np.ndarray, lwork: int) -> None:
        ref = ctypes.byref
        gesdd(
            b"S", ref(ctypes.c_int(c)), ref(ctypes.c_int(r)), a.ctypes.data_as(real),
            ref(ctypes.c_int(max(c, 1))), s.ctypes.data_as(real), right.ctypes.data_as(real),
            ref(ctypes.c_int(max(c, 1))), left.ctypes.data_as(real), ref(ctypes.c_int(max(k, 1))),
            work.ctypes.data_as(real), ref(ctypes.c_int(lwork)), iwork.ctypes.data_as(
                ctypes.POINTER(ctypes.c_int)), ref(info),
        )  # fmt: skip

    query = np.empty(1, x.dtype)
    call(query, -1)
    size = int(query[0] * 1.01) + 1  # the float query can round the integer size down
    call(np.empty(size, x.dtype), size)
    if info.value > 0:
        import scipy.linalg

        try:  # gesdd did not converge; the slower QR iteration usually does
            return scipy.linalg.svd(x, full_matrices=False, lapack_driver="gesvd")
        except ValueError as err:
            raise np.linalg.LinAlgError(str(err)) from err
    if info.value < 0:
        raise np.linalg.LinAlgError(f"gesdd: argument {-info.value} is invalid")
    return left, s, right


def pairs(
    comoment: np.ndarray,
    rows: np.ndarray,
    whiten: np.ndarray,
    kept: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    *,
    width: int,
    weights: bool,
    both: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The NumPy core of `canonical_pairs`: (rho, take, weight_ab, weight_ba) [n, width].

    Args:
        comoment: [Ka, P, K, P] co-moment rows of the networks ``rows`` [Ka] (a view is fine).
        whiten, kept: `kernels.Spectra` fields of all K networks.
        ia, ib: the pairs (row block, network), as `kernels.cca_index` lists them.
        width, weights, both: as in `kernels.canonical_pairs`.
    """
    ia, ib, rows, kept = (np.asarray(x) for x in (ia, ib, rows, kept))
    dtype = comoment.dtype
    ga = rows[ia]
    ka, kb = kept[ga], kept[ib]
    m = np.minimum(ka, kb)
    n = len(ia)
    qk = whiten[:, :, :width] * (np.arange(width)[None, None, :] < kept[:, None, None])
    rho = np.zeros((n, width), dtype)
    w_ab = np.zeros((n, width), dtype) if weights else None
    w_ba = np.zeros((n, width), dtype) if weights and both else None
    load = {}  # <U_w, x_q> [W, P] of each row block the weights need, formed once
    if weights:
        for i in np.unique(np.concatenate([ia, ib] if both else [ia])).tolist():
            load[i] = qk[rows[i]].T @ comoment[i, :, rows[i], :]

    def one(j: int) -> None:
        if m[j] == 0:  # a padding network: nothing to correlate
            return
        qa, qb = qk[ga[j], :, : ka[j]], qk[ib[j], :, : kb[j]]
        cross = comoment[ia[j], :, ib[j], :]  # [P, P], a strided view
        if ka[j] <= kb[j]:
            mat = (qa.T @ cross) @ qb
        else:
            mat = qa.T @ (cross @ qb)
        try:
            u, sv, vt = svd(mat)
        except np.linalg.LinAlgError:  # NaN statistics: undefined, as on a device
            rho[j, : m[j]] = np.nan
            return
        rho[j, : m[j]] = sv
        if w_ab is not None:
            w_ab[j, : m[j]] = np.abs(u.T @ load[ia[j]][: ka[j]]).sum(axis=1)
        if w_ba is not None:  # both: ib indexes row blocks too
            w_ba[j, : m[j]] = np.abs(vt @ load[ib[j]][: kb[j]]).sum(axis=1)

    # The largest first, so the last pairs to finish are small ones.
    order = np.argsort(-(ka.astype(np.int64) * kb * m), kind="stable")
    workers = min(usable_cores(), max(n, 1))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1 if workers > 1 else None, user_api="blas"):
        if workers == 1:
            for j in order:
                one(int(j))
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, order.tolist()))
    take = np.arange(width)[None, :] < m[:, None]
    rho = np.where(take, np.clip(rho, 0, 1), 0)  # NaN stays NaN
    return rho, take, w_ab, w_ba


def canonical_pairs(
    b: kernels.Blocks,
    s: kernels.Spectra,
    ia: np.ndarray,
    ib: np.ndarray,
    *,
    width: int,
    weights: bool,
    both: bool,
) -> kernels.CanonicalPairs:
    """`kernels.canonical_pairs` on the host (``b`` must satisfy `applies`; not traceable).

    Each pair's whitened cross block of its kept directions is formed at its own shape, with
    the cheaper association of the two products, and factorised; the values equal the padded
    program's to float rounding. A pair whose block is not finite gets NaN correlations.
    """
    whiten, kept = jax.device_get((s.whiten, s.kept))
    out = pairs(
        np.asarray(b.comoment),  # a view of the device buffer on a CPU
        np.asarray(b.rows),
        whiten,
        kept,
        ia,
        ib,
        width=width,
        weights=weights,
        both=both,
    )
    device = next(iter(b.comoment.devices()))
    return kernels.CanonicalPairs(*(None if x is None else jax.device_put(x, device) for x in out))
