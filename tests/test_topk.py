"""Tests of sslsim_jax.metrics.topk against float64 NumPy references written from the definitions
(NumPy corrcoef, lstsq and an SVD-based CCA), not from library code."""

import functools
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslsim_jax import metrics, stats
from sslsim_jax.metrics import kernels

# The module, not the function `metrics.topk` that shadows it in the package namespace.
topk_mod = importlib.import_module("sslsim_jax.metrics.topk")

KS = (0.05, 0.1, 1 / 3, 0.5, 0.77, 0.9, 1.0)


# ---------------------------------------------------------------- float64 NumPy references


def ref_count(k, n):
    # The definition: c = max(1, floor(k n + 1e-9)).
    return max(1, int(np.floor(k * n + 1e-9)))


def ref_top_mean(values, k):
    ordered = np.sort(values)[::-1]
    return ordered[: ref_count(k, len(ordered))].mean()


def ref_maxcorr_neurons(x, y):
    dx = x.shape[1]
    r = np.corrcoef(x.T, y.T)[:dx, dx:]  # [Dx, Dy]
    return np.abs(r).max(axis=1)


def ref_linreg_neurons(x, y):
    design = np.column_stack([y, np.ones(len(y))])  # least squares with intercept
    out = []
    for j in range(x.shape[1]):
        coef, *_ = np.linalg.lstsq(design, x[:, j], rcond=None)
        resid = x[:, j] - design @ coef
        total = ((x[:, j] - x[:, j].mean()) ** 2).sum()
        out.append(np.sqrt(np.clip(1 - (resid**2).sum() / total, 0, 1)))
    return np.asarray(out)


def ref_subspace(x, variance):
    # Standardise, SVD, keep the leading directions whose cumulative variance is strictly
    # below `variance` of the total (at least one): SVCCA's "below" rule.
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc / np.linalg.norm(xc, axis=0), full_matrices=False)
    cum = np.cumsum(s**2)
    return u[:, : max(1, int((cum < variance * cum[-1]).sum()))]


def ref_cca(x, y, variance=0.99):
    """Canonical correlations (descending) and x's PWCCA weights of the kept subspaces."""
    ux, uy = ref_subspace(x, variance), ref_subspace(y, variance)
    u, rho, _ = np.linalg.svd(ux.T @ uy, full_matrices=False)
    m = min(ux.shape[1], uy.shape[1])
    variates = ux @ u[:, :m]  # [N, m] unit-norm canonical variates of x
    weights = np.abs(variates.T @ (x - x.mean(0))).sum(axis=1)
    return rho[:m], weights


def ref_topk(x, y, metric, ks, variance=0.99):
    if metric == "maxcorr":
        return [ref_top_mean(ref_maxcorr_neurons(x, y), k) for k in ks]
    if metric == "linreg":
        return [ref_top_mean(ref_linreg_neurons(x, y), k) for k in ks]
    rho, w = ref_cca(x, y, variance)
    if metric == "svcca":
        return [rho[: ref_count(k, len(rho))].mean() for k in ks]
    out = []
    for k in ks:
        c = ref_count(k, len(rho))  # rho is already descending
        out.append((w[:c] * rho[:c]).sum() / w[:c].sum())
    return out


