"""Tests of sslsim_jax.metrics against float64 NumPy references written here (not library code)."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax import metrics, stats
from sslsim_jax.metrics import kernels

PROPS = settings(max_examples=10, deadline=None, derandomize=True)


# ---------------------------------------------------------------- float64 NumPy references


def ref_standardise(x):
    xc = x - x.mean(0)
    return xc / np.sqrt((xc**2).sum(0))


def ref_maxcorr(x, y):
    r = np.abs(ref_standardise(x).T @ ref_standardise(y))
    return r.max(1).mean(), r.argmax(1)


def ref_linreg(x, y):
    xs = ref_standardise(x)
    yc = y - y.mean(0)
    coef, *_ = np.linalg.lstsq(yc, xs, rcond=None)
    return np.sqrt(np.clip(((yc @ coef) ** 2).sum(0), 0, 1)).mean()


def ref_pcs(x, variance):
    # Reference code of Wu et al.: SVD of the standardised data, keep the directions whose
    # cumulative variance is strictly below `variance` of the total.
    u, s, _ = np.linalg.svd(ref_standardise(x), full_matrices=False)
    cum = np.cumsum(s**2)
    return u[:, : max(int((cum < variance * cum[-1]).sum()), 1)]


def ref_svcca(x, y, variance=0.99):
    return np.linalg.svd(ref_pcs(x, variance).T @ ref_pcs(y, variance), compute_uv=False).mean()


def ref_pwcca(x, y, variance=0.99):
    ux, uy = ref_pcs(x, variance), ref_pcs(y, variance)
    u, rho, _ = np.linalg.svd(ux.T @ uy, full_matrices=False)
    a = np.abs((ux @ u).T @ (x - x.mean(0))).sum(1)
    return (a * rho).sum() / a.sum()


def ref_linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / np.linalg.norm(x.T @ x) / np.linalg.norm(y.T @ y)


def ref_hsic_unbiased(k, l):
    # Song et al. (2012), eq. 5, on the N x N kernels with zeroed diagonals.
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def ref_debiased_cka(x, y, centre=False):
    # Uncentred by default (the estimator is translation invariant, which this checks); centred
    # for |mean| = 1e4, where x xᵀ would cancel catastrophically even in float64.
    if centre:
        x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return ref_hsic_unbiased(k, l) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l, l))


def ref_rbf_cka(x, y, threshold=1.0):
    def gram(a):
        sq = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        g = np.exp(-sq / (2 * threshold**2 * np.median(sq)))
        h = np.eye(len(a)) - 1 / len(a)
        return h @ g @ h

    gx, gy = gram(x), gram(y)
    return (gx * gy).sum() / np.sqrt((gx * gx).sum() * (gy * gy).sum())


def ref_procrustes(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return 2 - 2 * np.linalg.svd(x.T @ y, compute_uv=False).sum()


def correlated(n, dx, dy, seed, shift=0.0):
    """x, y sharing a 6-dim latent, with noise, per-neuron scales and offsets."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    x = latent @ rng.normal(size=(6, dx)) + 0.7 * rng.normal(size=(n, dx))
    y = latent @ rng.normal(size=(6, dy)) + 0.7 * rng.normal(size=(n, dy))
    x = x * rng.uniform(0.5, 3, dx) + shift * rng.choice([-1, 1], dx)
    y = y * rng.uniform(0.5, 3, dy) + rng.normal(size=dy)
    return x, y


def score(name, x, y, **kw):
    out = getattr(metrics, name)(x, y, **kw)
    return out.score if isinstance(out, metrics.NeuronMatch) else out


