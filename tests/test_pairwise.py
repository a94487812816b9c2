"""Tests of sslsim_jax.compare: all pairs at once equal the pair functions."""

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


def test_pair_svd_at_each_blocks_shape_equals_the_padded_svd():
    """`kernels.pair_svd` factorises each matrix at its leading [rows, cols] block (on a CPU,
    on the host): the first min(rows, cols) triplets are the padded SVD's, the rest 0, under
    jit and vmap alike; a NaN block gives NaN singular values, not a crash."""
    from sslsim_jax.metrics import kernels

    rng = np.random.default_rng(3)
    rows, cols = np.array([[5, 2, 7, 0], [7, 7, 3, 1]]), np.array([[3, 6, 7, 4], [7, 1, 2, 1]])
    mat = np.zeros((2, 4, 7, 7), np.float32)
    for i, j in np.ndindex(rows.shape):
        mat[i, j, : rows[i, j], : cols[i, j]] = rng.normal(size=(rows[i, j], cols[i, j]))
    u, s, vt = jax.jit(jax.vmap(kernels.pair_svd))(mat, rows, cols)
    s_ref = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
    for i, j in np.ndindex(rows.shape):
        k = min(rows[i, j], cols[i, j])
        np.testing.assert_allclose(s[i, j, :k], s_ref[i, j, :k], rtol=1e-5, atol=1e-6)
        assert not np.asarray(s[i, j, k:]).any()
        # The triplets rebuild the matrix; vectors are orthonormal and 0 outside the block.
        rebuilt = (u[i, j] * s[i, j]) @ vt[i, j]
        np.testing.assert_allclose(rebuilt, mat[i, j], atol=1e-5)
        np.testing.assert_allclose(u[i, j, :, :k].T @ u[i, j, :, :k], np.eye(k), atol=1e-5)
        assert not np.asarray(u[i, j, rows[i, j] :]).any()
        assert not np.asarray(vt[i, j, :, cols[i, j] :]).any()
    mat[0, 0, 0, 0] = np.nan
    s = kernels.pair_svd(jax.numpy.asarray(mat[0]), rows[0], cols[0])[1]
    assert np.isnan(s[0, :3]).all() and np.isfinite(s[1:]).all()
