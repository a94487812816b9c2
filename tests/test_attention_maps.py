"""Tests of sslsim_jax.metrics.attention_maps: attention layers as networks, against NumPy
float64 CKA and SVCCA of the flattened valid cells (references written here)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslsim_jax import pairwise
from sslsim_jax.metrics import attention_maps

# Two models: A with 2 layers of 3 heads, B with 3 layers of 2 heads -> 5 networks.
LAYERS, HEADS = (2, 3), (3, 2)


def random_maps(rng, lh, lengths, t):
    """[U, L*H, T, T] row-softmax maps on the valid block, NaN in the padding."""
    maps = np.full((len(lengths), lh, t, t), np.nan)
    for u, n in enumerate(lengths):
        logits = rng.normal(scale=1.5, size=(lh, n, n))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        maps[u, :, :n, :n] = p / p.sum(-1, keepdims=True)
    return maps


def batches(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for lengths, t in [((6, 3, 5), 6), ((4, 2), 5)]:  # the second batch has its own padding
        widths = [l_k * h_k for l_k, h_k in zip(LAYERS, HEADS, strict=True)]
        maps = [random_maps(rng, lh, lengths, t) for lh in widths]
        out.append((maps, np.asarray(lengths)))
    return out


def flattened_layers(data):
    """Per network (model, layer): [N cells, H] of the valid cells of all utterances."""
    nets = []
    for k, (l_k, h_k) in enumerate(zip(LAYERS, HEADS, strict=True)):
        for layer in range(l_k):
            cells = [
                maps[k][u, layer * h_k : (layer + 1) * h_k, :n, :n].reshape(h_k, -1).T
                for maps, lengths in data
                for u, n in enumerate(lengths)
            ]
            nets.append(np.concatenate(cells))
    return nets


def ref_linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_svcca(x, y, variance=0.99):
    def subspace(a):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a / np.linalg.norm(a, axis=0), full_matrices=False)
        cum = np.cumsum(s**2)
        return u[:, : max(1, int((cum < variance * cum[-1]).sum()))]

    return np.linalg.svd(subspace(x).T @ subspace(y), compute_uv=False).mean()


def test_layer_sizes():
    assert attention_maps.layer_sizes(LAYERS, HEADS) == (3, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="one entry per model"):
        attention_maps.layer_sizes((2,), (3, 2))
    with pytest.raises(ValueError, match="positive"):
        attention_maps.layer_sizes((0,), (3,))


def test_layer_matrices_match_numpy():
    data = batches()
    with jax.enable_x64(True):
        m = attention_maps.init(LAYERS, HEADS, dtype=jnp.float64)
        step = jax.jit(attention_maps.update)
        for maps, lengths in data:
            m = step(m, [jnp.asarray(x) for x in maps], jnp.asarray(lengths))
        assert float(m.count) == sum(n * n for _, lengths in data for n in lengths)
        names = [f"{m}:{i}" for m, l_k in zip("AB", LAYERS, strict=True) for i in range(l_k)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = pairwise.compare_moments(m, names, metrics=("linear_cka", "svcca"))
    nets = flattened_layers(data)
    for a in range(5):
        for b in range(5):
            np.testing.assert_allclose(
                got["linear_cka"][a, b], ref_linear_cka(nets[a], nets[b]), atol=1e-10
            )
            np.testing.assert_allclose(got["svcca"][a, b], ref_svcca(nets[a], nets[b]), atol=1e-8)


def test_batches_merge_like_one_pass():
    # The same utterances in one batch (padded to the longest) or two give the same statistics.
    data = batches(seed=1)
    m = attention_maps.init(LAYERS, HEADS)
    for maps, lengths in data:
        m = attention_maps.update(m, [jnp.asarray(x) for x in maps], jnp.asarray(lengths))
    t = 6
    joined = []
    for k in range(2):
        parts = []
        for maps, _ in data:
            x = maps[k]
            pad = t - x.shape[-1]
            parts.append(np.pad(x, ((0, 0), (0, 0), (0, pad), (0, pad)), constant_values=np.nan))
        joined.append(jnp.asarray(np.concatenate(parts)))
    lengths = jnp.asarray(np.concatenate([lengths for _, lengths in data]))
    one = attention_maps.update(attention_maps.init(LAYERS, HEADS), joined, lengths)
    np.testing.assert_allclose(one.comoment, m.comoment, atol=1e-5)
    np.testing.assert_allclose(one.mean, m.mean, atol=1e-6)
    assert float(one.count) == float(m.count)


def test_cell_rows_layout_and_errors():
    (maps, lengths), _ = batches()
    z, w = attention_maps.cell_rows([jnp.asarray(x) for x in maps], jnp.asarray(lengths))
    assert z.shape == (3 * 6 * 6, 2 * 3 + 3 * 2) and w.shape == (3 * 6 * 6,)
    assert float(w.sum()) == 6 * 6 + 3 * 3 + 5 * 5
    assert np.isfinite(np.asarray(z)).all()  # NaN padding never leaks
    # Row (u=0, query 1, key 2), column of model B layer 1 head 0 (B's columns start at 6).
    assert float(z[0 * 36 + 1 * 6 + 2, 6 + 1 * 2 + 0]) == pytest.approx(maps[1][0, 2, 1, 2])
    with pytest.raises(ValueError, match=r"expected maps\[1\] of shape \[B, L\*H, T, T\]"):
        attention_maps.cell_rows([jnp.asarray(maps[0]), jnp.zeros((3, 4, 6, 5))])
    with pytest.raises(ValueError, match="same utterances B and frames T"):
        attention_maps.cell_rows([jnp.asarray(maps[0]), jnp.zeros((2, 4, 6, 6))])
    with pytest.raises(ValueError, match="Σ L_k H_k = 12"):
        attention_maps.update(attention_maps.init(LAYERS, HEADS), [jnp.asarray(maps[0])])
    with pytest.raises(ValueError, match="at least one"):
        attention_maps.cell_rows([])


def test_one_compile_per_shape():
    traces = []

    def step(m, maps, lengths):
        traces.append(1)
        return attention_maps.update(m, maps, lengths)

    f = jax.jit(step)
    (maps, lengths), _ = batches()
    m = attention_maps.init(LAYERS, HEADS)
    maps = [jnp.asarray(x) for x in maps]
    m = f(m, maps, jnp.asarray(lengths))
    f(m, maps, jnp.asarray(lengths))
    assert len(traces) == 1


def test_weighted_updates_equal_a_corpus_with_repeats():
    """Replicate r of `update_weighted` equals `update` on the batch with utterance b repeated
    weights[r, b] times (a replicate that draws nothing stays empty)."""
    (maps, lengths), _ = batches()
    weights = np.array([[1, 1, 1], [0, 2, 1], [3, 0, 0], [0, 0, 0]])
    stacked = attention_maps.init(LAYERS, HEADS, replicates=len(weights))
    assert stacked.comoment.shape == (4, 12, 12)
    got = jax.jit(attention_maps.update_weighted)(
        stacked, [jnp.asarray(x) for x in maps], jnp.asarray(lengths), jnp.asarray(weights)
    )
    for r, w in enumerate(weights):
        repeat = np.repeat(np.arange(len(lengths)), w)
        m = attention_maps.init(LAYERS, HEADS)
        if len(repeat):
            m = attention_maps.update(
                m, [jnp.asarray(x[repeat]) for x in maps], jnp.asarray(lengths[repeat])
            )
        for field in ("count", "mean", "comoment", "row_cross", "row_gram"):
            np.testing.assert_allclose(
                getattr(got, field)[r], getattr(m, field), rtol=1e-5, atol=1e-5, err_msg=field
            )
    assert float(got.count[3]) == 0 and float(got.count[1]) == 2 * 3**2 + 5**2
    with pytest.raises(ValueError, match=r"integer weights of shape \[R=4, B=3\]"):
        attention_maps.update_weighted(stacked, [jnp.asarray(x) for x in maps], None, weights[:2])