REFERENCES = {
    "maxcorr": lambda x, y: ref_maxcorr(x, y)[0],
    "linreg": ref_linreg,
    "svcca": ref_svcca,
    "pwcca": ref_pwcca,
    "linear_cka": ref_linear_cka,
    "debiased_cka": ref_debiased_cka,
    "procrustes": ref_procrustes,
    "rbf_cka": ref_rbf_cka,
}
TWINS = ["linreg", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes"]
SYMMETRIC = ["svcca", "linear_cka", "debiased_cka", "procrustes", "rbf_cka"]

# N > D and N < D. PWCCA is left out at N < D: there canonical correlations are degenerate (several
# equal 1), so its weights depend on an arbitrary basis of the tied subspace in any implementation.
CASES = [(160, 12, 9, sorted(REFERENCES)), (10, 14, 12, sorted(set(REFERENCES) - {"pwcca"}))]


@pytest.mark.parametrize(("n", "dx", "dy", "names"), CASES)
def test_float64_matches_reference(n, dx, dy, names):
    x, y = correlated(n, dx, dy, seed=n)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.RankDeficiencyWarning)
        for name in names:
            got = float(score(name, x, y))
            np.testing.assert_allclose(got, REFERENCES[name](x, y), atol=1e-5, err_msg=name)


@pytest.mark.parametrize(("n", "dx", "dy", "names"), CASES)
def test_float32_matches_float64_reference(n, dx, dy, names):
    x, y = correlated(n, dx, dy, seed=n + 1)
    x, y = x.astype(np.float32), y.astype(np.float32)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.RankDeficiencyWarning)
        for name in names:
            got = score(name, x, y)
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(
                float(got), REFERENCES[name](xd, yd), atol=1e-4, err_msg=name
            )


