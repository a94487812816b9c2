"""Tests of the neuron tables (`NeuronMatches`: ``neurons.csv``, ``neuron_rankings.csv``) against
row-by-row pandas references, and of reading result tables back (`results.read_results`'s
typed parser against its cell-by-cell one). No models are run."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

from sslsim_jax import results
from sslsim_jax.analysis.tables import NeuronMatches

# Odd names on purpose: a comma and a quote (quoted in CSV), a numeric model name, "final".
NAMES = ["w2v:0", "w2v:1", 'hub,"x":0', 'hub,"x":final', "2024:3"]
SIZES = (5, 5, 3, 3, 4)


def _matches(seed: int = 0) -> NeuronMatches:
    rng = np.random.default_rng(seed)
    m = NeuronMatches.empty(NAMES, SIZES)
    k, p = len(NAMES), max(SIZES)
    best = rng.random((k, p, k)).astype(np.float32)
    best[:, :, 1] = rng.choice([0.5, 0.25], (k, p))  # ties
    best[1, 2, :] = np.nan  # a constant neuron of w2v:1: no match anywhere, not even itself
    best[:, :, 4] = np.nan  # an all-constant network
    best[4, :, :] = np.nan
    best[0, 0, 2] = 1e-20
    best[0, 1, 2] = 1.0000001  # float32 rounding above 1
    m.fill({"best": best, "matched": rng.integers(0, p, (k, p, k))}, range(k))
    return m


def _reference_rows(m: NeuronMatches) -> pd.DataFrame:
    """The rows one by one: network a, neuron a, network b."""
    rows = []
    for a, name_a in enumerate(m.names):
        model_a, layer_a = name_a.rsplit(":", 1)
        for i in range(m.sizes[a]):
            for b, name_b in enumerate(m.names):
                model_b, layer_b = name_b.rsplit(":", 1)
                rows.append(
                    (model_a, layer_a, i, model_b, layer_b, int(m.matched[a, i, b]),
                     float(m.best[a, i, b]))
                )  # fmt: skip
    return pd.DataFrame(rows, columns=results.NEURON_COLUMNS)


def _reference_rankings(pairs: pd.DataFrame, names, pool: str) -> pd.DataFrame:
    """Wu et al.'s rankings by pandas group-bys over the rows."""
    model_of = {n: n.rsplit(":", 1)[0] for n in names}
    a = pairs.model_a + ":" + pairs.layer_a
    b = pairs.model_b + ":" + pairs.layer_b
    pooled = pairs[a.map(model_of) != b.map(model_of)] if pool == "models" else pairs[a != b]
    frames = []
    for name in names:
        model, layer = name.rsplit(":", 1)
        rows = pooled[(pooled.model_a == model) & (pooled.layer_a == layer)]
        if rows.empty:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            agg = rows.groupby("neuron_a", sort=True).correlation.agg(["max", "min"])
        own = pairs[(a == name) & (b == name)].set_index("neuron_a").correlation
        ok = own.reindex(agg.index).notna().to_numpy()
        mx = np.where(ok, agg["max"], np.nan)
        mn = np.where(ok, agg["min"], np.nan)

        def rank(v, ok=ok):  # 1 = highest; constant neurons last; ties by neuron order
            return pd.Series(np.where(ok, -v, np.inf)).rank(method="first").astype(int)

        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "layer": layer,
                    "neuron": agg.index.to_numpy(),
                    "maxcorr": mx,
                    "mincorr": mn,
                    "maxcorr_rank": rank(mx).to_numpy(),
                    "mincorr_rank": rank(mn).to_numpy(),
                    "constant": ~ok,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_neuron_rows_are_the_row_by_row_table():
    m = _matches()
    expected = _reference_rows(m)
    pd.testing.assert_frame_equal(m.frame(), expected)


def test_neurons_csv_is_what_pandas_writes(tmp_path):
    """Byte for byte: quoting, the float64 repr of each float32 |r|, empty cells for NaN."""
    m = _matches()
    path = m.write(tmp_path)
    assert open(path).read() == _reference_rows(m).to_csv(index=False)
    back = pd.read_csv(path, dtype={"layer_a": str, "layer_b": str})
    np.testing.assert_array_equal(back.correlation, _reference_rows(m).correlation)


@pytest.mark.parametrize("pool", ["networks", "models"])
def test_rankings_equal_group_bys_of_the_rows(pool):
    m = _matches()
    got = m.rankings(pool)
    expected = _reference_rankings(_reference_rows(m), NAMES, pool)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got.constant.sum() == 1 + 4  # w2v:1 neuron 2 and the all-constant network
    assert got[got.model == "w2v"].maxcorr_rank.max() == 5


