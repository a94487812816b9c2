"""Tests of sslsim_jax.metrics.attention against float64 NumPy loops written here."""

from __future__ import annotations

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax.metrics import attention
from tests.conftest import run_on_devices

HA, HB = 12, 16  # different head counts on purpose
LENGTHS = (9, 5, 1, 7, 0)  # one padded batch: full, short, T = 1, and an empty utterance


def random_maps(
    rng: np.random.Generator, heads: int, lengths: tuple[int, ...], t: int | None = None
) -> np.ndarray:
    """Padded [U, H, T, T] softmax maps with exact zeros, a uniform row and NaN padding."""
    t = max(lengths) if t is None else t
    maps = np.full((len(lengths), heads, t, t), np.nan)
    for u, n in enumerate(lengths):
        if n == 0:
            continue
        logits = rng.normal(scale=2.0, size=(heads, n, n))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        # Exact zeros (about a quarter of the cells), never a whole row.
        zero = rng.random((heads, n, n)) < 0.25
        zero[..., 0] = False
        p[zero] = 0.0
        p /= p.sum(-1, keepdims=True)
        if n > 1:
            p[0, -1] = 1.0 / n  # a uniform (constant) row: Pearson r undefined
        maps[u, :, :n, :n] = p
    return maps


def ref_pearson_row(x: np.ndarray, y: np.ndarray) -> float:
    """True Pearson r of two rows; 0 for a constant row (our convention)."""
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.sum(dx * dy) / np.sqrt(np.sum(dx * dx) * np.sum(dy * dy)))


def ref_js_row(x: np.ndarray, y: np.ndarray) -> float:
    """Jensen–Shannon divergence, natural log, 0·log 0 = 0."""
    m = 0.5 * (x + y)
    kl_x = np.sum(x[x > 0] * np.log(x[x > 0] / m[x > 0]))
    kl_y = np.sum(y[y > 0] * np.log(y[y > 0] / m[y > 0]))
    return float(0.5 * (kl_x + kl_y))


def ref_sums(
    maps_a: np.ndarray, maps_b: np.ndarray, lengths, method: str
) -> tuple[np.ndarray, int, int]:
    """Per utterance, per head pair, per row float64 loop: (similarity sums, count, skipped)."""
    ha, hb = maps_a.shape[1], maps_b.shape[1]
    total, count, skipped = np.zeros((ha, hb)), 0, 0
    for u, n in enumerate(lengths):
        if n < (2 if method == "pearson" else 1):
            skipped += 1
            continue
        count += 1 if method == "fro" else n
        for h in range(ha):
            for g in range(hb):
                a = maps_a[u, h, :n, :n].astype(np.float64)
                b = maps_b[u, g, :n, :n].astype(np.float64)
                if method == "fro":
                    total[h, g] += 1.0 - np.sqrt(np.sum((a - b) ** 2))
                elif method == "pearson":
                    total[h, g] += sum(ref_pearson_row(a[q], b[q]) for q in range(n))
                else:
                    total[h, g] += sum(1.0 - ref_js_row(a[q], b[q]) for q in range(n))
    return total, count, skipped


def ref_similarity(maps_a, maps_b, lengths, method) -> np.ndarray:
    total, count, _ = ref_sums(maps_a, maps_b, lengths, method)
    return total / max(count, 1)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return random_maps(rng, HA, LENGTHS), random_maps(rng, HB, LENGTHS)


@pytest.mark.parametrize("method", attention.METHODS)
def test_matches_float64_numpy_loop(batch, method):
    maps_a, maps_b = batch
    s = attention.head_similarity(
        jnp.asarray(maps_a, jnp.float32),
        jnp.asarray(maps_b, jnp.float32),
        jnp.array(LENGTHS),
        method,
    )
    assert s.shape == (HA, HB) and s.dtype == jnp.float32
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, ref_similarity(maps_a, maps_b, LENGTHS, method), atol=1e-5)