def test_float32_large_mean_within_1e4_of_float64():
    x, y = correlated(400, 10, 8, seed=3, shift=1e4)
    x, y = x.astype(np.float32), y.astype(np.float32)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    refs = dict(REFERENCES, debiased_cka=lambda a, b: ref_debiased_cka(a, b, centre=True))
    for name in ["maxcorr", "linreg", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes"]:
        np.testing.assert_allclose(
            float(score(name, x, y)), refs[name](xd, yd), atol=1e-4, err_msg=name
        )


def test_float32_linreg_of_ill_conditioned_networks_matches_float64():
    """Neurons whose variances span 1 .. 1e-5 (the deep layers of real and random models are
    this ill-conditioned), y a rotation of x: x's weak neurons are predicted only by y's weak
    directions, which float32 statistics resolve and the default rank tolerance keeps. The
    former default (10 · P · eps = 1.1e-4 here) dropped them: 0.83 for 1.0."""
    rng = np.random.default_rng(0)
    n, p = 2000, 96
    xd = rng.normal(size=(n, p)) * np.geomspace(1, 3e-3, p)
    yd = xd @ np.linalg.qr(rng.normal(size=(p, p)))[0] + 1e-5 * rng.normal(size=(n, p))
    x, y = xd.astype(np.float32), yd.astype(np.float32)
    for a, b, ad, bd in ((x, y, xd, yd), (y, x, yd, xd)):
        np.testing.assert_allclose(float(metrics.linreg(a, b)), ref_linreg(ad, bd), atol=1e-3)
    old = float(metrics.linreg(x, y, rtol=10 * p * float(np.finfo(np.float32).eps)))
    assert ref_linreg(xd, yd) - old > 0.1
    np.testing.assert_allclose(float(metrics.svcca(x, y)), ref_svcca(xd, yd), atol=1e-4)


def test_float32_linreg_dropping_resolved_directions_warns():
    """Neuron variances down to 2.5e-7: y's weakest directions lie between eps and the rank
    tolerance (8 eps); the pseudo-inverse drops them, linreg falls short of float64 by 0.07,
    and a RankCapWarning names y with its rank and resolved counts. Variances down to 1e-5
    (previous test) lose nothing and do not warn."""
    rng = np.random.default_rng(0)
    n, p = 2000, 96
    for low, warns in ((3e-3, False), (5e-4, True)):
        xd = rng.normal(size=(n, p)) * np.geomspace(1, low, p)
        yd = xd @ np.linalg.qr(rng.normal(size=(p, p)))[0] + 1e-5 * rng.normal(size=(n, p))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = float(metrics.linreg(xd.astype(np.float32), yd.astype(np.float32)))
        capped = [str(w.message) for w in seen if w.category is metrics.RankCapWarning]
        assert bool(capped) == warns, capped
        if warns:
            rank, resolved = map(int, re.search(r"y: rank (\d+) of (\d+)", capped[0]).groups())
            assert rank < resolved
            assert ref_linreg(xd, yd) - got > 0.01
        else:
            np.testing.assert_allclose(got, ref_linreg(xd, yd), atol=1e-3)


@pytest.mark.parametrize("name", TWINS)
def test_twin_on_streamed_moments_equals_raw(name):
    x, y = correlated(120, 7, 5, seed=4)
    with jax.enable_x64(True):
        m = stats.init((7, 5), jnp.float64)
        for lo in range(0, 120, 25):
            m = stats.update(m, np.concatenate([x, y], 1)[lo : lo + 25])
        twin = getattr(metrics, f"{name}_from_moments")(m)
        np.testing.assert_allclose(float(twin), float(score(name, x, y)), atol=1e-10)


def test_maxcorr_matches_and_twin():
    x, y = correlated(160, 12, 9, seed=5)
    with jax.enable_x64(True):
        out = metrics.maxcorr(x, y)
        want_score, want_match = ref_maxcorr(x, y)
        np.testing.assert_array_equal(out.matched, want_match)
        assert bool(out.valid.all())
        twin = metrics.maxcorr_from_moments(stats.joint_moments([x, y]))
        np.testing.assert_allclose(twin.score, want_score, atol=1e-10)
        corr = metrics.correlations(x, y)
        np.testing.assert_allclose(corr, ref_standardise(x).T @ ref_standardise(y), atol=1e-10)


def test_maxcorr_mincorr_rankings_over_several_networks():
    x, y = correlated(160, 6, 5, seed=6)
    _, z = correlated(160, 6, 7, seed=7)
    with jax.enable_x64(True):
        per = np.stack([np.abs(ref_standardise(x).T @ ref_standardise(o)).max(1) for o in (y, z)])
        hi, lo = metrics.maxcorr(x, [y, z]), metrics.mincorr(x, [y, z])
        np.testing.assert_allclose(hi.best, per.max(0), atol=1e-10)
        np.testing.assert_allclose(lo.best, per.min(0), atol=1e-10)
        assert hi.matched.shape == (2, 6)
        np.testing.assert_array_equal(metrics.neuron_ranking(hi.best), np.argsort(-per.max(0)))
        np.testing.assert_array_equal(metrics.neuron_ranking(lo.best), np.argsort(-per.min(0)))
        single = metrics.mincorr(x, y)
        np.testing.assert_allclose(single.score, metrics.maxcorr(x, y).score)


def test_svcca_variance_rule_parameter():
    x, y = correlated(200, 10, 10, seed=8)
    with jax.enable_x64(True):
        below = float(metrics.svcca(x, y, variance=0.9))
        np.testing.assert_allclose(below, ref_svcca(x, y, 0.9), atol=1e-8)
        reach = float(metrics.svcca(x, y, variance=0.9, variance_rule="reach"))
        assert below != reach
        with pytest.raises(ValueError, match="variance_rule"):
            metrics.svcca(x, y, variance_rule="above")


# ---------------------------------------------------------------- properties (hypothesis)


def orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@PROPS
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, scale):
    rng = np.random.default_rng(seed)
    x, y = correlated(60, 8, 6, seed)
    x2 = scale * x @ orthogonal(rng, 8) + rng.normal(size=8)
    with jax.enable_x64(True):
        for name in ["linear_cka", "debiased_cka", "rbf_cka", "procrustes"]:
            np.testing.assert_allclose(score(name, x2, y), score(name, x, y), atol=1e-8)


