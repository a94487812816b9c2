"""Tests of sslsim_jax.stats against float64 NumPy references written here."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax import stats
from tests.conftest import run_on_devices

SIZES = (3, 5, 4)
_update = jax.jit(stats.update, static_argnames="upper")
# Jitted for the examples of many shapes: one program each instead of every op compiled
# eagerly for each new shape (about half the time).
_moments = jax.jit(stats.moments, static_argnames="sizes")
_merge = jax.jit(stats.merge)
_mirror_upper = jax.jit(stats.mirror_upper)


def reference(z, w, sizes):
    """float64: count, mean, centred co-moment, Σ w (z-μ) rᵀ, Σ w r rᵀ (r: row norms² per net)."""
    z = np.asarray(z, np.float64)
    w = np.asarray(w, np.float64)
    n = w.sum()
    mu = w @ z / n
    zc = z - mu
    seg = np.repeat(np.arange(len(sizes)), sizes)
    r = np.stack([(zc[:, seg == k] ** 2).sum(1) for k in range(len(sizes))], 1)
    return n, mu, (zc * w[:, None]).T @ zc, (zc * w[:, None]).T @ r, (r * w[:, None]).T @ r


def data(n=120, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    d = sum(SIZES)
    z = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift
    w = (rng.random(n) > 0.25).astype(np.float64)
    return z, w


def fields(m):
    return m.count, m.mean, m.comoment, m.row_cross, m.row_gram


def assert_matches(m, ref, rtol):
    for got, want in zip(fields(m), ref, strict=True):
        want = np.asarray(want)
        scale = max(np.abs(want).max(), 1.0)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=rtol * scale, rtol=0)


def test_one_batch_float64_with_weights():
    z, w = data()
    with jax.enable_x64(True):
        m = stats.moments(z, where=w, sizes=SIZES)
        assert_matches(m, reference(z, w, SIZES), 1e-12)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(cuts=st.lists(st.integers(1, 119), max_size=6, unique=True))
def test_streaming_any_chunking_equals_one_pass(cuts):
    # Chunks are weight masks over fixed-shape arrays so that one compiled update serves every
    # example; `test_mask_equals_slicing_and_jit` covers masks == slices.
    z, w = data(shift=3.0)
    bounds = [0, *sorted(cuts), len(z)]
    index = np.arange(len(z))
    with jax.enable_x64(True):
        m = stats.init(SIZES, jnp.float64)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            m = _update(m, z, where=w * ((index >= lo) & (index < hi)))
        assert_matches(m, reference(z, w, SIZES), 1e-11)


def test_merge_is_order_free():
    z, w = data()
    with jax.enable_x64(True):
        parts = [
            stats.moments(z[i : i + 30], where=w[i : i + 30], sizes=SIZES) for i in (0, 30, 60, 90)
        ]
        left = stats.merge(stats.merge(stats.merge(parts[0], parts[1]), parts[2]), parts[3])
        tree = stats.merge(stats.merge(parts[3], parts[1]), stats.merge(parts[2], parts[0]))
        chex.assert_trees_all_close(left, tree, rtol=1e-12, atol=1e-9)


def test_merge_with_empty_and_all_masked_batches():
    z, w = data()
    with jax.enable_x64(True):
        m = stats.merge(stats.init(SIZES, jnp.float64), stats.moments(z, where=w, sizes=SIZES))
        m = stats.update(m, z[:10], where=np.zeros(10))
        assert_matches(m, reference(z, w, SIZES), 1e-12)


def about(z, w, sizes, centre):
    """float64 co-moment, Σ w (z-c) rᵀ, Σ w r rᵀ about a given centre c."""
    zc = np.asarray(z, np.float64) - np.asarray(centre, np.float64)
    seg = np.repeat(np.arange(len(sizes)), sizes)
    r = np.stack([(zc[:, seg == k] ** 2).sum(1) for k in range(len(sizes))], 1)
    return (zc * w[:, None]).T @ zc, (zc * w[:, None]).T @ r, (r * w[:, None]).T @ r


def test_float32_large_mean_matches_float64():
    # wav2vec 2.0 outlier dimensions: |mean| >> std. Here |mean| = 1e4, std 1. A float32 mean of
    # 1e4 is only known to 1 ulp (~1e-3), so the accumulators are checked about the centre they
    # store (translation-invariant metrics need exactly that), the co-moment also about the
    # exact mean (it depends on the centre only to second order).
    rng = np.random.default_rng(1)
    z = (rng.normal(size=(2000, 12)) + 1e4 * rng.choice([-1, 1], 12)).astype(np.float32)
    w = np.ones(len(z))
    exact = reference(z, w, (5, 7))
    m = stats.init((5, 7))
    for i in range(0, 2000, 300):
        m = stats.update(m, z[i : i + 300])
    assert m.comoment.dtype == jnp.float32
    n = exact[0]
    np.testing.assert_allclose(np.asarray(m.mean), exact[1], atol=2e-3)  # 2 ulps at 1e4
    np.testing.assert_allclose(np.asarray(m.comoment) / n, exact[2] / n, atol=1e-4)
    comoment, row_cross, row_gram = about(z, w, (5, 7), m.mean)
    np.testing.assert_allclose(np.asarray(m.comoment) / n, comoment / n, atol=1e-4)
    r_scale = np.abs(row_gram).max() / n
    np.testing.assert_allclose(np.asarray(m.row_gram) / n, row_gram / n, atol=1e-4 * r_scale)
    np.testing.assert_allclose(
        np.asarray(m.row_cross) / n, row_cross / n, atol=1e-4 * np.sqrt(r_scale)
    )


def test_bfloat16_accumulates_in_float32():
    z, _ = data()
    zb = jnp.asarray(z + 100.0, jnp.bfloat16)
    m = stats.moments(zb, sizes=SIZES)
    assert m.comoment.dtype == jnp.float32
    want = reference(np.asarray(zb.astype(jnp.float32)), np.ones(len(z)), SIZES)
    np.testing.assert_allclose(np.asarray(m.comoment), want[2], atol=1e-4 * np.abs(want[2]).max())


def test_mask_equals_slicing_and_jit():
    z, w = data()
    keep = w > 0
    f = jax.jit(stats.moments, static_argnames="sizes")
    masked = f(z.astype(np.float32), where=keep, sizes=SIZES)
    sliced = f(z[keep].astype(np.float32), sizes=SIZES)
    chex.assert_trees_all_close(masked, sliced, rtol=1e-5, atol=1e-4)


def test_update_does_not_retrace():
    z, _ = data()
    z = z.astype(np.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(m, batch):
        return stats.update(m, batch)

    m = stats.init(SIZES)
    for i in range(0, 120, 40):
        m = step(m, z[i : i + 40])


def test_select_and_covariance():
    z, w = data()
    with jax.enable_x64(True):
        m = stats.moments(z, where=w, sizes=SIZES)
        sub = stats.select(m, (2, 0))
        cols = np.r_[8:12, 0:3]
        want = reference(z[:, cols], w, (4, 3))
        assert sub.sizes == (4, 3)
        assert_matches(sub, want, 1e-12)
        np.testing.assert_allclose(
            stats.covariance(m),
            np.cov(z, rowvar=False, aweights=w, ddof=0) * w.sum() / (w.sum() - 1),
            rtol=1e-10,
        )


def test_input_errors():
    with pytest.raises(ValueError, match=r"expected z of shape \[N, D\], got \(3,\)"):
        stats.moments(jnp.ones(3))
    with pytest.raises(ValueError, match="sizes summing to D=4"):
        stats.moments(jnp.ones((5, 4)), sizes=(1, 2))
    with pytest.raises(ValueError, match=r"expected where of shape \[N\]"):
        stats.moments(jnp.ones((5, 4)), where=jnp.ones(4))
    with pytest.raises(ValueError, match="equal network sizes"):
        stats.merge(stats.init((2,)), stats.init((1, 1)))
    with pytest.raises(ValueError, match=r"expected z of shape \[N, D=4\], got \(5, 3\)"):
        stats.update(stats.init((2, 2)), jnp.ones((5, 3)))


_PSUM_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from sslsim_jax import stats
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(400, 6)) + 1e3).astype(np.float32)
    w = (rng.random(400) > 0.3).astype(np.float32)
    w[:100] = 0  # one device sees only padding
    mesh = jax.make_mesh((4,), ("data",))

    def local(zb, wb):
        return stats.psum(stats.moments(zb, where=wb, sizes=(2, 4)), "data")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
    shard = jax.sharding.NamedSharding(mesh, P("data"))
    got = f(jax.device_put(z, shard), jax.device_put(w, shard))
    want = stats.moments(z, where=w, sizes=(2, 4))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, np.abs(b).max()), rtol=0)
    print("ok")
    """
)


