"""Tests of `sslsim_jax.report` on synthetic result directories (no models are run)."""

from __future__ import annotations

import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sslsim_jax import report, results

# Two 4-layer models, post-LN (layers 0..4) and pre-LN (0..4 and "final"), plus a fine-tuned
# copy of the post-LN one.
LAYERS = {
    "w2v-post": ["0", "1", "2", "3", "4"],
    "hub-pre": ["0", "1", "2", "3", "4", "final"],
    "w2v-post-ft": ["0", "1", "2", "3", "4"],
}
METRICS = ("linear_cka", "maxcorr", "procrustes")
FRAMES = 1234
HEADS = 3


def _value(metric: str, a: str, la: str, b: str, lb: str) -> float:
    """Deterministic synthetic values; maxcorr is deliberately asymmetric, the others not."""
    ia = list(LAYERS).index(a) * 10 + LAYERS[a].index(la)
    ib = list(LAYERS).index(b) * 10 + LAYERS[b].index(lb)
    if metric == "maxcorr":
        return 0.5 + 0.45 * math.sin(0.37 * ia + 1.1 * ib)
    lo, hi = sorted((ia, ib))
    base = 0.5 + 0.45 * math.cos(0.21 * lo + 0.13 * hi + 0.05 * lo * hi)
    return 2.0 * (1.0 - base) if metric == "procrustes" else base


def _similarities(*, ci: bool) -> pd.DataFrame:
    rows = []
    for metric in METRICS:
        for a in LAYERS:
            for b in LAYERS:
                for la in LAYERS[a]:
                    for lb in LAYERS[b]:
                        v = _value(metric, a, la, b, lb)
                        row = dict(
                            model_a=a, layer_a=la, model_b=b, layer_b=lb, metric=metric, value=v
                        )
                        if ci:
                            row.update(ci_low=v - 0.03, ci_high=v + 0.02)
                        rows.append(row)
    return pd.DataFrame(rows)


def _heads() -> pd.DataFrame:
    rows = []
    for method, offset in (("fro", 0.0), ("js", 0.1)):
        for a, b in (("w2v-post", "hub-pre"), ("hub-pre", "w2v-post")):
            for layer in ("1", "2"):
                for ha in range(HEADS):
                    for hb in range(HEADS):
                        value = 0.5 + offset + 0.1 * ha - 0.05 * hb + 0.01 * int(layer)
                        rows.append((a, layer, ha, b, layer, hb, method, value))
    return pd.DataFrame(rows, columns=results.HEAD_COLUMNS)


def _run_info() -> dict:
    return {
        "models": [
            {
                "name": name,
                "path": f"/models/{name}",
                "config_hash": f"hash-{name}",
                "num_layers": 4,
                "model_type": "hubert" if name.startswith("hub") else "wav2vec2",
                "ctc_head": name.endswith("-ft"),
            }
            for name in LAYERS
        ],
        "finetune_pairs": [["w2v-post", "w2v-post-ft"]],
        "frames": FRAMES,
        "utterances": [
            {"path": "/audio/a.wav", "duration": 1.5, "frames": 74},
            {"path": "/audio/b.flac", "duration": 2.0, "frames": 99},
        ],
        "settings": {"metrics": list(METRICS), "seed": 7, "bootstrap": 0},
        "versions": {"sslsim_jax": "0.1.0", "jax": "0.10.2"},
    }