@PROPS
@given(seed=st.integers(0, 2**16))
def test_cca_invariant_to_invertible_linear_maps(seed):
    rng = np.random.default_rng(seed)
    x, y = correlated(80, 6, 5, seed)
    ax = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    ay = rng.normal(size=(5, 5)) + 3 * np.eye(5)
    full = dict(variance=1.0, variance_rule="reach")
    with jax.enable_x64(True):
        base = float(metrics.svcca(x, y, **full))
        np.testing.assert_allclose(metrics.svcca(x @ ax, y @ ay, **full), base, atol=1e-8)
        np.testing.assert_allclose(metrics.linreg(x, y @ ay), metrics.linreg(x, y), atol=1e-8)
        # PWCCA's weights are in x's own units, so only maps of y leave it unchanged.
        np.testing.assert_allclose(
            metrics.pwcca(x, y @ ay, **full), metrics.pwcca(x, y, **full), atol=1e-8
        )


@PROPS
@given(seed=st.integers(0, 2**16))
def test_maxcorr_invariant_to_per_neuron_affine_maps(seed):
    rng = np.random.default_rng(seed)
    x, y = correlated(50, 7, 6, seed)
    a = rng.uniform(0.1, 10, 7) * rng.choice([-1, 1], 7)
    b = rng.normal(size=7) * 100
    with jax.enable_x64(True):
        got, want = metrics.maxcorr(x * a + b, y), metrics.maxcorr(x, y)
        np.testing.assert_allclose(got.score, want.score, atol=1e-10)
        np.testing.assert_array_equal(got.matched, want.matched)
        np.testing.assert_allclose(metrics.maxcorr(y, x * a + b).score, metrics.maxcorr(y, x).score)


@PROPS
@given(seed=st.integers(0, 2**16), n=st.sampled_from([8, 40]))
def test_symmetric_metrics_are_symmetric(seed, n):
    x, y = correlated(n, 7, 5, seed)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.RankDeficiencyWarning)
        for name in SYMMETRIC:
            np.testing.assert_allclose(score(name, x, y), score(name, y, x), atol=1e-8)


@PROPS
@given(seed=st.integers(0, 2**16), n=st.sampled_from([8, 40]))
def test_identical_inputs_score_one(seed, n):
    x, _ = correlated(n, 6, 3, seed)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.RankDeficiencyWarning)
        for name in REFERENCES:
            want = 0.0 if name == "procrustes" else 1.0
            np.testing.assert_allclose(score(name, x, x), want, atol=1e-6, err_msg=name)


@PROPS
@given(seed=st.integers(0, 2**16), cols=st.sets(st.integers(0, 6), min_size=1, max_size=3))
def test_constant_neurons_never_nan_and_are_excluded(seed, cols):
    x, y = correlated(30, 7, 5, seed)
    x = x.astype(np.float32)
    cols = sorted(cols)
    x[:, cols] = 1234.5
    y[:, 0] = 0.0
    for name in REFERENCES:
        assert np.isfinite(float(score(name, x, y))), name
        assert np.isfinite(float(score(name, y, x))), name
    out = metrics.maxcorr(x, y)
    assert not bool(out.valid[np.asarray(cols)].any())
    assert (np.asarray(out.matched)[cols] == -1).all()
    keep = [i for i in range(7) if i not in cols]
    xd = x[:, keep].astype(np.float64)
    np.testing.assert_allclose(out.score, ref_maxcorr(xd, y[:, 1:])[0], atol=1e-4)
    np.testing.assert_allclose(metrics.linreg(x, y), ref_linreg(xd, y[:, 1:]), atol=1e-4)


def test_constant_neurons_warn():
    x, y = correlated(30, 4, 3, seed=0)
    x[:, 1] = 5.0
    with pytest.warns(metrics.ConstantNeuronWarning, match="1/4"):
        metrics.svcca(x, y)
    with pytest.warns(metrics.RankDeficiencyWarning, match="N=3"):
        metrics.linreg(x[:3], y[:3])


@pytest.mark.parametrize("name", sorted(set(REFERENCES) - {"rbf_cka"}))
def test_all_constant_network_is_undefined_not_zero(name):
    """A network with no varying neuron (a layer of silent audio) has no similarity: NaN with a
    warning naming why, never a number that reads as 'dissimilar'."""
    _, y = correlated(30, 4, 3, seed=0)
    with pytest.warns(kernels.UndefinedSimilarityWarning, match="no varying neuron"):
        assert np.isnan(float(score(name, np.ones((30, 2)), y)))
    with pytest.warns(kernels.UndefinedSimilarityWarning):
        assert np.isnan(float(score(name, y, np.full((30, 3), 7.0))))