def test_psum_over_fake_devices_equals_one_pass():
    out = run_on_devices(_PSUM_SCRIPT, devices=4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def _dot_precisions(fn, *args) -> set[str]:
    """The precision of every dot in fn's lowered program (StableHLO text)."""
    text = jax.jit(fn).lower(*args).as_text()
    found = set()
    for line in text.splitlines():
        if "dot_general" in line:
            found.add(line.split("precision = [")[1].split(",")[0] if "precision" in line else "")
    return found


def test_metric_matmuls_are_highest_unless_the_caller_sets_a_precision():
    z = jnp.ones((6, 3))
    assert _dot_precisions(lambda z: stats.moments(z).comoment, z) == {"HIGHEST"}
    with jax.default_matmul_precision("bfloat16"):
        assert stats.matmul_precision() is None
        assert _dot_precisions(lambda z: stats.moments(z).comoment, z) == {"DEFAULT"}
    with jax.default_matmul_precision("tensorfloat32"):
        assert _dot_precisions(lambda z: stats.moments(z).comoment, z) == {"HIGH"}
    assert stats.matmul_precision() == jax.lax.Precision.HIGHEST


def vmap_update_replicates(m, z, weights):
    """The pipeline's replicate update before `stats.update_replicates`: one vmap."""
    return jax.vmap(lambda mr, w: stats.update(mr, z, where=w))(m, weights)


def replicates_of(r, d, sizes):
    """R identical replicates of statistics with a large mean, stacked [R, ...]."""
    base = stats.moments(jax.random.normal(jax.random.key(1), (50, d)) + 3.0, sizes=sizes)
    return jax.tree.map(lambda a: jnp.stack([a] * r), base)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 6])
