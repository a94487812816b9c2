"""Tests of sslsim_jax.analyses: localization recomputed by hand with NumPy, top-k rows."""

import numpy as np
import pandas as pd
import pytest

from sslsim_jax import analyses

NETWORKS = [("m1", "0"), ("m1", "1"), ("m1", "final"), ("m2", "0"), ("m2", "2"), ("m2", "10")]


def similarity_table(seed=0, metrics=("maxcorr", "svcca", "linear_cka"), drop=None):
    """Every ordered pair (a == b included) of NETWORKS for each metric, random values; the
    rows are shuffled so that nothing depends on the table's order."""
    rng = np.random.default_rng(seed)
    values = {m: rng.uniform(0.2, 0.9, size=(6, 6)) for m in metrics}
    rows = []
    for metric in metrics:
        np.fill_diagonal(values[metric], 1.0)
        for i, (ma, la) in enumerate(NETWORKS):
            for j, (mb, lb) in enumerate(NETWORKS):
                if drop == (metric, i, j):
                    continue
                rows.append((ma, la, mb, lb, metric, values[metric][i, j]))
    columns = ["model_a", "layer_a", "model_b", "layer_b", "metric", "value"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sample(frac=1.0, random_state=seed).reset_index(drop=True), values


def by_hand(values, partners):
    """The definition with NumPy: row means over partners, z-scores with ddof = 1."""
    loc = np.array([values["maxcorr"][a, partners[a]].mean() for a in range(6)])
    dist = np.array([values["svcca"][a, partners[a]].mean() for a in range(6)])

    def z(v):
        return (v - v.mean()) / v.std(ddof=1)

    return loc, dist, z(loc) - z(dist)


def test_localization_pool_networks_by_hand():
    table, values = similarity_table()
    got = analyses.localization(table)
    assert list(got.columns) == ["model", "layer", "localized", "distributed", "score"]
    assert len(got) == 6
    got = got.set_index(["model", "layer"]).loc[NETWORKS]
    partners = [[b for b in range(6) if b != a] for a in range(6)]
    loc, dist, score = by_hand(values, partners)
    np.testing.assert_allclose(got.localized, loc, rtol=1e-12)
    np.testing.assert_allclose(got.distributed, dist, rtol=1e-12)
    np.testing.assert_allclose(got.score, score, rtol=1e-12)
    # z-scores of a difference of two standardised variables sum to zero.
    assert abs(got.score.sum()) < 1e-12


def test_localization_pool_models_by_hand():
    table, values = similarity_table(seed=1)
    got = analyses.localization(table, pool="models").set_index(["model", "layer"]).loc[NETWORKS]
    partners = [[3, 4, 5]] * 3 + [[0, 1, 2]] * 3  # only the other model's networks
    loc, dist, score = by_hand(values, partners)
    np.testing.assert_allclose(got.localized, loc, rtol=1e-12)
    np.testing.assert_allclose(got.distributed, dist, rtol=1e-12)
    np.testing.assert_allclose(got.score, score, rtol=1e-12)
    plain = analyses.localization(table).set_index(["model", "layer"]).loc[NETWORKS]
    assert not np.allclose(plain.localized, got.localized)  # the pools do differ


def test_network_order():
    table, _ = similarity_table()
    got = analyses.localization(table.iloc[::-1])
    order = list(zip(got.model, got.layer, strict=True))
    models = list(dict.fromkeys(table.iloc[::-1].model_a))
    assert [m for m, _ in order] == sorted([m for m, _ in order], key=models.index)
    assert [layer for m, layer in order if m == "m2"] == ["0", "2", "10"]
    assert [layer for m, layer in order if m == "m1"] == ["0", "1", "final"]


@pytest.mark.parametrize("metric", ["maxcorr", "svcca"])
def test_missing_metric_is_named(metric):
    table, _ = similarity_table()
    with pytest.raises(ValueError, match=f"metric '{metric}'"):
        analyses.localization(table[table.metric != metric])


def test_missing_pair_is_named():
    table, _ = similarity_table(drop=("svcca", 1, 4))
    with pytest.raises(ValueError, match="'svcca'.*m1:1 vs m2:2"):
        analyses.localization(table)
    # The a == b rows are not needed.
    table, _ = similarity_table(drop=("maxcorr", 2, 2))
    assert analyses.localization(table).score.notna().all()


def test_bad_input():
    table, _ = similarity_table()
    with pytest.raises(ValueError, match="expected pool in"):
        analyses.localization(table, pool="layers")
    with pytest.raises(ValueError, match="missing \\['value'\\]"):
        analyses.localization(table.drop(columns="value"))
    with pytest.raises(ValueError, match="duplicates"):
        analyses.localization(pd.concat([table, table[table.metric == "svcca"].iloc[:1]]))


def test_undefined_scores_are_nan_with_warning():
    table, _ = similarity_table()
    one_model = table[(table.model_a == "m1") & (table.model_b == "m1")]
    # pool="models" with a single model: no partners, no means, no score.
    with pytest.warns(analyses.LocalizationWarning, match="at least 2 networks"):
        got = analyses.localization(one_model, pool="models")
    assert got.score.isna().all() and got.localized.isna().all()
    flat = table.assign(value=np.where(table.metric == "maxcorr", 0.5, table.value))
    with pytest.warns(analyses.LocalizationWarning, match="sample std 0"):
        got = analyses.localization(flat)
    assert got.score.isna().all()
    np.testing.assert_allclose(got.localized, 0.5)


def test_topk_table_rows():
    ks = (0.5, 1.0)
    rng = np.random.default_rng(0)
    values = {"maxcorr": rng.uniform(size=(3, 3, 2)), "svcca": rng.uniform(size=(3, 3, 2))}
    nets = [("m1", "0"), ("m1", "1"), ("m2", "final")]
    got = analyses.topk_table(values, nets, ks)
    assert list(got.columns) == list(analyses.TOPK_COLUMNS)
    assert len(got) == 2 * 3 * 3 * 2
    row = got[
        (got.metric == "svcca") & (got.layer_a == "1") & (got.model_b == "m2") & (got.k == 0.5)
    ]
    assert row.value.item() == values["svcca"][1, 2, 0]
    with pytest.raises(ValueError, match=r"expected values\['maxcorr'\] of shape"):
        analyses.topk_table({"maxcorr": np.zeros((3, 3, 3))}, nets, ks)


def test_best_matches_by_hand():
    table, values = similarity_table(seed=3, metrics=("maxcorr", "svcca", "procrustes"))
    got = analyses.best_matches(table, ["maxcorr", "procrustes"])
    assert list(got.columns) == ["model_a", "model_b", "metric", "best_match", "networks"]
    # Metrics in the order asked, models in order of first appearance (the table is shuffled).
    assert list(got.metric) == ["maxcorr"] * 2 + ["procrustes"] * 2
    assert list(got.model_a[:2]) == list(got.model_a[2:]) and set(got.model_a) == {"m1", "m2"}
    got = (
        got.set_index(["model_a", "model_b", "metric"])
        .loc[[("m1", "m2", "maxcorr"), ("m2", "m1", "maxcorr"), ("m1", "m2", "procrustes")]]
        .reset_index()
    )
    m1, m2 = [0, 1, 2], [3, 4, 5]
    cross = values["maxcorr"][np.ix_(m1, m2)]
    np.testing.assert_allclose(got.best_match[0], cross.max(axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(
        got.best_match[1], values["maxcorr"][np.ix_(m2, m1)].max(axis=1).mean(), rtol=1e-12
    )
    # Procrustes is a distance: the best match is the smallest.
    dist = values["procrustes"][np.ix_(m1, m2)]
    np.testing.assert_allclose(got.best_match[2], dist.min(axis=1).mean(), rtol=1e-12)
    assert list(got.networks) == [3, 3, 3]


def test_best_matches_nan_and_missing_metric():
    table, _ = similarity_table(seed=4, metrics=("maxcorr",))
    table.loc[table.model_a == "m2", "value"] = np.nan
    got = analyses.best_matches(table).set_index("model_a")
    assert got.best_match["m1"] > 0 and got.networks["m1"] == 3
    assert np.isnan(got.best_match["m2"]) and got.networks["m2"] == 0
    with pytest.raises(ValueError, match="svcca"):
        analyses.best_matches(table, ["svcca"])