def _write(out: Path, *, ci: bool = False, heads: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _similarities(ci=ci).to_csv(out / "similarities.csv", index=False)
    (out / "run.json").write_text(json.dumps(_run_info()))
    if heads:
        _heads().to_csv(out / "attention_heads.csv", index=False)
        neurons = pd.DataFrame(
            [
                ("w2v-post", "1", 5, "hub-pre", "2", 9, 0.93),
                ("w2v-post", "1", 6, "hub-pre", "2", 3, -0.4),
            ],
            columns=results.NEURON_COLUMNS,
        )
        neurons.to_csv(out / "neurons.csv", index=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    out = _write(tmp_path_factory.mktemp("run"), ci=True, heads=True)
    return out, report.build_report(out)


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def test_layer_order_numbers_then_final():
    assert report.layer_order(["10", "final", "2", "0", "2"]) == ["0", "2", "10", "final"]


def test_read_results_types(tmp_path):
    results = report.read_results(_write(tmp_path, ci=True))
    sim = results.similarities
    assert results.models == list(LAYERS)
    assert results.frames == FRAMES
    assert results.has_ci
    assert results.finetune_pairs == [("w2v-post", "w2v-post-ft")]
    assert sim.layer_a.map(type).eq(str).all() and sim.value.dtype == float
    assert results.attention_heads is None and results.neurons is None


@pytest.mark.parametrize(
    ("model_a", "model_b"),
    [("w2v-post", "hub-pre"), ("hub-pre", "w2v-post"), ("hub-pre", "hub-pre")],
)
@pytest.mark.parametrize("metric", METRICS)
def test_heatmap_data_labels_and_orientation(metric, model_a, model_b):
    table = _similarities(ci=False)
    fig = report.heatmap(table, metric=metric, model_a=model_a, model_b=model_b, frames=FRAMES)
    ax = fig.axes[0]
    assert ax.get_ylabel() == f"{model_a} layer"
    assert ax.get_xlabel() == f"{model_b} layer"
    assert _labels(ax.get_yticklabels()) == LAYERS[model_a]
    assert _labels(ax.get_xticklabels()) == LAYERS[model_b]
    data = np.ma.filled(ax.images[0].get_array(), np.nan)
    expected = np.array(
        [
            [_value(metric, model_a, la, model_b, lb) for lb in LAYERS[model_b]]
            for la in LAYERS[model_a]
        ]
    )
    np.testing.assert_allclose(data, expected, rtol=1e-12)
    title = ax.get_title()
    assert metric in title and model_a in title and model_b in title and f"{FRAMES:,}" in title
    colourbar = fig.axes[1].get_ylabel()
    assert report.METRIC_INFO[metric].label in colourbar
    lo, hi = ax.images[0].get_clim()
    if metric == "procrustes":
        assert "lower = more similar" in colourbar and (lo, hi) == (0.0, 2.0)
    else:
        assert "higher = more similar" in colourbar and (lo, hi) == (0.0, 1.0)
    # Small grid: every cell annotated with its value.
    assert len(ax.texts) == expected.size
    assert ax.texts[0].get_text() == f"{expected[0, 0]:.2f}"


def test_x_centric_heatmap_is_not_transposed():
    table = _similarities(ci=False)
    a, b = "w2v-post", "w2v-post-ft"
    fig = report.heatmap(table, metric="maxcorr", model_a=a, model_b=b)
    data = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    row = table[
        (table.metric == "maxcorr")
        & (table.model_a == a)
        & (table.layer_a == "1")
        & (table.model_b == b)
        & (table.layer_b == "3")
    ]
    assert data[1, 3] == row.value.item()
    assert not np.allclose(data, data.T)
    assert "row in terms of column" in fig.axes[0].get_title()


def test_heatmap_many_layers_is_readable_and_marks_missing_cells():
    layers = [str(i) for i in range(25)] + ["final"]
    rows = [
        ("big", la, "big", lb, "linear_cka", np.nan if (la, lb) == ("3", "final") else 0.5)
        for la in layers
        for lb in layers
    ]
    table = pd.DataFrame(rows, columns=results.SIMILARITY_COLUMNS)
    fig = report.heatmap(table, metric="linear_cka", model_a="big", model_b="big")
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == layers
    assert not ax.texts  # too many cells to annotate
    assert ax.images[0].get_array().mask[3, -1]
    width, height = fig.get_size_inches()
    assert width >= 8 and height >= 7


def test_heatmap_unknown_pair_raises():
    with pytest.raises(ValueError, match="no rows for metric='svcca'"):
        report.heatmap(
            _similarities(ci=False), metric="svcca", model_a="w2v-post", model_b="hub-pre"
        )


@pytest.mark.parametrize("ci", [False, True])
def test_finetune_plot_lines_equal_table(ci):
    table = _similarities(ci=ci)
    pre, ft = "w2v-post", "w2v-post-ft"
    fig = report.finetune_plot(table, pretrained=pre, finetuned=ft, frames=FRAMES)
    similarity_ax, distance_ax = fig.axes[:2]
    assert similarity_ax.get_ylabel() == "similarity"
    assert "lower = more similar" in distance_ax.get_ylabel()
    assert distance_ax.get_xlabel() == f"layer i ({pre}:i vs {ft}:i)"
    assert _labels(distance_ax.get_xticklabels()) == LAYERS[pre]
    assert pre in fig.get_suptitle() and ft in fig.get_suptitle()
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert set(lines) == set(METRICS)
    for metric, line in lines.items():
        expected = [_value(metric, pre, i, ft, i) for i in LAYERS[pre]]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(LAYERS[pre])))
    assert {t.get_text() for t in similarity_ax.get_legend().get_texts()} == {
        "linear_cka",
        "maxcorr",
    }
    bands = [c for ax in fig.axes for c in ax.collections]
    assert len(bands) == (len(METRICS) if ci else 0)
    if ci:
        top = bands[0].get_paths()[0].vertices[:, 1]
        expected = [_value("linear_cka", pre, i, ft, i) for i in LAYERS[pre]]
        np.testing.assert_allclose(top.max(), max(expected) + 0.02, rtol=1e-12)