def test_update_replicates_equals_vmap(chunk):
    r, n, sizes = 6, 40, (3, 5)
    m = replicates_of(r, sum(sizes), sizes)
    z = jax.random.normal(jax.random.key(2), (n, sum(sizes))) * 2.0 + 5.0
    weights = jnp.asarray(np.random.default_rng(0).poisson(1.0, (r, n)), jnp.float32)
    expected = jax.jit(vmap_update_replicates)(m, z, weights)
    actual = jax.jit(lambda m, z, w: stats.update_replicates(m, z, w, chunk=chunk))(m, z, weights)
    for field in ("count", "mean", "comoment", "row_cross", "row_gram"):
        a, e = getattr(actual, field), getattr(expected, field)
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4 * float(jnp.abs(e).max()))


def test_update_replicates_input_errors():
    m = replicates_of(3, 4, (4,))
    z = jnp.zeros((5, 4))
    with pytest.raises(ValueError, match="weights"):
        stats.update_replicates(m, z, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="chunk"):
        stats.update_replicates(m, z, jnp.ones((3, 5)), chunk=0)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([1, 3, 8, 16]), min_size=1, max_size=5),
    shift=st.sampled_from([0.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_update_equals_merge_of_the_batch_moments(sizes, shift, seed):
    # `update` adds the batch's Gram and both rank-one shifts to the co-moment in place and
    # shifts the row-norm accumulators with block products (runs of equal widths together,
    # 8 lanes when the width allows); `merge` forms the batch's statistics first. Same
    # identities: float64 agreement to rounding, and with the float64 reference.
    sizes = tuple(sizes)
    rng = np.random.default_rng(seed)
    d = sum(sizes)
    z1 = rng.normal(size=(9, d)) * rng.uniform(0.5, 2, d) + shift
    z2 = rng.normal(size=(7, d)) * rng.uniform(0.5, 2, d) + 2 * shift
    w2 = (rng.random(7) > 0.3).astype(np.float64)
    with jax.enable_x64(True):
        m = _moments(z1, sizes=sizes)
        got = _update(m, z2, where=w2)
        want = _merge(m, _moments(z2, where=w2, sizes=sizes))
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-8)
        z, w = np.concatenate([z1, z2]), np.r_[np.ones(9), w2]
        assert_matches(got, reference(z, w, sizes), 1e-10)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([1, 3, 8, 16]), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_upper_block_streaming_ignores_the_lower_blocks_and_mirrors_to_update(sizes, seed):
    # The streaming form reads and writes only the upper blocks: whatever the strictly lower
    # blocks hold (garbage here) changes nothing, and `mirror_upper` makes it whole.
    sizes = tuple(sizes)
    rng = np.random.default_rng(seed)
    d = sum(sizes)
    batches = [
        rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + k for k, n in enumerate((9, 7, 5))
    ]
    weights = [(rng.random(len(z)) > 0.3).astype(np.float64) for z in batches]
    seg = stats.segment_ids(sizes)
    lower = seg[:, None] > seg[None, :]
    with jax.enable_x64(True):
        full = _moments(batches[0], where=weights[0], sizes=sizes)
        streamed = full.replace(
            comoment=np.where(lower, rng.normal(size=(d, d)) * 1e3, full.comoment)
        )
        for z, w in zip(batches[1:], weights[1:], strict=True):
            full = _update(full, z, where=w)
            streamed = _update(streamed, z, where=w, upper=True)
        mirrored = _mirror_upper(streamed)
        chex.assert_trees_all_close(mirrored, full, rtol=1e-10, atol=1e-8)
        z, w = np.concatenate(batches), np.concatenate(weights)
        assert_matches(mirrored, reference(z, w, sizes), 1e-10)


def test_upper_block_replicates_mirror_to_update_replicates():
    z, w = data()
    weights = np.stack([w, w * (np.arange(len(w)) % 3), np.ones_like(w)])  # [R=3, N]
    with jax.enable_x64(True):
        m = jax.tree.map(lambda a: jnp.stack([a] * 3), stats.init(SIZES, jnp.float64))
        full, streamed = m, m
        for lo in (0, 40, 80):
            part = np.zeros_like(weights)
            part[:, lo : lo + 40] = weights[:, lo : lo + 40]
            full = stats.update_replicates(full, z, part, chunk=1)
            streamed = stats.update_replicates(streamed, z, part, chunk=1, upper=True)
        chex.assert_trees_all_close(stats.mirror_upper(streamed), full, rtol=1e-10, atol=1e-8)
        assert not np.allclose(streamed.comoment, full.comoment)  # the lower blocks were left