@pytest.mark.parametrize("method", attention.METHODS)
def test_float64_mode_is_exact(batch, method):
    maps_a, maps_b = batch
    with jax.enable_x64(True):
        sums = attention.head_similarity_sums(
            jnp.asarray(maps_a), jnp.asarray(maps_b), jnp.array(LENGTHS), method
        )
        assert sums.total.dtype == jnp.float64
        total, count, skipped = ref_sums(maps_a, maps_b, LENGTHS, method)
        np.testing.assert_allclose(sums.total, total, rtol=1e-10, atol=1e-10)
        assert (int(sums.count), int(sums.skipped)) == (count, skipped)


def test_reference_rows_agree_with_scipy(batch):
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import pearsonr

    maps_a, maps_b = batch
    n = LENGTHS[0]
    for h, g, q in [(0, 1, 2), (3, 15, 8), (11, 0, 0), (5, 7, 4)]:
        x, y = maps_a[0, h, q, :n], maps_b[0, g, q, :n]
        np.testing.assert_allclose(ref_js_row(x, y), jensenshannon(x, y) ** 2, atol=1e-12)
        np.testing.assert_allclose(ref_pearson_row(x, y), pearsonr(x, y).statistic, atol=1e-12)


def _sums(maps_a, maps_b, lengths, method, **kwargs) -> attention.HeadSimilarityState:
    return attention.head_similarity_sums(
        jnp.asarray(maps_a, jnp.float32),
        jnp.asarray(maps_b, jnp.float32),
        None if lengths is None else jnp.asarray(lengths),
        method,
        **kwargs,
    )


def assert_states_close(x: attention.HeadSimilarityState, y: attention.HeadSimilarityState):
    np.testing.assert_allclose(x.total, y.total, rtol=1e-5, atol=1e-4)
    assert (int(x.count), int(x.skipped)) == (int(y.count), int(y.skipped))


@pytest.mark.parametrize("method", attention.METHODS)
def test_padded_batch_equals_utterances_one_by_one(batch, method):
    maps_a, maps_b = batch
    merged = attention.init_state(HA, HB)
    for u, n in enumerate(LENGTHS):
        # Each utterance alone, cut to its own length: no padding at all.
        one = _sums(maps_a[u : u + 1, :, :n, :n], maps_b[u : u + 1, :, :n, :n], None, method)
        merged = attention.merge_states(merged, one)
    assert_states_close(_sums(maps_a, maps_b, LENGTHS, method), merged)