@pytest.mark.parametrize("name", sorted(set(REFERENCES) - {"rbf_cka"}))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_activations_are_an_error(name, bad):
    x, y = correlated(30, 4, 3, seed=0)
    x[7, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf activations in network 0"):
        score(name, x, y)


@pytest.mark.parametrize("name", sorted(set(REFERENCES) - {"rbf_cka"}))
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_frames_is_an_error(name, n):
    x, y = correlated(30, 4, 3, seed=0)
    with pytest.raises(ValueError, match=f"expected at least 2 frames, got {n}"):
        score(name, x[:n], y[:n])


def test_debiased_cka_small_n_negative_and_undefined():
    rng = np.random.default_rng(0)
    values = []
    with jax.enable_x64(True):
        for _ in range(20):
            x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
            got = float(metrics.debiased_cka(x, y))
            np.testing.assert_allclose(got, ref_debiased_cka(x, y), atol=1e-8)
            values.append(got)
        assert min(values) < 0  # unbiased HSIC of independent data: negative is kept, not NaN
        assert np.isnan(float(metrics.debiased_cka(x[:3], y[:3])))
        with pytest.warns(kernels.UndefinedSimilarityWarning):
            assert np.isnan(float(metrics.debiased_cka(np.ones((6, 2)), y)))


# ---------------------------------------------------------------- transforms


PAIR_FNS = {
    "maxcorr": lambda x, y, **k: metrics.maxcorr(x, y, **k).score,
    "linreg": metrics.linreg,
    "svcca": metrics.svcca,
    "pwcca": metrics.pwcca,
    "linear_cka": metrics.linear_cka,
    "debiased_cka": metrics.debiased_cka,
    "procrustes": metrics.procrustes,
    "rbf_cka": metrics.rbf_cka,
}


@pytest.mark.parametrize("name", ["maxcorr", "linreg", "pwcca", "debiased_cka", "rbf_cka"])
def test_jit_vmap_and_mask_equal_slicing(name):
    # svcca, linear_cka and procrustes share these code paths (same kernels, same jit).
    fn = jax.jit(PAIR_FNS[name])
    rng = np.random.default_rng(9)
    xs, ys = zip(*[correlated(40, 6, 5, seed) for seed in range(3)], strict=True)
    xs, ys = np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32)  # [3, N, D]
    mask = rng.random(40) > 0.3
    eager = np.array([float(PAIR_FNS[name](x, y)) for x, y in zip(xs, ys, strict=True)])
    np.testing.assert_allclose(fn(xs[0], ys[0]), eager[0], atol=1e-5)
    np.testing.assert_allclose(jax.vmap(fn)(xs, ys), eager, atol=1e-5)
    masked = fn(xs[0], ys[0], where=mask)
    np.testing.assert_allclose(masked, PAIR_FNS[name](xs[0][mask], ys[0][mask]), atol=2e-5)


def test_rbf_cka_subsample_is_seeded_and_bounded():
    x, y = correlated(300, 5, 4, seed=10)
    a = float(metrics.rbf_cka(x, y, max_frames=100, seed=1))
    assert a == float(metrics.rbf_cka(x, y, max_frames=100, seed=1))
    assert a != float(metrics.rbf_cka(x, y, max_frames=100, seed=2))
    assert abs(a - float(metrics.rbf_cka(x, y))) < 0.1


def test_input_errors():
    with pytest.raises(ValueError, match=r"expected x of shape \[N, D\], got \(3,\)"):
        metrics.linear_cka(jnp.ones(3), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="same N frames"):
        metrics.svcca(jnp.ones((3, 2)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="2 networks"):
        metrics.linear_cka_from_moments(stats.moments(jnp.ones((4, 3)), sizes=(1, 1, 1)))