def test_finetune_plot_with_final_layer_and_metric_choice():
    table = _similarities(ci=False)
    fig = report.finetune_plot(
        table, pretrained="hub-pre", finetuned="hub-pre", metrics=["maxcorr"]
    )
    assert len(fig.axes) == 1
    assert _labels(fig.axes[0].get_xticklabels()) == LAYERS["hub-pre"]
    with pytest.raises(ValueError, match="expected metrics among"):
        report.finetune_plot(table, pretrained="hub-pre", finetuned="hub-pre", metrics=["svcca"])


def test_attention_head_heatmap_data():
    heads = _heads()
    fig = report.attention_head_heatmap(
        heads, model_a="w2v-post", layer_a="2", model_b="hub-pre", layer_b="2", method="fro"
    )
    ax = fig.axes[0]
    assert ax.get_ylabel() == "w2v-post layer 2 head" and ax.get_xlabel() == "hub-pre layer 2 head"
    data = np.ma.filled(ax.images[0].get_array(), np.nan)
    expected = [[0.5 + 0.1 * ha - 0.05 * hb + 0.02 for hb in range(HEADS)] for ha in range(HEADS)]
    np.testing.assert_allclose(data, expected, rtol=1e-12)
    grid = report.attention_head_grid(heads, model_a="w2v-post", model_b="hub-pre", method="js")
    assert [ax.get_title() for ax in grid.axes[:2]] == ["layer 1", "layer 2"]


def test_build_report_writes_every_figure(built):
    out, path = built
    assert path == str(out / "report.html")
    figures = {p.name for p in (out / "figures").glob("*.png")}
    expected = {"finetune_w2v-post__w2v-post-ft.png"}
    models = list(LAYERS)
    for metric in METRICS:
        for i, a in enumerate(models):
            for j, b in enumerate(models):
                if report.METRIC_INFO[metric].x_centric or i <= j:
                    expected.add(f"heatmap_{metric}__{a}__{b}.png")
    expected |= {
        f"heads_{m}__{a}__{b}.png"
        for m in ("fro", "js")
        for a, b in (("w2v-post", "hub-pre"), ("hub-pre", "w2v-post"))
    }
    expected |= {f"grid_{m}.png" for m in METRICS}  # the paper's all-networks figure
    assert figures == expected
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.partial"))


def test_figures_drawn_by_worker_processes_equal_those_drawn_here(built, tmp_path, monkeypatch):
    """The same report with 2 worker processes (from the first figure on): the same files,
    PNG sizes and page; grids with a secondary axis cannot be pickled and are drawn here."""
    out, path = built
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("figures", "report.html"))
    monkeypatch.setattr(report, "INLINE_FIGURES", 0)
    report.build_report(again, workers=2)
    ours = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert sorted(p.name for p in (again / "figures").glob("*.png")) == ours
    for name in ours:
        a, b = (out / "figures" / name).read_bytes(), (again / "figures" / name).read_bytes()
        assert a[16:24] == b[16:24], name  # width and height
    assert (again / "report.html").read_text() == Path(path).read_text()