@pytest.mark.parametrize("method", attention.METHODS)
def test_weighted_utterances_equal_a_corpus_with_repeats(batch, method):
    """Replicate r of `add_utterances` (weights [R, U]) equals the float64 loop over the corpus
    in which utterance u appears w[r, u] times; ``skipped`` counts each utterance once."""
    maps_a, maps_b = batch
    weights = np.array([[1, 1, 1, 1, 1], [0, 3, 1, 0, 2], [2, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    parts = attention.utterance_sums(
        jnp.asarray(maps_a, jnp.float32),
        jnp.asarray(maps_b, jnp.float32),
        jnp.asarray(LENGTHS),
        method,
    )
    assert parts.total.shape == (len(LENGTHS), HA, HB) and parts.count.shape == (len(LENGTHS),)
    state = attention.add_utterances(
        attention.init_state(HA, HB, replicates=len(weights)), parts, jnp.asarray(weights)
    )
    assert state.total.shape == (len(weights), HA, HB) and state.count.shape == (len(weights),)
    for r, w in enumerate(weights):
        repeat = np.repeat(np.arange(len(LENGTHS)), w)
        lengths = [LENGTHS[u] for u in repeat]
        total, count, _ = ref_sums(maps_a[repeat], maps_b[repeat], lengths, method)
        np.testing.assert_allclose(state.total[r], total, rtol=1e-5, atol=1e-4)
        assert int(state.count[r]) == count
    expected = ref_similarity(maps_a[[1, 1, 1, 2, 4, 4]], maps_b[[1, 1, 1, 2, 4, 4]],
                              [5, 5, 5, 1, 0, 0], method)  # fmt: skip
    finalized = attention.finalize(state)
    np.testing.assert_allclose(finalized[1], expected, atol=1e-5)
    assert np.all(finalized[3] == 0)  # a replicate that drew nothing: zeros, never NaN
    assert int(state.skipped) == int(_sums(maps_a, maps_b, LENGTHS, method).skipped)
    with pytest.raises(ValueError, match=r"integer weights of shape \[R, U=5\]"):
        attention.add_utterances(state, parts, jnp.ones((4, 5), jnp.float32))


@pytest.mark.parametrize("method", attention.METHODS)
def test_streaming_over_batches_equals_one_call(method):
    rng = np.random.default_rng(1)
    lengths = (6, 3, 1, 8, 2, 4)
    maps_a, maps_b = random_maps(rng, 3, lengths), random_maps(rng, 5, lengths)
    state = attention.init_state(3, 5)
    for lo, hi in [(0, 2), (2, 3), (3, 6)]:
        t = max(lengths[lo:hi])  # each batch padded to its own T
        state = attention.update_state(
            state,
            jnp.asarray(maps_a[lo:hi, :, :t, :t]),
            jnp.asarray(maps_b[lo:hi, :, :t, :t]),
            jnp.asarray(lengths[lo:hi]),
            method,
        )
    one = _sums(maps_a, maps_b, lengths, method)
    assert_states_close(state, one)
    np.testing.assert_allclose(attention.finalize(state), attention.finalize(one), atol=1e-6)


@pytest.mark.parametrize("method", attention.METHODS)
def test_no_nan_for_degenerate_utterances(method):
    rng = np.random.default_rng(2)
    maps = random_maps(rng, 4, (1, 1, 0), t=3)  # only T = 1 and T = 0 utterances
    sums = _sums(maps, maps[:, ::-1], (1, 1, 0), method)
    s = attention.finalize(sums)
    assert np.all(np.isfinite(s))
    if method == "pearson":  # T < 2 is skipped and counted; nothing left, so S = 0
        assert (int(sums.count), int(sums.skipped)) == (0, 3)
        np.testing.assert_array_equal(s, 0.0)
    else:  # a 1 × 1 softmax map is [[1]]: identical heads
        assert int(sums.skipped) == 1
        np.testing.assert_allclose(s, 1.0, atol=1e-6)


def test_exact_zeros_and_uniform_rows_give_finite_values():
    t = 6
    one_hot = np.broadcast_to(np.eye(t), (1, 2, t, t)).copy()  # rows of exact zeros and a 1
    uniform = np.full((1, 2, t, t), 1.0 / t)  # constant rows
    for method in attention.METHODS:
        for a, b in [(one_hot, uniform), (uniform, uniform), (one_hot, one_hot)]:
            s = attention.head_similarity(jnp.asarray(a), jnp.asarray(b), method=method)
            assert np.all(np.isfinite(s)), method
            np.testing.assert_allclose(s, ref_similarity(a, b, [t], method), atol=1e-5)


def test_fro_self_distance_is_within_the_documented_float32_floor():
    # Docstring: in float32 a zero distance comes back as up to ≈ 10 √ε ‖Ac‖ (Gram cancellation).
    rng = np.random.default_rng(8)
    lengths = (40, 25)
    maps = random_maps(rng, 6, lengths)
    s = _similarity(maps, maps, lengths, "fro")
    norms = [
        np.linalg.norm(c - c.mean(-1, keepdims=True), axis=(1, 2))
        for c in (maps[u, :, :n, :n] for u, n in enumerate(lengths))
    ]
    floor = 10 * np.sqrt(np.finfo(np.float32).eps) * np.mean(norms, 0)
    assert np.all(np.abs(1.0 - np.diag(s)) <= floor)
    with jax.enable_x64(True):
        s64 = attention.head_similarity(jnp.asarray(maps), jnp.asarray(maps), jnp.array(lengths))
        np.testing.assert_allclose(np.diag(s64), 1.0, atol=1e-6)


def test_bfloat16_maps_are_computed_in_float32(batch):
    maps_a, maps_b = batch
    a16 = jnp.asarray(maps_a, jnp.bfloat16)
    s = attention.head_similarity(a16, jnp.asarray(maps_b), jnp.array(LENGTHS), "js")
    assert s.dtype == jnp.float32
    ref = ref_similarity(np.asarray(a16.astype(jnp.float32)), maps_b, LENGTHS, "js")
    np.testing.assert_allclose(s, ref, atol=1e-5)


@pytest.mark.parametrize("method", attention.METHODS)
def test_jit_and_no_recompilation(batch, method):
    maps_a, maps_b = batch
    chex.clear_trace_counter()  # the counter is keyed by code location, shared by parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(a, b, n):
        return attention.head_similarity(a, b, n, method)

    args = (jnp.asarray(maps_a, jnp.float32), jnp.asarray(maps_b, jnp.float32))
    first = run(*args, jnp.array(LENGTHS))
    shorter = (8, 4, 1, 2, 0)  # same shapes, other values (within the data): no retrace
    second = run(*args, jnp.array(shorter))
    np.testing.assert_allclose(first, ref_similarity(maps_a, maps_b, LENGTHS, method), atol=1e-5)
    np.testing.assert_allclose(second, ref_similarity(maps_a, maps_b, shorter, method), atol=1e-5)


def test_js_blocks_with_overlapping_edges_equal_one_block():
    rng = np.random.default_rng(3)
    lengths = (7, 4, 6)
    maps_a, maps_b = random_maps(rng, 5, lengths), random_maps(rng, 7, lengths)
    whole = _sums(maps_a, maps_b, lengths, "js")
    for budget in (1, 20, 50, 7 * 36):  # 1 row × 1 pair, 2×3 pairs, …: edges overlap
        blocked = _sums(maps_a, maps_b, lengths, "js", block_elements=budget)
        assert_states_close(blocked, whole)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    ha=st.integers(1, 200),
    hb=st.integers(1, 200),
    t=st.integers(1, 3000),
    u=st.integers(1, 64),
    budget=st.integers(1, 2**24),
)
def test_js_block_shape_respects_the_budget(ha, hb, t, u, budget):
    ba, bb, rb = attention.js_block_shape(ha, hb, t, utterances=u, block_elements=budget)
    assert 1 <= ba <= ha and 1 <= bb <= hb and 1 <= rb <= t
    assert u * ba * bb * rb * t <= max(budget, u * t)


def test_js_peak_memory_is_bounded_on_a_long_utterance():
    # 60 s of audio at 50 Hz; without blocking one [Ha, Hb, T, T] intermediate is 1.8 GB.
    u, h, t, budget = 1, 6, 3000, 2**20
    spec = jax.ShapeDtypeStruct((u, h, t, t), jnp.float32)
    compiled = (
        jax.jit(lambda a, b: attention.head_similarity(a, b, method="js", block_elements=budget))
        .lower(spec, spec)
        .compile()
    )
    temp = compiled.memory_analysis().temp_size_in_bytes
    naive = h * h * t * t * 4
    # Docstring bound: a few buffers of block_elements (4 allowed) plus O(U·Ha·Hb + U·T).
    assert temp <= 4 * budget * 4 + 64 * (u * h * h + u * t), (temp, naive)


def test_js_on_a_long_utterance_matches_reference():
    rng = np.random.default_rng(4)
    maps_a, maps_b = random_maps(rng, 2, (1000,)), random_maps(rng, 3, (1000,))
    s = _sums(maps_a, maps_b, None, "js", block_elements=2**16)
    # Vectorised over rows (independent of the blocked loop): JS per row, summed.
    a, b = maps_a[0][:, None], maps_b[0][None, :]  # [Ha, 1, T, T], [1, Hb, T, T]
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> np.ndarray:  # Σ_k x log(x / m), 0·log 0 = 0
        safe = np.where(x > 0, x, 1.0)
        return np.where(x > 0, x * np.log(safe / np.where(x > 0, m, 1.0)), 0.0).sum(-1)

    ref = (1.0 - 0.5 * (kl(a) + kl(b))).sum(-1)
    np.testing.assert_allclose(s.total, ref, rtol=1e-5)
    assert int(s.count) == 1000


@pytest.mark.parametrize("method", attention.METHODS)
def test_all_layers_at_once_equal_layer_by_layer(method):
    rng = np.random.default_rng(5)
    lengths, la, lb, h = (5, 3), 3, 2, 4
    maps_a = random_maps(rng, la * h, lengths)  # [U, La*H, T, T]
    maps_b = random_maps(rng, lb * h, lengths)
    s = attention.split_layers(_similarity(maps_a, maps_b, lengths, method), la, lb)
    assert s.shape == (la, lb, h, h)
    for i in range(la):
        for j in range(lb):
            one = _similarity(
                maps_a[:, i * h : (i + 1) * h], maps_b[:, j * h : (j + 1) * h], lengths, method
            )
            np.testing.assert_allclose(s[i, j], one, atol=1e-6)
    score, matched = attention.layer_score(s)
    assert score.shape == (la, lb) and matched.shape == (la, lb, h)


@pytest.mark.parametrize("method", attention.METHODS)
def test_vmap_over_layers_equals_a_loop(method):
    rng = np.random.default_rng(9)
    lengths = (5, 3)
    layers = np.stack([random_maps(rng, 2, lengths) for _ in range(3)])  # [L, U, H, T, T]
    other = random_maps(rng, 3, lengths)
    vmapped = jax.jit(
        jax.vmap(
            lambda a: attention.head_similarity(a, jnp.asarray(other), jnp.array(lengths), method)
        )
    )(jnp.asarray(layers))
    for i in range(3):
        np.testing.assert_allclose(
            vmapped[i], _similarity(layers[i], other, lengths, method), atol=1e-6
        )


def _similarity(maps_a, maps_b, lengths, method):
    return attention.finalize(_sums(maps_a, maps_b, lengths, method))


def test_layer_score_is_mean_of_row_maxima():
    s = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.8], [0.0, -0.5, 0.4], [0.6, 0.7, 0.1]])
    score, matched = attention.layer_score(jnp.asarray(s))
    np.testing.assert_allclose(score, np.mean([0.9, 0.8, 0.4, 0.7]), rtol=1e-6)
    np.testing.assert_array_equal(matched, [1, 0, 2, 1])  # ties: the first head


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
    method=st.sampled_from(attention.METHODS),
)
def test_symmetry_and_self_similarity(seed, lengths, method):
    rng = np.random.default_rng(seed)
    maps_a, maps_b = random_maps(rng, 3, lengths, t=6), random_maps(rng, 2, lengths, t=6)
    s_ab = _similarity(maps_a, maps_b, lengths, method)
    s_ba = _similarity(maps_b, maps_a, lengths, method)
    np.testing.assert_allclose(s_ab, s_ba.T, atol=1e-6)
    assert np.all(np.isfinite(s_ab))
    s_aa = _similarity(maps_a, maps_a, lengths, method)
    if method == "js" and any(n > 0 for n in lengths):
        np.testing.assert_allclose(np.diag(s_aa), 1.0, atol=1e-6)