def test_passes_fill_the_pairs_they_own():
    """Two passes over overlapping networks, each owning some pairs: every pair comes from its
    owner; the table equals one pass's."""
    one = _matches(seed=1)
    k = len(NAMES)
    passes = [[0, 1, 2, 4], [0, 2, 3, 4]]
    # Each pair's owner: a pass holding both networks, drawn at random; 9: none does (1 and 3).
    rng = np.random.default_rng(2)
    owner = np.full((k, k), 9)
    for x in range(k):
        for y in range(k):
            holders = [i for i, nets in enumerate(passes) if x in nets and y in nets]
            owner[x, y] = rng.choice(holders) if holders else 9
    split = NeuronMatches.empty(NAMES, SIZES)
    for i, nets in enumerate(passes):
        g = np.asarray(nets)
        owns = owner[np.ix_(g, g)] == i
        # A pass's values over its own networks; the rows it does not own are noise.
        noise = np.random.default_rng(i).random((len(g), max(SIZES), len(g)), dtype=np.float32)
        best = np.where(owns[:, None, :], one.best[np.ix_(g, range(max(SIZES)), g)], noise)
        matched = one.matched[np.ix_(g, range(max(SIZES)), g)]
        split.fill({"best": best, "matched": matched}, nets, owns)
    held = (owner[:, None, :] < 2) & np.ones((1, max(SIZES), 1), bool)
    np.testing.assert_array_equal(split.best[held], one.best[held])
    assert np.isnan(split.best[1, :, 3]).all()


# -- reading result tables: the typed parser and the checked one agree ---------------------


def _table(layers=("0", "1", "2", "3")) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model_a": "m",
            "layer_a": list(layers),
            "model_b": "m",
            "layer_b": "0",
            "metric": "cka",
            "value": [0.25, 0.5, 0.75, 1.0],
        }
    )


def _read(path, *, typed: bool):
    kinds = dict(text=("model_a", "layer_a", "model_b", "layer_b", "metric"), numbers=("value",))
    if not typed:
        real, results._read_typed = results._read_typed, lambda *a, **k: None
    try:
        return results._read_csv(path, results.SIMILARITY_COLUMNS, **kinds)
    except results.ResultsError as e:
        return str(e)
    finally:
        if not typed:
            results._read_typed = real


@pytest.mark.parametrize(
    ("column", "cell"),
    [
        ("value", "True"),  # the typed parser alone would read 1.0
        ("value", "false"),
        ("value", "0x10"),
        ("value", "NAN"),
        ("value", " 0.5 "),
        ("value", "inf"),
        ("value", "-Infinity"),
        ("value", ""),
        ("value", "1_000"),
        ("layer_a", "01"),  # the typed parser alone would read 1
        ("layer_a", "1.0"),
        ("layer_a", "final"),
        ("layer_a", " "),
        ("model_a", "2024"),
        ("metric", "12"),
    ],
)
@pytest.mark.parametrize("numeric_layers", [True, False])
def test_typed_read_equals_the_checked_read(tmp_path, column, cell, numeric_layers):
    table = _table() if numeric_layers else _table(("0", "1", "final", "3"))
    table[column] = table[column].astype(object)
    table.loc[2, column] = cell
    path = tmp_path / "similarities.csv"
    table.to_csv(path, index=False)
    typed, checked = _read(path, typed=True), _read(path, typed=False)
    if isinstance(checked, str):
        assert typed == checked
        assert re.search(r"in data row 3|expects a layer|is empty", checked)
    else:
        pd.testing.assert_frame_equal(typed, checked)
        assert typed.layer_a.map(type).eq(str).all() and typed.value.dtype == np.float64


def test_numeric_model_names_read_back_as_written(tmp_path):
    table = _table()
    table["model_a"] = ["007", "7", "7.0", "0"]
    path = tmp_path / "similarities.csv"
    table.to_csv(path, index=False)
    frame = _read(path, typed=True)
    assert list(frame.model_a) == ["007", "7", "7.0", "0"]
    assert list(frame.layer_a) == ["0", "1", "2", "3"]


def test_a_column_of_booleans_is_not_read_as_numbers(tmp_path):
    """pandas' typed parser reads a column of nothing but booleans as 1.0 and 0.0."""
    table = _table()
    table["value"] = ["True", "False", "", "TRUE"]
    path = tmp_path / "similarities.csv"
    table.to_csv(path, index=False)
    message = "'value' expects a number, got 'True' in data row 1"
    assert message in _read(path, typed=True)
    assert message in _read(path, typed=False)