def test_report_html_references_figures_and_provenance(built):
    out, path = built
    page = Path(path).read_text(encoding="utf-8")
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    assert sources == {f"figures/{p.name}" for p in (out / "figures").glob("*.png")}
    for model in _run_info()["models"]:
        assert model["path"] in page and model["config_hash"] in page
    assert f"{FRAMES:,}" in page and "<strong>2</strong> utterances" in page
    assert "/audio/b.flac" in page and "0.10.2" in page and "bootstrap" in page
    assert "95% CI [" in page
    # A layer × layer table: the maxcorr value of w2v-post:1 in terms of hub-pre:final.
    assert f"{_value('maxcorr', 'w2v-post', '1', 'hub-pre', 'final'):.3f}" in page
    assert "neurons.csv" in page and "0.930" in page


def test_missing_run_json_names_the_file(tmp_path):
    out = _write(tmp_path)
    (out / "run.json").unlink()
    with pytest.raises(report.ResultsError, match=r"run\.json: file not found"):
        report.build_report(out)


def test_missing_similarities_names_the_file(tmp_path):
    out = _write(tmp_path)
    (out / "similarities.csv").unlink()
    with pytest.raises(report.ResultsError, match=r"similarities\.csv: file not found"):
        report.read_results(out)


@pytest.mark.parametrize("column", ["layer_b", "metric", "value"])
def test_missing_column_is_named(tmp_path, column):
    out = _write(tmp_path)
    _similarities(ci=False).drop(columns=column).to_csv(out / "similarities.csv", index=False)
    with pytest.raises(report.ResultsError, match=rf"similarities\.csv: missing column '{column}'"):
        report.read_results(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.assign(value=t.value.astype(object).where(t.index != 4, "abc")),
            "'value' expects a number, got 'abc' in data row 5",
        ),
        (
            lambda t: t.assign(layer_a=t.layer_a.where(t.index != 0, "1.0")),
            "'layer_a' expects a layer number or 'final', got '1.0'",
        ),
        (lambda t: t.assign(model_b=t.model_b.where(t.index != 0, "other")), "names model 'other'"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "duplicate row for model_a=w2v-post"),
        (lambda t: t.assign(ci_low=0.1), "has column 'ci_low' but not 'ci_high'"),
    ],
)
def test_invalid_similarities_are_named(tmp_path, edit, message):
    out = _write(tmp_path)
    edit(_similarities(ci=False)).to_csv(out / "similarities.csv", index=False)
    with pytest.raises(report.ResultsError, match=re.escape(message)):
        report.read_results(out)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "run.json: not valid JSON"),
        ("[]", "run.json: expected a JSON object"),
        ("{}", "run.json: missing key 'models'"),
        (
            '{"models": [{"name": "w2v-post"}], "finetune_pairs": [["w2v-post", "x"]]}',
            "finetune_pairs[0]",
        ),
    ],
)
def test_invalid_run_json_is_named(tmp_path, text, message):
    out = _write(tmp_path)
    (out / "run.json").write_text(text)
    with pytest.raises(report.ResultsError, match=re.escape(message)):
        report.read_results(out)


def test_invalid_attention_heads_is_named(tmp_path):
    out = _write(tmp_path, heads=True)
    _heads().drop(columns="head_b").to_csv(out / "attention_heads.csv", index=False)
    with pytest.raises(report.ResultsError, match=r"attention_heads\.csv: missing column 'head_b'"):
        report.read_results(out)


def test_rebuild_replaces_files_atomically(tmp_path):
    out = _write(tmp_path)
    table = _similarities(ci=False)
    small = table[(table.metric == "linear_cka") & table.model_a.isin(["w2v-post", "w2v-post-ft"])]
    small[small.model_b.isin(["w2v-post", "w2v-post-ft"])].to_csv(
        out / "similarities.csv", index=False
    )
    first = report.build_report(out)
    before = Path(first).stat().st_ino
    assert report.build_report(out) == first
    assert Path(first).stat().st_ino != before  # replaced by rename, not rewritten in place
    assert not list(out.rglob("*.partial"))


