"""Tests of sslsim_jax.compare: all pairs at once equal the pair functions."""

import re
import warnings

import jax
import numpy as np
import pytest

from sslsim_jax import metrics, stats
from sslsim_jax.metrics.kernels import UndefinedSimilarityWarning
from sslsim_jax.pairwise import METRICS, compare, compare_moments


def networks(n=150, seed=0):
    """Three networks of mixed widths sharing a latent, with independent noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 10))
    out = {}
    for name, d in [("m:0", 8), ("m:1", 8), ("other:3", 11)]:
        out[name] = latent @ rng.normal(size=(10, d)) + 0.8 * rng.normal(size=(n, d)) + 5.0
    return out


PAIR = {
    "maxcorr": lambda x, y: metrics.maxcorr(x, y).score,
    "linreg": metrics.linreg,
    "svcca": metrics.svcca,
    "pwcca": metrics.pwcca,
    "linear_cka": metrics.linear_cka,
    "debiased_cka": metrics.debiased_cka,
    "procrustes": metrics.procrustes,
    "rbf_cka": metrics.rbf_cka,
}


def test_compare_equals_pair_functions_for_every_ordered_pair():
    nets = networks()
    with jax.enable_x64(True):
        df = compare(nets, metrics=METRICS)
        assert list(df.columns) == ["network_a", "network_b", "metric", "value"]
        assert len(df) == len(METRICS) * 9
        for row in df.itertuples():
            if row.network_a == row.network_b:
                want = 0.0 if row.metric == "procrustes" else 1.0
            else:
                want = float(PAIR[row.metric](nets[row.network_a], nets[row.network_b]))
            np.testing.assert_allclose(row.value, want, atol=1e-8, err_msg=str(row))


def test_streamed_batches_with_masks_equal_one_pass():
    nets = networks()
    mask = np.random.default_rng(1).random(150) > 0.2
    names = ("maxcorr", "linreg", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes")
    with jax.enable_x64(True):
        one = compare({k: v[mask] for k, v in nets.items()}, metrics=names)
        batches = [
            ({k: v[lo : lo + 40] for k, v in nets.items()}, mask[lo : lo + 40])
            for lo in range(0, 150, 40)
        ]
        streamed = compare(iter(batches), metrics=names)
    np.testing.assert_allclose(streamed.value, one.value, atol=1e-9)


def test_float32_default_and_constant_network_warns():
    nets = {k: v.astype(np.float32) for k, v in networks().items()}
    nets["dead"] = np.zeros((150, 4), np.float32)
    with pytest.warns(UndefinedSimilarityWarning, match="no varying neuron in dead"):
        df = compare(nets)
    dead = (df.network_a == "dead") | (df.network_b == "dead")
    assert df.value[dead].isna().all()  # undefined, never 0
    assert np.isfinite(df.value[~dead]).all()
    got = df.query("network_a == 'm:0' and network_b == 'm:1' and metric == 'linear_cka'")
    np.testing.assert_allclose(
        got.value.item(), float(metrics.linear_cka(nets["m:0"], nets["m:1"])), atol=1e-6
    )


def test_errors():
    nets = networks()
    with pytest.raises(ValueError, match="unknown metric.*cosine"):
        compare(nets, metrics=("cosine",))
    with pytest.raises(ValueError, match=r"expected m:1 of shape \[N, D\]"):
        compare({"m:0": nets["m:0"], "m:1": nets["m:1"][:10]})
    with warnings.catch_warnings(), pytest.raises(ValueError, match="rbf_cka needs a single"):
        compare([nets, nets], metrics=("rbf_cka",))


def test_metrics_topk_and_neurons_in_one_call_equal_pair_functions():
    """`compare_moments` computes the metrics, their top-k and the matched neurons from one set
    of per-neuron and per-direction values; each equals its pair function. The networks keep
    different numbers of SVCCA directions, so the shared SVD width is wider than most need."""
    rng = np.random.default_rng(5)
    nets = {}
    for name, rank in [("a", 150), ("b", 20), ("c", 90)]:
        basis = np.linalg.qr(rng.normal(size=(160, rank)))[0].T  # orthonormal [rank, 160]
        nets[name] = rng.normal(size=(600, rank)) @ basis + 1e-3 * rng.normal(size=(600, 160))
    names = list(nets)
    topk = ("linreg", "svcca", "pwcca")
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = stats.joint_moments([nets[n] for n in names])
        got = compare_moments(m, names, metrics=("svcca", "pwcca", "linreg"), neurons=True,
                              topk=topk, ks=(0.5, 1.0))  # fmt: skip
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                x, y = nets[a], nets[b]
                for metric in ("svcca", "pwcca", "linreg"):
                    want = 1.0 if i == j and metric != "linreg" else PAIR[metric](x, y)
                    np.testing.assert_allclose(got[metric][i, j], want, atol=1e-8)
                    want = metrics.topk(x, y, metric, (0.5, 1.0))
                    np.testing.assert_allclose(got[f"topk:{metric}"][i, j], want, atol=1e-8)
                match = metrics.maxcorr(x, y)
                np.testing.assert_allclose(got["best"][i, :, j], match.best, atol=1e-8)
                np.testing.assert_array_equal(got["matched"][i, :, j], match.matched)


def test_host_svd_equals_numpy_and_refuses_nan():
    """`host.svd` (LAPACK gesdd through ctypes, GIL released) gives numpy's singular values and
    triplets that rebuild the matrix, tall and wide, float32 and float64, also from threads;
    a NaN matrix raises instead of giving numbers."""
    from concurrent.futures import ThreadPoolExecutor

    from sslsim_jax.metrics import host

    rng = np.random.default_rng(3)
    mats = [rng.normal(size=shape) for shape in [(7, 3), (3, 7), (40, 40), (1, 5), (90, 60)]]
    for dtype, tol in [(np.float32, 1e-4), (np.float64, 1e-12)]:
        with ThreadPoolExecutor(2) as pool:
            out = list(pool.map(lambda x, d=dtype: host.svd(x.astype(d)), mats))
        for x, (u, s, vt) in zip(mats, out, strict=True):
            k = min(x.shape)
            assert u.shape == (x.shape[0], k) and s.shape == (k,) and vt.shape == (k, x.shape[1])
            assert u.dtype == s.dtype == vt.dtype == dtype
            np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False), rtol=tol)
            np.testing.assert_allclose((u * s) @ vt, x, atol=tol * 10)
            np.testing.assert_allclose(u.T @ u, np.eye(k), atol=tol * 10)
    bad = mats[2].copy()
    bad[3, 4] = np.nan
    with pytest.raises(np.linalg.LinAlgError):
        host.svd(bad.astype(np.float32))


def test_host_canonical_pairs_equal_the_padded_program():
    """On the host each CCA pair is formed and factorised at its own kept shape, on threads:
    correlations and PWCCA weights equal `kernels.canonical_pairs` (every pair padded to the
    widest, in XLA), for the unordered pairs of all networks and for a row block's pairs; a
    network with NaN statistics gives NaN correlations for its pairs only."""
    from sslsim_jax.metrics import host, kernels

    rng = np.random.default_rng(7)
    # Shared directions of distinct strengths: distinct canonical correlations, so the
    # singular vectors (and PWCCA weights) are defined up to sign.
    latent = rng.normal(size=(400, 12)) * np.geomspace(3, 0.1, 12)
    nets = []
    for rank in (30, 6, 18, 30):  # different numbers of kept directions
        basis = np.linalg.qr(rng.normal(size=(30, rank)))[0].T
        own = rng.normal(size=(400, rank)) * np.linspace(3, 0.5, rank)
        nets.append((own + latent @ rng.normal(size=(12, rank))) @ basis)
    m = stats.joint_moments([jax.numpy.asarray(x, jax.numpy.float32) for x in nets])
    b, s, _ = kernels.prepare(m, variance=0.99, variance_rule="below", rtol=None, spectral=True)
    width = int(np.max(s.kept))
    assert len(set(np.asarray(s.kept).tolist())) > 2
    ia, ib, both = kernels.cca_index(b)
    cases = [(ia, ib, both), (np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4), False)]
    for ia, ib, both in cases:
        want = jax.jit(
            lambda b, s, ia=ia, ib=ib, both=both: kernels.canonical_pairs(
                b, s, ia, ib, width=width, weights=True, both=both
            )
        )(b, s)
        got = host.canonical_pairs(b, s, ia, ib, width=width, weights=True, both=both)
        np.testing.assert_array_equal(got.take, want.take)
        np.testing.assert_allclose(got.rho, want.rho, atol=2e-5)
        other = ia != ib  # a network with itself: every correlation 1, the vectors arbitrary
        for g, w in [(got.weight_ab, want.weight_ab), (got.weight_ba, want.weight_ba)]:
            if not both and g is None:
                assert w is None
                continue
            np.testing.assert_allclose(g[other], w[other], atol=1e-4 * float(np.max(w)))
    assert host.applies(b)
    ia, ib, _ = cases[0]
    bad = b._replace(comoment=b.comoment.at[0, 2, 1, 3].set(np.nan))  # pair (0, 1) only
    got = host.canonical_pairs(bad, s, ia, ib, width=width, weights=False, both=True)
    rho, take = np.asarray(got.rho), np.asarray(got.take)
    hit = (ia == 0) & (ib == 1)
    assert np.isnan(rho[hit][take[hit]]).all()
    assert np.isfinite(rho[~hit]).all() and not rho[~hit][~take[~hit]].any()


def test_svcca_capped_by_the_float32_rank_warns_and_float64_does_not():
    """Activations with many weak directions: in float32 the variance rule asks for directions
    below the numerical rank and SVCCA keeps fewer (a warning names the network and both
    counts); float64 statistics resolve them, keep what the rule asks, and do not warn."""
    from sslsim_jax.metrics import RankCapWarning

    rng = np.random.default_rng(0)
    n, p = 3000, 400
    basis = np.linalg.qr(rng.normal(size=(p, p)))[0]
    # 396 weak directions of variance 5e-7 of the strong ones: above float32 statistics' noise
    # (1e-8), below the default rank tolerance (8 eps = 9.5e-7); the rule at 0.99999 wants them
    x = rng.normal(size=(n, p)) * np.r_[np.ones(4), np.full(p - 4, 7e-4)] @ basis
    y = x @ rng.normal(size=(p, p)) + 0.1 * rng.normal(size=(n, p))
    values = {}
    for x64 in (False, True):
        dtype = np.float64 if x64 else np.float32
        with jax.enable_x64(x64), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            m = stats.joint_moments([jax.numpy.asarray(x, dtype), jax.numpy.asarray(y, dtype)])
            values[x64] = compare_moments(m, ["x", "y"], metrics=("svcca",), variance=0.99999)
            pair = metrics.svcca(x.astype(dtype), y.astype(dtype), variance=0.99999)
        # float32: the two computations of the statistics may cut one direction apart at the cap
        tolerance = dict(rtol=1e-5) if x64 else dict(atol=2e-3)
        np.testing.assert_allclose(pair, values[x64]["svcca"][0, 1], **tolerance)
        capped = [str(w.message) for w in seen if w.category is RankCapWarning]
        if x64:
            assert not capped
        else:
            assert len(capped) == 2  # compare_moments and the pair function
            kept, wanted = map(int, re.search(r"x: (\d+) of (\d+)", capped[0]).groups())
            assert kept < wanted
    assert abs(values[False]["svcca"][0, 1] - values[True]["svcca"][0, 1]) > 1e-3