def test_attention_cells():
    rng = np.random.default_rng(6)
    lengths = (4, 2, 0)
    maps = random_maps(rng, 3, lengths)
    cells, weights = attention.attention_cells(jnp.asarray(maps), jnp.asarray(lengths))
    assert cells.shape == (3 * 16, 3) and weights.shape == (3 * 16,)
    assert float(weights.sum()) == sum(n * n for n in lengths)
    ref = np.concatenate([maps[u, :, :n, :n].reshape(3, -1).T for u, n in enumerate(lengths)])
    valid = np.asarray(weights) > 0
    np.testing.assert_allclose(cells[valid], ref, rtol=1e-6)
    np.testing.assert_array_equal(cells[~valid], 0.0)  # NaN padding never leaks


def test_attention_linear_cka_streams_through_stats():
    representation = pytest.importorskip("sslsim_jax.metrics.representation")
    rng = np.random.default_rng(7)
    lengths = (6, 3, 5, 1)
    maps_a, maps_b = random_maps(rng, 3, lengths), random_maps(rng, 4, lengths)
    m = attention.cell_moments([jnp.asarray(maps_a[:2]), jnp.asarray(maps_b[:2])], lengths[:2])
    t = max(lengths[2:])  # the second batch has its own padding
    m = attention.update_cell_moments(
        m, [jnp.asarray(maps_a[2:, :, :t, :t]), jnp.asarray(maps_b[2:, :, :t, :t])], lengths[2:]
    )
    assert float(m.count) == sum(n * n for n in lengths)
    cka = representation.linear_cka_from_moments(m)
    # NumPy float64: per utterance, the valid block flattened to [T², H], stacked, centred.
    x = np.concatenate([maps_a[u, :, :n, :n].reshape(3, -1).T for u, n in enumerate(lengths)])
    y = np.concatenate([maps_b[u, :, :n, :n].reshape(4, -1).T for u, n in enumerate(lengths)])
    x, y = x - x.mean(0), y - y.mean(0)
    ref = np.sum((x.T @ y) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    np.testing.assert_allclose(cka, ref, atol=1e-5)


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "lengths", "message"),
    [
        ((3,), (1, 2, 4, 4), None, r"expected maps_a of shape \[U, H, T, T\], got \(3,\)"),
        ((1, 2, 4, 4), (1, 2, 4, 5), None, r"expected maps_b of shape \[U, H, T, T\]"),
        ((1, 2, 4, 4), (2, 2, 4, 4), None, "same utterances U and frames T"),
        ((2, 2, 4, 4), (2, 3, 4, 4), (3,), r"expected lengths of shape \[U\] = \(2,\)"),
    ],
)
def test_input_checks(shape_a, shape_b, lengths, message):
    with pytest.raises(ValueError, match=message):
        attention.head_similarity(
            jnp.zeros(shape_a), jnp.zeros(shape_b), None if lengths is None else jnp.zeros(lengths)
        )


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="expected method in"):
        attention.head_similarity(jnp.zeros((1, 1, 2, 2)), jnp.zeros((1, 1, 2, 2)), method="kl")