def data(n, dx, dy, seed=0):
    """x and y sharing a few latent directions, plus noise: neither identical nor unrelated."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    x = latent @ rng.normal(size=(4, dx)) + 0.7 * rng.normal(size=(n, dx))
    y = latent @ rng.normal(size=(4, dy)) + 0.7 * rng.normal(size=(n, dy))
    return x, y


# ---------------------------------------------------------------- against the references


# With N < D and 99 % of the variance, the kept subspaces together exceed the N - 1 dimensions
# of centred data, so several canonical correlations are exactly 1 and their directions (hence
# PWCCA's weights) are not unique; variance 0.5 keeps few enough directions for a unique answer.
@pytest.mark.parametrize("metric", metrics.TOPK_METRICS)
@pytest.mark.parametrize(
    "n, dx, dy, variance", [(300, 10, 7, 0.99), (14, 20, 16, 0.5)], ids=["N>D", "N<D"]
)
def test_float64_matches_reference(metric, n, dx, dy, variance):
    x, y = data(n, dx, dy)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = metrics.topk(x, y, metric, KS, variance=variance)
    want = ref_topk(x, y, metric, KS, variance)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)


def test_float64_saturated_svcca_is_one():
    # N < D at 99 %: the canonical correlations that SVCCA averages are 1 up to rounding.
    x, y = data(14, 20, 16)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = metrics.topk(x, y, "svcca", KS)
    np.testing.assert_allclose(np.asarray(got), ref_topk(x, y, "svcca", KS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("metric", metrics.TOPK_METRICS)
def test_float32_close_to_float64_reference(metric):
    x, y = data(400, 12, 9, seed=1)
    got = metrics.topk(x.astype(np.float32), y.astype(np.float32), metric, KS)
    assert got.shape == (len(KS),) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref_topk(x, y, metric, KS), atol=1e-4, rtol=0)


def test_default_ks_are_tenths():
    # Wu et al.'s curves use k = 0.1, 0.2, ..., 1.0.
    assert metrics.DEFAULT_KS == tuple(i / 10 for i in range(1, 11))
    x, y = data(100, 6, 5)
    assert metrics.topk(x, y, "maxcorr").shape == (10,)


def test_counts_round_exact_products_up():
    # 0.29 * 100 is 28.999999999999996 in float64; the 1e-9 makes it 29, as exact arithmetic
    # says. k n < 1 still averages one value.
    table = topk_mod.counts((0.29, 0.1), 100)
    assert table[0, 100] == 29
    assert table[1, 5] == 1 and table[1, 0] == 1
    assert table[1, 20] == 2


# ---------------------------------------------------------------- k = 1 and monotonicity


@pytest.mark.parametrize("n, dx, dy", [(300, 10, 7), (14, 20, 16)], ids=["N>D", "N<D"])
def test_k1_equals_metric(n, dx, dy):
    x, y = data(n, dx, dy, seed=2)
    x, y = x.astype(np.float32), y.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "maxcorr": metrics.maxcorr(x, y).score,
            "linreg": metrics.linreg(x, y),
            "svcca": metrics.svcca(x, y, variance=0.9, variance_rule="reach"),
            "pwcca": metrics.pwcca(x, y, variance=0.9, variance_rule="reach"),
        }
        for metric, value in expected.items():
            got = metrics.topk(x, y, metric, (1.0,), variance=0.9, variance_rule="reach")
            np.testing.assert_allclose(float(got[0]), float(value), atol=2e-6, rtol=0)


@pytest.mark.parametrize("metric", ["maxcorr", "linreg", "svcca"])
def test_top_fraction_mean_does_not_increase_with_k(metric):
    x, y = data(200, 16, 12, seed=3)
    ks = tuple(np.linspace(0.02, 1.0, 50))
    got = np.asarray(metrics.topk(x.astype(np.float32), y.astype(np.float32), metric, ks))
    assert np.all(np.diff(got) <= 1e-6)
    assert got[0] > got[-1]  # the data are not degenerate: the curve does fall


def test_constant_neuron_is_not_counted():
    # A constant x neuron is excluded from n: top-k of [x, const] equals top-k of x.
    x, y = data(150, 6, 5, seed=4)
    xc = np.column_stack([x, np.full(len(x), 3.0)]).astype(np.float32)
    with pytest.warns(metrics.ConstantNeuronWarning):
        got = metrics.topk(xc, y.astype(np.float32), "maxcorr", KS)
    want = metrics.topk(x.astype(np.float32), y.astype(np.float32), "maxcorr", KS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_where_equals_slicing():
    x, y = data(120, 6, 5, seed=5)
    keep = np.arange(120) % 3 != 0
    got = metrics.topk(x, y, "pwcca", KS, where=keep)
    want = metrics.topk(x[keep], y[keep], "pwcca", KS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_jit():
    x, y = data(100, 6, 5, seed=6)
    f = jax.jit(lambda a, b: metrics.topk(a, b, "linreg", (0.5, 1.0)))
    np.testing.assert_allclose(
        np.asarray(f(x, y)), np.asarray(metrics.topk(x, y, "linreg", (0.5, 1.0))), atol=1e-6
    )


# ---------------------------------------------------------------- all pairs


def networks(seed=7):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(250, 5))
    widths = (6, 9, 5, 9)
    out = [latent @ rng.normal(size=(5, d)) + rng.normal(size=(250, d)) for d in widths]
    out[2][:, 1] = 2.0  # a constant neuron: padding and exclusion meet in one run
    return [x.astype(np.float32) for x in out]


def test_all_pairs_equal_pair_function():
    nets = networks()
    m = stats.joint_moments(nets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = metrics.topk_all_from_moments(m, ks=KS)
        for metric in metrics.TOPK_METRICS:
            assert every[metric].shape == (4, 4, len(KS))
            # Pairs chosen to cover both directions, the constant neuron and a network with
            # itself while keeping the number of compiled shapes small.
            for a, b in [(0, 1), (1, 0), (2, 3), (3, 3)]:
                pair = metrics.topk_from_moments(stats.select(m, [a, b]), metric, KS)
                np.testing.assert_allclose(
                    every[metric][a, b], np.asarray(pair), atol=2e-5, err_msg=metric
                )


def test_all_pairs_at_k1_equal_metric_matrices():
    m = stats.joint_moments(networks())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sslsim_jax import pairwise

        plain = pairwise.compare_moments(m, list("abcd"), metrics=metrics.TOPK_METRICS)
        top = metrics.topk_all_from_moments(m, ks=(1.0,))
    for metric in metrics.TOPK_METRICS:
        np.testing.assert_allclose(top[metric][..., 0], plain[metric], atol=2e-6, err_msg=metric)


def test_row_block_equals_full():
    # A sharded run gives topk_matrices a row block of the statistics and all K spectra.
    m = stats.joint_moments(networks())
    b = kernels.blocks(m)
    s = kernels.spectra(b)
    isd = kernels.inv_sd(b)
    kernel = jax.jit(
        functools.partial(
            metrics.topk_matrices, metrics=metrics.TOPK_METRICS, ks=KS, width=int(jnp.max(s.kept))
        )
    )
    full = kernel(b, s, isd)
    rows = np.array([1, 3])
    part = b._replace(comoment=b.comoment[rows], row_cross=b.row_cross[rows], rows=rows)
    got = kernel(part, s, isd)
    for metric in metrics.TOPK_METRICS:
        assert got[metric].shape == (2, 4, len(KS))
        np.testing.assert_allclose(got[metric], full[metric][rows], atol=2e-5, err_msg=metric)


def test_kernel_jits_once_per_shape():
    m = stats.joint_moments(networks())
    b = kernels.blocks(m)
    s = kernels.spectra(b)
    isd = kernels.inv_sd(b)
    traces = []

    def kernel(b, s, isd):
        traces.append(1)
        return metrics.topk_matrices(b, s, isd, metrics=("svcca", "maxcorr"), ks=KS, width=9)

    f = jax.jit(kernel)
    f(b, s, isd)
    f(b, s, isd)
    assert len(traces) == 1


# ---------------------------------------------------------------- input errors


def test_input_errors():
    x, y = data(50, 4, 3)
    with pytest.raises(ValueError, match="expected metric among"):
        metrics.topk(x, y, "linear_cka")
    with pytest.raises(ValueError, match=r"expected ks, fractions in \(0, 1\]"):
        metrics.topk(x, y, "maxcorr", (0.0, 0.5))
    with pytest.raises(ValueError, match="expected ks"):
        metrics.topk(x, y, "maxcorr", (0.5, 1.5))
    with pytest.raises(ValueError, match="expected ks"):
        metrics.topk(x, y, "maxcorr", ())
    with pytest.raises(ValueError, match=r"expected x of shape \[N, D\], got \(50,\)"):
        metrics.topk(x[:, 0], y, "maxcorr")
    with pytest.raises(ValueError, match="same N frames"):
        metrics.topk(x, y[:10], "maxcorr")
    with pytest.raises(ValueError, match="variance_rule"):
        metrics.topk(x, y, "maxcorr", variance_rule="above")
    with pytest.raises(ValueError, match="variance in"):
        metrics.topk(x, y, "svcca", variance=0.0)
    m = stats.joint_moments([x, y, y])
    with pytest.raises(ValueError, match="expected Moments of 2 networks"):
        metrics.topk_from_moments(m, "svcca")
    with pytest.raises(ValueError, match="expected 3 names"):
        metrics.topk_all_from_moments(m, names=["a"])


def test_vmap_equals_loop():
    pairs = [data(80, 5, 4, seed=s) for s in range(3)]
    ms = [stats.joint_moments([x.astype(np.float32), y.astype(np.float32)]) for x, y in pairs]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *ms)
    got = jax.vmap(lambda m: metrics.topk_from_moments(m, "pwcca", (0.5, 1.0)))(stacked)
    want = np.stack([np.asarray(metrics.topk_from_moments(m, "pwcca", (0.5, 1.0))) for m in ms])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