def test_model_names_with_the_same_slug_get_distinct_files(tmp_path):
    out = _write(tmp_path)
    rows = [(a, "0", b, "0", "linear_cka", 0.5) for a in ("m/x", "m x") for b in ("m/x", "m x")]
    pd.DataFrame(rows, columns=results.SIMILARITY_COLUMNS).to_csv(
        out / "similarities.csv", index=False
    )
    (out / "run.json").write_text(json.dumps({"models": [{"name": "m/x"}, {"name": "m x"}]}))
    page = Path(report.build_report(out)).read_text(encoding="utf-8")
    heatmaps = {f for f in re.findall(r'<img src="([^"]+)"', page) if "heatmap_" in f}
    assert len(heatmaps) == 3
    assert len(list((out / "figures").glob("heatmap_*.png"))) == 3


def test_savez_writes_what_np_load_reads_bit_for_bit(tmp_path):
    """`results.savez` (checkpoints): 0-d, empty, strided, NaN-holding, several dtypes, and
    arrays spanning several write pieces come back from `np.load` unchanged."""
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(40, 30)).astype(np.float32)
    wide[3, 4] = np.nan
    arrays = {
        "done": np.array(7),
        "empty": np.zeros((0, 3), np.float32),
        "strided": wide[:, ::2],
        "big": wide,
        "flags": rng.random(9) > 0.5,
        "x64": rng.normal(size=5),
        "heads.a\x1fb\x1ffro.total": np.ones((2, 3), np.float32),
    }
    results.atomic_write(
        tmp_path / "c.npz", lambda f: results.savez(f, arrays, chunk=1000), binary=True, direct=True
    )
    with np.load(tmp_path / "c.npz") as back:
        assert sorted(back.files) == sorted(arrays)
        for key, array in arrays.items():
            got = back[key]
            assert got.dtype == array.dtype and got.shape == array.shape, key
            assert got.tobytes() == np.ascontiguousarray(array).tobytes(), key


