"""`stats.update`'s streaming form with the co-moment in host memory, its Gram added by BLAS.

On a CPU, the co-moment's block products are most of an analysis's cost beyond the models'
forward passes, and XLA's CPU matmuls run them at about half OpenBLAS's rate: for the 26
networks of two base models (D = 19968) and a batch of 500 frames, the jitted
``stats.update(upper=True)`` takes 3.3 s, this update 1.7 s (its ``?gemm`` 1.3 s)
(`scripts/bench_update.py`, 2 cores). Here the co-moment is a writable NumPy array and each
batch's Gram is added into it in place by BLAS, one block row at a time; everything that does
not touch the co-moment runs in the same JAX code as `stats.update` (`stats.fold_batch`,
`stats.fold_rows`, `stats.gram_factors`), jitted. Same maths, same float32 products: only the
order of the sums in the Gram differs.

Like ``stats.update(..., upper=True)``, only the upper blocks (network a's rows against
networks b ≥ a) are read and written; `mirror_upper` makes the co-moment whole once. The
co-moment is updated in place, so the statistics passed to `update` must not be used again
(the jitted form donates them; here they share the buffer with the result).

`sslsim_jax.analysis.extract` uses this when its statistics live on one CPU device
(`applies`).
"""

from __future__ import annotations

import ctypes
import math
import mmap

import jax
import numpy as np

from sslsim_jax import lapack, stats

__all__ = [
    "add_upper_gram",
    "applies",
    "host_array",
    "init",
    "mapped_zeros",
    "mirror_upper",
    "to_host",
    "update",
]


def applies(mesh: jax.sharding.Mesh, dtype) -> bool:
    """Whether statistics of ``dtype`` replicated over ``mesh`` can take the host update: the
    mesh is one CPU device and BLAS ``?gemm`` of that dtype is found."""
    devices = mesh.devices.flat
    return (
        mesh.devices.size == 1
        and devices[0].platform == "cpu"
        and lapack.gemm(np.dtype(dtype).name) is not None
    )


# Host co-moments start on a 2 MiB boundary: JAX takes such arrays as arguments without a copy
# (a copy of GBs, seconds on some VMs), and the kernel may back them with huge pages.
ALIGN = 2 * 2**20
# Columns of the lower blocks `mirror_upper` copies at a time.
_TILE = 768


def _bounds(sizes) -> list[tuple[int, int]]:
    """(first column, end column) of each network."""
    offsets = np.cumsum((0, *sizes)).tolist()
    return list(zip(offsets[:-1], offsets[1:], strict=True))


def _is_host(c) -> bool:
    return (
        isinstance(c, np.ndarray)
        and c.flags.c_contiguous
        and c.flags.writeable
        and c.dtype in (np.float32, np.float64)
        and c.ctypes.data % ALIGN == 0
    )


