"""Tests of sslsim_jax.figures: the drawn data equal the tables, blocks, thinned labels."""

import numpy as np
import pandas as pd
import pytest

from sslsim_jax import analyses, figures

COLUMNS = ["model_a", "layer_a", "model_b", "layer_b", "metric", "value"]


def table_of(models, metric="linear_cka", seed=0, skip=()):
    """Every ordered pair of the networks of ``models`` ({name: layers}), random values."""
    rng = np.random.default_rng(seed)
    nets = [(m, str(layer)) for m, layers in models.items() for layer in layers]
    rows = [
        (ma, la, mb, lb, metric, rng.uniform())
        for ma, la in nets
        for mb, lb in nets
        if (ma, la, mb, lb) not in skip
    ]
    return pd.DataFrame(rows, columns=COLUMNS).sample(frac=1.0, random_state=seed)


SMALL = {"base": range(4), "large": [*range(3), "final"], "ft": ["10", "2", "0"]}


def test_grid_matrix_equals_table():
    table = table_of(SMALL, skip={("large", "final", "ft", "2")})
    data = figures.grid_matrix(table, "linear_cka")
    # Models in order of first appearance; layers numeric, "final" last ("10" after "2").
    models = list(dict.fromkeys([*table.model_a, *table.model_b]))
    assert [b[0] for b in data.blocks] == models
    order = {m: [layer for mm, layer in data.networks if mm == m] for m in models}
    assert order == {
        "base": ["0", "1", "2", "3"],
        "large": ["0", "1", "2", "final"],
        "ft": ["0", "2", "10"],
    }
    index = {net: i for i, net in enumerate(data.networks)}
    for row in table.itertuples():
        i, j = index[(row.model_a, row.layer_a)], index[(row.model_b, row.layer_b)]
        assert data.matrix[i, j] == row.value
    i, j = index[("large", "final")], index[("ft", "2")]
    assert np.isnan(data.matrix[i, j])  # the skipped pair
    assert np.isfinite(data.matrix).sum() == len(table)


def test_grid_blocks_and_figure_data():
    table = table_of(SMALL)
    data = figures.grid_matrix(table, "linear_cka", models=["ft", "base", "large"])
    assert data.blocks == [("ft", 0, 3), ("base", 3, 7), ("large", 7, 11)]
    fig = figures.network_grid(table, "linear_cka", models=["ft", "base", "large"])
    ax = fig.axes[0]
    drawn = ax.images[0].get_array()
    np.testing.assert_array_equal(np.ma.filled(drawn, np.nan), data.matrix)
    # Block outlines: one horizontal and one vertical line before each block but the first.
    lines = [ln.get_xdata()[0] for ln in ax.lines if ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert sorted(lines) == [2.5, 6.5]
    # Few networks: every layer labelled.
    assert [t.get_text() for t in ax.get_xticklabels()] == [layer for _, layer in data.networks]


def test_labels_thinned_at_paper_scale():
    models = {f"m{i}": range(13 if i < 4 else 25) for i in range(8)}  # 4*13 + 4*25 = 152
    table = table_of(models)
    data = figures.grid_matrix(table, "linear_cka")
    assert len(data.networks) == 152
    fig = figures.network_grid(table, "linear_cka")
    ax = fig.axes[0]
    ticks = list(ax.get_yticks())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(ticks) <= 60  # thinned from 152
    assert figures.tick_step(152) == 4  # ceil(152 / 48) = 4, a step in _TICK_STEPS
    starts = [start for _, start, _ in data.blocks]
    assert set(starts) <= set(ticks)  # every block's layer 0 is labelled
    assert all(label == data.networks[int(t)][1] for t, label in zip(ticks, labels, strict=True))
    # No label right before a block start (it would overlap the next block's "0").
    assert not {s - 1 for s in starts} & set(ticks)
    np.testing.assert_array_equal(np.ma.filled(ax.images[0].get_array(), np.nan), data.matrix)


def test_attention_metric_grid():
    # Attention layer metrics: asymmetric and possibly below 0 (1 - Frobenius distance).
    table = table_of({"a": range(3), "b": range(2)}, metric="attention_fro")
    table = table.assign(value=table.value - 0.5)
    fig = figures.network_grid(table, "attention_fro")
    assert "attention" in fig.get_suptitle()
    low, _ = fig.axes[0].images[0].get_clim()
    assert low <= table.value.min()


def test_grid_errors():
    table = table_of(SMALL)
    with pytest.raises(ValueError, match="no rows for metric='svcca'"):
        figures.grid_matrix(table, "svcca")
    with pytest.raises(ValueError, match="expected models among"):
        figures.grid_matrix(table, "linear_cka", models=["nope"])
    with pytest.raises(ValueError, match="duplicate"):
        figures.grid_matrix(pd.concat([table, table.iloc[:1]]), "linear_cka")


def test_localization_plot_lines_are_the_frame():
    table = pd.concat(
        [table_of(SMALL, metric="maxcorr", seed=1), table_of(SMALL, metric="svcca", seed=2)]
    )
    loc = analyses.localization(table)
    fig = figures.localization_plot(loc)
    top = fig.axes[0]
    lines = {ln.get_label(): ln for ln in top.get_lines() if not ln.get_label().startswith("_")}
    assert list(lines) == list(dict.fromkeys(loc.model))
    for model, line in lines.items():
        # localization() lists each model's layers in network order, as the plot draws them.
        np.testing.assert_array_equal(line.get_ydata(), loc[loc.model == model].score)
    # "ft" has layers 0, 2, 10: drawn at positions 0, 1, 2 in network order.
    ft = next(ln for ln in top.get_lines() if ln.get_label() == "ft")
    np.testing.assert_array_equal(ft.get_xdata(), [0, 1, 2])
    with pytest.raises(ValueError, match="missing columns"):
        figures.localization_plot(loc.drop(columns="score"))


def test_topk_plot_lines_are_means():
    rng = np.random.default_rng(3)
    nets = [("a", "0"), ("a", "1"), ("b", "0")]
    ks = (0.5, 1.0)
    values = {"maxcorr": rng.uniform(size=(3, 3, 2)), "svcca": rng.uniform(size=(3, 3, 2))}
    frame = analyses.topk_table(values, nets, ks)
    fig = figures.topk_plot(frame)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    line_a = fig.axes[0].get_lines()[0]
    assert line_a.get_label() == "a"
    # Model a, metric maxcorr: mean over a's networks (0, 1) and their partners b != a.
    want = [
        np.mean(
            [
                values["maxcorr"][0, 1, i],
                values["maxcorr"][0, 2, i],
                values["maxcorr"][1, 0, i],
                values["maxcorr"][1, 2, i],
            ]
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(line_a.get_ydata(), want)
    np.testing.assert_allclose(line_a.get_xdata(), ks)
    curves = figures.topk_curves(frame, pool="models")
    got = curves[(curves.metric == "svcca") & (curves.model == "b")].value.to_numpy()
    want = [np.mean([values["svcca"][2, 0, i], values["svcca"][2, 1, i]]) for i in range(2)]
    np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError, match="expected metrics among"):
        figures.topk_plot(frame, metrics=["pwcca"])