def test_device_merge_with_psum_equals_one_call():
    # Fake CPU devices only in a subprocess, so the rest of the suite keeps one device.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from sslsim_jax.metrics import attention

        assert jax.device_count() == 4
        mesh = jax.make_mesh((4,), ("data",))
        rng = np.random.default_rng(0)
        lengths = jnp.array([7, 3, 1, 5, 0, 6, 2, 7])
        a = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 3, 7, 7)), jnp.float32), -1)
        b = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 5, 7, 7)), jnp.float32), -1)
        a, b, lengths = jax.device_put((a, b, lengths), NamedSharding(mesh, P("data")))
        for method in attention.METHODS:
            def per_device(a, b, n):
                sums = attention.head_similarity_sums(a, b, n, method)
                return jax.lax.psum(sums, "data")
            sharded = jax.jit(jax.shard_map(
                per_device, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                out_specs=P(),
            ))(a, b, lengths)
            one = attention.head_similarity_sums(a, b, lengths, method)  # sharded over U
            single = attention.head_similarity_sums(*jax.device_get((a, b, lengths)), method)
            np.testing.assert_allclose(one.total, single.total, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sharded.total, one.total, rtol=1e-5, atol=1e-5)
            assert int(sharded.count) == int(one.count), method
            assert int(sharded.skipped) == int(one.skipped), method
        print("ok")
        """
    )
    out = run_on_devices(code, devices=4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("method", ["fro", "pearson"])
def test_gram_precision_follows_the_run_setting(method):
    maps = jnp.full((1, 2, 3, 3), 1 / 3)

    def sums(m):
        return attention.head_similarity_sums(m, m, method=method).total

    def precisions():
        text = jax.jit(sums).lower(maps).as_text()
        return {line.split("precision = [")[1].split(",")[0]
                for line in text.splitlines() if "dot_general" in line}  # fmt: skip

    assert precisions() == {"HIGHEST"}
    with jax.default_matmul_precision("bfloat16"):
        assert precisions() == {"DEFAULT"}