def mapped_zeros(shape, dtype) -> np.ndarray:
    """A zeroed, writable, C-ordered array starting on an `ALIGN` boundary, in an anonymous
    memory mapping of its own: the kernel zero-fills its pages as they are first written, under
    its own huge-page policy.

    NumPy's allocations of 4 MiB or more ask the kernel for transparent huge pages
    (``madvise``); where the kernel's ``transparent_hugepage/defrag`` is "madvise" (a common
    default), every page fault of such memory compacts memory first. On this project's 2-core
    VM that took 4-6 s to fill 1.6 GB (and no huge page came of it), against about 1 s here.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.frombuffer(mmap.mmap(-1, nbytes + ALIGN), np.uint8)  # keeps the mapping alive
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def host_array(x, dtype=None) -> np.ndarray:
    """``x`` as a writable, C-ordered NumPy array starting on an `ALIGN` boundary: ``x``
    itself when it is one, else an aligned copy (in memory of `mapped_zeros`)."""
    if _is_host(x) and (dtype is None or x.dtype == dtype):
        return x
    x = np.asarray(x, dtype)
    out = mapped_zeros(x.shape, x.dtype)
    np.copyto(out, x)
    return out


def init(sizes, dtype=np.float32) -> stats.Moments:
    """Empty statistics (`stats.init`) as aligned NumPy arrays, ready for `update`."""
    return stats.init(sizes, dtype, zeros=mapped_zeros)


def to_host(m: stats.Moments) -> stats.Moments:
    """``m`` with its co-moment as a writable, C-ordered, aligned NumPy array (`host_array`: a
    copy unless it is one already); the other fields as they are."""
    return m.replace(comoment=host_array(m.comoment))


def _host_comoment(m: stats.Moments) -> np.ndarray:
    c = m.comoment
    if not _is_host(c):
        raise ValueError(
            "expected statistics whose co-moment is a writable, C-ordered, aligned float32/float64 "
            f"NumPy array (`to_host`), got {type(c).__name__}"
        )
    return c


@jax.jit
def _fold(small: stats.Moments, z: jax.Array, w: jax.Array):
    dtype = small.mean.dtype
    b = stats.fold_batch(small.count, small.mean, z.astype(dtype), w.astype(dtype))
    left, right = stats.gram_factors(small.count, b)
    return b._replace(zc=None, zw=None), left, right


@jax.jit
def _rows(small: stats.Moments, b: stats.Batch, left, right, diag, c_a):
    n = b.w.shape[0]  # the last two rows of left and right are the mean shifts
    b = b._replace(zw=left[:n], zc=right[:n])
    return stats.fold_rows(small, b, diag, c_a)


def _block_matvec_upper(c: np.ndarray, v: np.ndarray, sizes) -> np.ndarray:
    """`stats._block_matvec_upper` of a host co-moment: [D, K] whose column k is the product
    of the symmetric matrix's column block k with v's block k, read from the upper blocks."""
    out = np.empty((c.shape[0], len(sizes)), c.dtype)
    for k, (lo, hi) in enumerate(_bounds(sizes)):
        out[:hi, k] = c[:hi, lo:hi] @ v[lo:hi]  # rows of networks ≤ k: column block k
        out[hi:, k] = v[lo:hi] @ c[lo:hi, hi:]  # rows of networks > k: row block k
    return out


def add_upper_gram(c: np.ndarray, left: np.ndarray, right: np.ndarray, sizes) -> None:
    """``c += leftᵀ right`` on the upper blocks of ``c`` [D, D] (C order), in place: one BLAS
    ``?gemm`` per network's block row. ``left``, ``right``: [N, D], C order, c's dtype."""
    d = c.shape[0]
    gemm = lapack.gemm(c.dtype.name)
    real = lapack.real_pointer(c.dtype.name)
    for a in (left, right):
        if a.dtype != c.dtype or a.ndim != 2 or a.shape[1] != d or not a.flags.c_contiguous:
            raise ValueError(f"expected C-ordered [N, {d}] {c.dtype} factors, got {a.shape}")
    ref = ctypes.byref
    one = (ctypes.c_float if c.dtype == np.float32 else ctypes.c_double)(1.0)
    n, ld = ctypes.c_int(left.shape[0]), ctypes.c_int(d)
    step = c.itemsize
    for lo, hi in _bounds(sizes):
        # In column-major terms c's block row a, c[lo:hi, lo:], is the [D - lo, D_a] matrix
        # at &c[lo, lo] with leading dimension D; it gains right[:, lo:]ᵀ left[:, lo:hi].
        gemm(
            b"N", b"T", ref(ctypes.c_int(d - lo)), ref(ctypes.c_int(hi - lo)), ref(n), ref(one),
            ctypes.cast(right.ctypes.data + lo * step, real), ref(ld),
            ctypes.cast(left.ctypes.data + lo * step, real), ref(ld), ref(one),
            ctypes.cast(c.ctypes.data + (lo * d + lo) * step, real), ref(ld),
        )  # fmt: skip


def update(m: stats.Moments, z, *, where=None) -> stats.Moments:
    """``stats.update(m, z, where=where, upper=True)`` with m's host co-moment (`to_host`)
    updated in place by BLAS; returns the new statistics, which share it."""
    c = _host_comoment(m)
    d = c.shape[0]
    z = z if isinstance(z, np.ndarray | jax.Array) else np.asarray(z)  # jit takes either as is
    if z.ndim != 2 or z.shape[1] != d:
        raise ValueError(f"expected z of shape [N, D={d}], got {z.shape}")
    w = stats.frame_weights(where, z.shape[0], c.dtype)
    small = m.replace(comoment=None)
    b, left, right = _fold(small, z, w)
    # The two reads of the old co-moment, before the Gram is added to it.
    c_a = _block_matvec_upper(c, np.asarray(b.delta_a), m.sizes)
    diag = np.diagonal(c).copy()
    row_cross, row_gram = _rows(small, b, left, right, diag, c_a)  # dispatched, not waited for
    add_upper_gram(c, np.asarray(left), np.asarray(right), m.sizes)  # views of CPU buffers
    return m.replace(count=b.count, mean=b.mean, comoment=c, row_cross=row_cross, row_gram=row_gram)


def mirror_upper(m: stats.Moments) -> stats.Moments:
    """`stats.mirror_upper` of a host co-moment, in place: each network's lower blocks copied
    from its upper ones, 768-column tiles at a time (a whole transposed copy strides through
    memory)."""
    c = _host_comoment(m)
    d = c.shape[0]
    for lo, hi in _bounds(m.sizes):
        for start in range(hi, d, _TILE):
            stop = min(start + _TILE, d)
            c[start:stop, lo:hi] = c[lo:hi, start:stop].T
    return m