def test_read_npz_reads_what_np_load_reads_into_the_given_memory(tmp_path):
    """`results.read_npz` (checkpoints): `savez`'s files (.npy 2.0) and `np.savez`'s (1.0, a
    Fortran-ordered array) into memory from ``allocate``; compressed members through NumPy;
    a file cut short is an error, not a short array."""
    from sslsim_jax import host_stats

    rng = np.random.default_rng(1)
    arrays = {
        "done": np.array(7),
        "empty": np.zeros((0, 3), np.float32),
        "big": rng.normal(size=(300, 70)).astype(np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(6, 5))),
        "flags": rng.random(9) > 0.5,
    }
    results.atomic_write(tmp_path / "a.npz", lambda f: results.savez(f, arrays), binary=True)
    np.savez(tmp_path / "b.npz", **arrays)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    given = []

    def allocate(shape, dtype):
        given.append(host_stats.mapped_zeros(shape, dtype))
        return given[-1]

    for name in ("a.npz", "b.npz", "c.npz"):
        given.clear()
        back = results.read_npz(tmp_path / name, allocate=allocate)
        assert list(back) == list(arrays), name
        for key, array in arrays.items():
            got = back[key]
            assert got.dtype == array.dtype and got.shape == array.shape, (name, key)
            np.testing.assert_array_equal(got, array, err_msg=f"{name} {key}")
        if name != "c.npz":  # stored members: every array in the memory given
            assert len(given) == len(arrays)
            assert np.shares_memory(back["big"], given[2])
            # np.savez keeps the Fortran order; `savez` writes every array in C order
            assert back["fortran"].flags.f_contiguous == (name == "b.npz")
    data = (tmp_path / "b.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: data.index(b"big.npy") + 40000])
    with pytest.raises(zipfile.BadZipFile):
        results.read_npz(tmp_path / "cut.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:  # a member shorter than its header
        with zf.open("big.npy", "w") as f:
            np.lib.format.write_array_header_1_0(
                f, np.lib.format.header_data_from_array_1_0(arrays["big"])
            )
            f.write(arrays["big"].tobytes()[:1000])
    with pytest.raises(ValueError, match="expected 84000 bytes of array data, got 1000"):
        results.read_npz(tmp_path / "short.npz")


@pytest.mark.parametrize("direct", [True, False])
def test_checkpoint_files_written_around_the_page_cache_hold_every_byte(
    tmp_path, monkeypatch, direct
):
    """`results.atomic_write(direct=True)`: through `DirectWriter` (O_DIRECT, page-aligned
    blocks, the tail padded then cut off) where the file system allows it, else buffered; the
    file holds exactly the bytes written either way, across several buffer fills."""
    monkeypatch.setattr(results.DirectWriter, "SIZE", 3 * results.DirectWriter.BLOCK)
    if not direct:
        monkeypatch.setattr(results.DirectWriter, "open", classmethod(lambda cls, path: None))
    used = []
    opened = results.DirectWriter.open
    monkeypatch.setattr(
        results.DirectWriter, "open", lambda path: used.append(opened(path)) or used[-1]
    )
    data = np.random.default_rng(1).integers(0, 256, 5 * 4096 + 123, dtype=np.uint8)
    pieces = [data[:7], data[7:9000], data[9000:]]
    path = tmp_path / "ckpt.bin"
    results.atomic_write(path, lambda f: [f.write(p) for p in pieces], binary=True, direct=True)
    assert path.read_bytes() == data.tobytes()
    assert len(used) == 1 and (direct or used[0] is None)
    assert not list(tmp_path.glob("*.partial"))


def test_direct_writes_refused_midway_are_written_again_buffered(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses a later write (EINVAL): the whole
    file is written again through the page cache; other errors still fail the write."""
    import errno

    def refuse(self, data):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(results.DirectWriter, "write", refuse)
    path = tmp_path / "ckpt.bin"
    results.atomic_write(path, lambda f: f.write(b"abc" * 5000), binary=True, direct=True)
    assert path.read_bytes() == b"abc" * 5000

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.DirectWriter, "write", full)
    (tmp_path / "probe").touch()
    probe = results.DirectWriter.open(str(tmp_path / "probe"))
    if probe is not None:  # O_DIRECT works on this file system
        probe.close()
        with pytest.raises(OSError, match="cannot write .*other.bin"):
            results.atomic_write(tmp_path / "other.bin", lambda f: f.write(b"x"), direct=True,
                                 binary=True)  # fmt: skip
        assert not (tmp_path / "other.bin").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_top_neuron_matches_equal_a_sort_of_each_pair():
    """The report's neuron tables: each pair of different models' rows of largest |r|, NaN last,
    ties in file order, pairs in run.json order; against a per-pair pandas sort."""
    rng = np.random.default_rng(0)
    models = ["w2v-post", "hub-pre", "w2v-post-ft"]
    n = 3000
    neurons = pd.DataFrame(
        {
            "model_a": rng.choice(models, n),
            "layer_a": rng.choice(["0", "1", "final"], n),
            "neuron_a": rng.integers(0, 50, n),
            "model_b": rng.choice(models, n),
            "layer_b": rng.choice(["0", "2"], n),
            "matched_neuron_b": rng.integers(0, 50, n),
            "correlation": rng.choice([0.9, -0.9, 0.5, np.nan, *rng.random(40)], n),
        }
    )
    for top in (7, 1000):  # fewer than a pair's rows (ties at the cut), and more
        got = report._top_matches(neurons, models, top)
        expected = []
        for a in models:
            for b in models:
                rows = neurons[(neurons.model_a == a) & (neurons.model_b == b)]
                if a != b and len(rows):
                    magnitude = rows.correlation.abs()
                    order = magnitude.sort_values(ascending=False, kind="stable").index
                    expected.append((a, b, rows.loc[order][:top]))
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in expected]
        for (_, _, rows), (_, _, want) in zip(got, expected, strict=True):
            pd.testing.assert_frame_equal(rows, want)
    one_model = neurons[(neurons.model_a == "hub-pre") & (neurons.model_b == "hub-pre")]
    assert report._top_matches(one_model, models, 7) == []
