"""BLAS and LAPACK routines of scipy's Cython API (``scipy.linalg.cython_blas`` and
``cython_lapack``) as ctypes functions.

Two things scipy's own Python wrappers do not give: ctypes releases the GIL for the call (so
threads can factorise or multiply in parallel), and the routines take raw pointers with leading
dimensions, so a product can be added in place into a block of a larger array
(`sslsim_jax.host_stats`). Each lookup returns None where the routine cannot be found; callers
fall back to NumPy or XLA.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["gemm", "real_pointer", "routine"]

_INT = ctypes.POINTER(ctypes.c_int)


def real_pointer(dtype: str):
    """The ctypes pointer type of a float32 or float64 array's data."""
    return ctypes.POINTER(ctypes.c_float if dtype == "float32" else ctypes.c_double)


@functools.cache
def _address(module: str, name: str) -> int | None:
    try:
        if module == "blas":
            from scipy.linalg import cython_blas as lib
        else:
            from scipy.linalg import cython_lapack as lib
        capsule = lib.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        pointer = ctypes.pythonapi.PyCapsule_GetPointer
        pointer.restype = ctypes.c_void_p
        pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        return pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):
        return None


def routine(module: str, name: str, *argtypes):
    """``scipy.linalg.cython_<module>``'s routine ``name`` ("blas" or "lapack", e.g.
    ``"sgesdd"``) as a ctypes function of ``argtypes`` returning nothing, or None."""
    address = _address(module, name)
    return None if address is None else ctypes.CFUNCTYPE(None, *argtypes)(address)


@functools.cache
def gemm(dtype: str):
    """BLAS ``?gemm`` for float32/float64 (``C ← αAB + βC``, column-major, Fortran
    arguments by reference), or None."""
    if dtype not in ("float32", "float64"):
        return None
    real = real_pointer(dtype)
    chars, ints = (ctypes.c_char_p,) * 2, (_INT,) * 3
    args = (*chars, *ints, real, real, _INT, real, _INT, real, real, _INT)
    return routine("blas", {"float32": "sgemm", "float64": "dgemm"}[dtype], *args)
