"""Tests of sslsim_jax.host_stats: the BLAS update equals `stats.update`'s streaming form."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax import distributed, host_stats, stats
from sslsim_jax.analysis import Settings, analyze
from tests.test_pipeline import SPEECH, models  # noqa: F401  (models: a fixture)
from tests.test_stats import assert_matches, fields, reference

# Frames of equal-length batches, so that each jitted update compiles once per example.
_streamed = jax.jit(lambda m, z, w: stats.update(m, z, where=w, upper=True))


def batches(sizes, seed, shift, lengths=(8, 8, 8)):
    rng = np.random.default_rng(seed)
    d = sum(sizes)
    zs = [
        rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + k * shift for k, n in enumerate(lengths)
    ]
    ws = [(rng.random(len(z)) > 0.3).astype(np.float64) for z in zs]
    return zs, ws


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([1, 3, 8, 16]), min_size=1, max_size=5),
    shift=st.sampled_from([0.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_float64_equals_the_streaming_update_and_the_reference(sizes, shift, seed):
    # Whatever the strictly lower blocks hold (garbage here), the BLAS update reads and writes
    # only the upper ones, as `stats.update(upper=True)` does; mirrored, both are the float64
    # reference.
    sizes = tuple(sizes)
    zs, ws = batches(sizes, seed, shift)
    seg = stats.segment_ids(sizes)
    lower = seg[:, None] > seg[None, :]
    garbage = np.random.default_rng(seed + 1).normal(size=lower.shape) * 1e3
    with jax.enable_x64(True):
        first = stats.moments(zs[0], where=ws[0], sizes=sizes)
        first = first.replace(comoment=np.where(lower, garbage, first.comoment))
        streamed, host = first, host_stats.to_host(first)
        for z, w in zip(zs[1:], ws[1:], strict=True):
            streamed = _streamed(streamed, z, w)
            host = host_stats.update(host, z, where=w)
        assert isinstance(host.comoment, np.ndarray)
        np.testing.assert_array_equal(host.comoment[lower], garbage[lower])  # left as they were
        chex.assert_trees_all_close(host, streamed, rtol=1e-10, atol=1e-8)
        mirrored = host_stats.mirror_upper(host)
        chex.assert_trees_all_close(mirrored, stats.mirror_upper(streamed), rtol=1e-10, atol=1e-8)
        assert_matches(mirrored, reference(np.concatenate(zs), np.concatenate(ws), sizes), 1e-10)


def test_float32_equals_the_jitted_update_on_wide_networks():
    # Widths above one mirror tile (768) and a large mean: the float32 products agree with
    # XLA's to rounding, and both with the float64 reference.
    sizes = (800, 64, 800)
    zs, ws = batches(sizes, 0, 30.0, lengths=(40, 33, 17))
    zs = [z.astype(np.float32) for z in zs]
    streamed, host = stats.init(sizes), host_stats.to_host(stats.init(sizes))
    for z, w in zip(zs, ws, strict=True):
        streamed = _streamed(streamed, z, w)
        host = host_stats.update(host, z, where=w)
    streamed, host = stats.mirror_upper(streamed), host_stats.mirror_upper(host)
    for got, want in zip(fields(host), fields(streamed), strict=True):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale)
    ref = reference(np.concatenate(zs), np.concatenate(ws), sizes)
    assert_matches(host, ref, 2e-5)


def test_bad_input_is_named():
    m = stats.init((3, 2))
    with pytest.raises(ValueError, match="writable, C-ordered, aligned .* NumPy array .*ArrayImpl"):
        host_stats.update(m, np.zeros((4, 5), np.float32))  # the co-moment is a jax array
    h = host_stats.to_host(m)
    with pytest.raises(ValueError, match=r"expected z of shape \[N, D=5\], got \(4, 6\)"):
        host_stats.update(h, np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match=r"expected where of shape \[N\] = \(4,\)"):
        host_stats.update(h, np.zeros((4, 5), np.float32), where=np.ones(3))
    read_only = h.replace(comoment=np.asarray(jnp.zeros((5, 5))))
    with pytest.raises(ValueError, match="writable"):
        host_stats.update(read_only, np.zeros((4, 5), np.float32))
    c = host_stats.host_array(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected C-ordered \[N, 5\] float32 factors"):
        host_stats.add_upper_gram(c, np.zeros((4, 5)), np.zeros((4, 5)), (3, 2))  # float64
    with pytest.raises(ValueError, match=r"expected C-ordered \[N, 5\] float32 factors, got"):
        host_stats.add_upper_gram(c, np.zeros((5, 4), np.float32).T, np.zeros((4, 5)), (3, 2))
    np.testing.assert_array_equal(c, 0)  # refused before anything was added


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_arrays_are_zeroed_aligned_and_writable(dtype):
    z = host_stats.mapped_zeros((300, 7), dtype)
    assert z.shape == (300, 7) and z.dtype == dtype and z.flags.c_contiguous and z.flags.writeable
    assert z.ctypes.data % host_stats.ALIGN == 0 and not z.any()
    x = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]  # strided, another dtype
    c = host_stats.host_array(x, dtype)
    assert c.dtype == dtype and c.flags.c_contiguous and c.ctypes.data % host_stats.ALIGN == 0
    np.testing.assert_array_equal(c, x)
    assert host_stats.host_array(c) is c  # already one: no copy
    c[0, 0] = 5.0  # its own memory
    assert x[0, 0] == 0.0


def test_applies_to_one_cpu_device_and_a_blas_dtype():
    mesh = distributed.make_mesh(1, local=True)
    assert host_stats.applies(mesh, np.float32) and host_stats.applies(mesh, np.float64)
    assert not host_stats.applies(mesh, jnp.bfloat16)


def test_an_analysis_equals_the_jitted_update(models, tmp_path, monkeypatch):  # noqa: F811
    # The same run through the XLA update (host path turned off) gives the same table, the
    # row-norm accumulators (debiased CKA) and the mirrored co-moment (SVCCA, linreg) included.
    settings_ = Settings(
        metrics=("linear_cka", "debiased_cka", "svcca", "linreg"), batch_seconds=2.0
    )
    calls = []
    update = host_stats.update
    monkeypatch.setattr(host_stats, "update", lambda *a, **k: calls.append(1) or update(*a, **k))
    host = analyze(models, SPEECH[:2], tmp_path / "host", settings_, progress=False, report=False)
    assert len(calls) > 1  # several batches went through the BLAS update
    monkeypatch.setattr(host_stats, "applies", lambda *a: False)
    xla = analyze(models, SPEECH[:2], tmp_path / "xla", settings_, progress=False, report=False)
    assert len(host) == len(xla) > 0
    np.testing.assert_allclose(host.value, xla.value, atol=2e-5)
