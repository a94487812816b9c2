"""End-to-end tests of the analysis pipeline and ``sslsim analyze``: numbers, outputs, resume,
and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib import resources

import chex
import jax
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import sslsim_jax
from sslsim_jax import audio, cli, demo
from sslsim_jax.analysis import STATE_DIR, Settings, analyze, prepare_models
from sslsim_jax.checkpoints import save_converted

SPEECH = audio.demo_audio_paths()


def save_demo_model(path, name="tiny_wav2vec2", seed=0, poison_layer=None):
    """A converted directory of a built-in tiny model; optionally NaN in one block's weights."""
    model = demo.demo_model(name, seed=seed)
    params = jax.tree.map(np.array, model.params)
    if poison_layer is not None:
        bias = params["encoder"]["layers"]["feed_forward"]["output_dense"]["bias"]  # [L, D]
        bias[poison_layer, 0] = np.nan
    config = resources.files("sslsim_jax").joinpath("data", f"{name}.json")
    with resources.as_file(config) as config_path:
        save_converted(config_path, params, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [
        save_demo_model(root / "w2v", "tiny_wav2vec2", seed=0),
        save_demo_model(root / "hubert", "tiny_hubert", seed=1),
    ]


@pytest.fixture(scope="module")
def analysis(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    settings = Settings(
        metrics=("linear_cka", "maxcorr", "svcca", "debiased_cka"),
        attention=True,
        attention_methods=("fro", "js", "linear_cka"),
        batch_seconds=5.0,
        bootstrap=4,
    )
    table = analyze(models, SPEECH[:3], out, settings, progress=False)
    return out, table


def test_table_equals_library_on_the_same_activations(models, analysis):
    out, table = analysis
    networks: dict[str, list[np.ndarray]] = {}
    for path in models:
        model = sslsim_jax.load_model(path)
        name = os.path.basename(path)
        for p in SPEECH[:3]:  # each utterance alone: no padding at all
            x = audio.load(p)
            x = audio.normalize(x[None], np.array([len(x)]))
            out_ = model.intermediates(x)
            h = np.asarray(out_.hidden_states)[:, 0]
            for layer in range(h.shape[0]):
                networks.setdefault(f"{name}:{layer}", []).append(h[layer])
            if model.config.do_stable_layer_norm:
                final = np.asarray(out_.final_hidden_state)[0]
                networks.setdefault(f"{name}:final", []).append(final)
    arrays = {k: np.concatenate(v) for k, v in networks.items()}
    metrics = ["linear_cka", "maxcorr", "svcca", "debiased_cka"]
    expected = sslsim_jax.compare(arrays, metrics=metrics)
    expected[["model_b", "layer_b"]] = expected.network_b.str.rsplit(":", n=1, expand=True)
    expected[["model_a", "layer_a"]] = expected.network_a.str.rsplit(":", n=1, expand=True)
    merged = table.merge(expected, on=["model_a", "layer_a", "model_b", "layer_b", "metric"])
    assert len(merged) == len(expected) == 4 * 11 * 11
    np.testing.assert_allclose(merged.value_x, merged.value_y, atol=2e-5)


def test_rbf_cka_on_the_stated_frame_subsample(models, tmp_path):
    """rbf_cka from the CLI equals the library's RBF CKA on the frames `rbf_plan` names, taken
    from each utterance run alone; it has no bootstrap interval."""
    from sslsim_jax.analysis.extract import rbf_plan
    from sslsim_jax.metrics.representation import rbf_cka_matrix

    settings = Settings(
        metrics=("rbf_cka", "linear_cka"), max_seconds=1.5, rbf_frames=120, bootstrap=2
    )
    table = analyze(models[:1], SPEECH[:2], tmp_path, settings, progress=False, report=False)
    model = sslsim_jax.load_model(models[0])
    hidden = []
    for p in SPEECH[:2]:
        x = audio.load(p, max_seconds=1.5)
        x = audio.normalize(x[None], np.array([len(x)]))
        hidden.append(np.asarray(model.intermediates(x).hidden_states)[:, 0])  # [L+1, T, D]
    entries = prepare_models([("w2v", model)], settings)
    chosen = rbf_plan(entries, [int(audio.load(p, max_seconds=1.5).size) for p in SPEECH[:2]],
                      settings)  # fmt: skip
    frames = np.concatenate([h[:, t] for h, t in zip(hidden, chosen, strict=True)], axis=1)
    assert frames.shape[1] == 120
    expected = np.asarray(rbf_cka_matrix(list(frames), max_frames=120))
    rbf = table[table.metric == "rbf_cka"]
    got = rbf.pivot(index="layer_a", columns="layer_b", values="value").to_numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert rbf.ci_low.isna().all() and table[table.metric == "linear_cka"].ci_low.notna().all()


def test_outputs_and_provenance(analysis, models):
    out, table = analysis
    written = pd.read_csv(out / "similarities.csv", dtype={"layer_a": str, "layer_b": str})
    assert list(written.columns) == [
        "model_a", "layer_a", "model_b", "layer_b", "metric", "value", "ci_low", "ci_high",
    ]  # fmt: skip
    layer_metrics = written[~written.metric.str.startswith("attention_")]
    assert np.isfinite(layer_metrics[["value", "ci_low", "ci_high"]].to_numpy()).all()
    assert (layer_metrics.ci_low <= layer_metrics.ci_high + 1e-9).all()
    assert set(written.metric) == {
        "linear_cka", "maxcorr", "svcca", "debiased_cka", "attention_fro", "attention_js",
        "attention_linear_cka",
    }  # fmt: skip
    assert {"final"} <= set(written[written.model_a == "hubert"].layer_a)
    run = json.loads((out / "run.json").read_text())
    assert [m["name"] for m in run["models"]] == ["w2v", "hubert"]
    assert all(len(m["config_hash"]) == 16 for m in run["models"])
    assert [u["path"] for u in run["utterances"]] == SPEECH[:3]
    assert run["frames"] == sum(u["frames"] for u in run["utterances"]) > 0
    assert run["versions"]["jax"] == jax.__version__
    compiled = run["compilation"]
    assert compiled["batch_shapes"] and compiled["compilations"] > 0
    assert compiled["compile_seconds"] > 0 and compiled["trace_seconds"] > 0
    stages = run["seconds"]
    assert set(stages) == {"statistics", "metrics", "checkpoint", "tables", "total"}
    assert min(stages.values()) >= 0 and stages["statistics"] > 0 and stages["metrics"] > 0
    assert sum(stages.values()) - stages["total"] <= stages["total"] + 0.05
    heads = pd.read_csv(out / "attention_heads.csv")
    assert set(heads.method) == {"fro", "js"} and np.isfinite(heads.value).all()
    neurons = pd.read_csv(out / "neurons.csv")
    assert {"matched_neuron_b", "correlation"} <= set(neurons.columns)
    ranks = pd.read_csv(out / "neuron_rankings.csv")
    assert set(ranks.maxcorr_rank) == set(range(1, 97))
    assert (out / "report.html").is_file() and any((out / "figures").glob("heatmap_*.png"))
    grids = {p.name for p in (out / "figures").glob("grid_*.png")}
    assert grids == {f"grid_{m}.png" for m in set(written.metric)}
    assert {"localization.png", "topk.png"} <= {p.name for p in (out / "figures").glob("*.png")}


def test_topk_at_one_is_the_metric_and_localization_follows_the_table(analysis):
    """topk.csv and localization.csv come from the run's statistics and table; recomputed here
    with NumPy from similarities.csv (Wu et al.: z-scores with ddof = 1, every other network)."""
    out, _ = analysis
    table = pd.read_csv(out / "similarities.csv", dtype={"layer_a": str, "layer_b": str})
    topk = pd.read_csv(out / "topk.csv", dtype={"layer_a": str, "layer_b": str})
    assert set(topk.metric) == {"maxcorr", "svcca"}
    np.testing.assert_allclose(sorted(set(topk.k)), np.arange(1, 11) / 10)
    keys = ["model_a", "layer_a", "model_b", "layer_b", "metric"]
    at_one = topk[topk.k == 1.0].merge(table, on=keys, suffixes=("", "_table"))
    assert len(at_one) == 2 * 11 * 11
    np.testing.assert_allclose(at_one.value, at_one.value_table, atol=2e-5)
    top = topk[topk.k == 0.1].merge(table, on=keys, suffixes=("", "_table"))
    assert (top.value >= top.value_table - 1e-5).all()  # the top tenth is above the mean

    loc = pd.read_csv(out / "localization.csv", dtype={"layer": str})
    others = table[(table.model_a + table.layer_a) != (table.model_b + table.layer_b)]
    means = others.groupby(["model_a", "layer_a", "metric"]).value.mean().unstack()
    z = (means - means.mean()) / means.std(ddof=1)
    expected = (z["maxcorr"] - z["svcca"]).rename("expected").reset_index()
    got = loc.merge(expected, left_on=["model", "layer"], right_on=["model_a", "layer_a"])
    assert len(got) == 11
    np.testing.assert_allclose(got.score, got.expected, atol=1e-9)


def test_attention_map_cka_is_one_on_the_diagonal_and_symmetric(analysis):
    _, table = analysis
    cka = table[table.metric == "attention_linear_cka"]
    assert len(cka) == (4 + 4) ** 2  # every attention layer of both models, both orders
    same = cka[(cka.model_a == cka.model_b) & (cka.layer_a == cka.layer_b)]
    np.testing.assert_allclose(same.value, 1.0, atol=1e-5)
    pivot = cka.pivot_table(
        index=["model_a", "layer_a"], columns=["model_b", "layer_b"], values="value"
    )
    np.testing.assert_allclose(pivot.to_numpy(), pivot.to_numpy().T, atol=1e-6)


def test_attention_layer_score_matches_head_table(analysis):
    out, table = analysis
    heads = pd.read_csv(out / "attention_heads.csv", dtype={"layer_a": str, "layer_b": str})
    sel = heads[(heads.model_a == "w2v") & (heads.model_b == "hubert") & (heads.method == "js")]
    sel = sel[(sel.layer_a == "2") & (sel.layer_b == "3")]
    expected = sel.groupby("head_a").value.max().mean()
    row = table[
        (table.metric == "attention_js") & (table.model_a == "w2v") & (table.layer_a == "2")
        & (table.model_b == "hubert") & (table.layer_b == "3")
    ]  # fmt: skip
    assert row.value.item() == pytest.approx(expected, abs=1e-6)


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sslsim_jax.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_interrupted_run_resumes_to_the_same_table(models, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) after the second checkpoint, by a hook on the checkpoint writer, not
    a timed kill; the same command again continues there and gives the uninterrupted table."""
    from sslsim_jax.analysis import state as state_lib
    from sslsim_jax.cli import main

    args = ["analyze", *models, "--audio", *SPEECH, "--metrics", "linear_cka", "pwcca",
            "--no-report", "--quiet", "--batch-seconds", "1", "--max-seconds", "1.5",
            "--checkpoint-seconds", "0"]  # fmt: skip
    out = tmp_path / "interrupted"  # 5 batches of one clip each, all of one padded shape
    save, saved = state_lib.save_checkpoint, []

    def save_then_stop(path, state):
        save(path, state)
        saved.append(state.done)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(state_lib, "save_checkpoint", save_then_stop)
    assert main([*args, "--out", str(out)]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    (state,) = (out / STATE_DIR).glob("*.npz")
    with np.load(state) as arrays:
        assert int(arrays["done"]) == 2 < len(SPEECH)
    assert not (out / "similarities.csv").exists()

    monkeypatch.setattr(state_lib, "save_checkpoint", save)
    resumed = []
    monkeypatch.setattr(state_lib, "load_checkpoint", _spy(state_lib.load_checkpoint, resumed))
    assert main([*args, "--out", str(out)]) == 0
    assert resumed == [2]
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    a = pd.read_csv(out / "similarities.csv")
    b = pd.read_csv(tmp_path / "fresh" / "similarities.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert len(run["utterances"]) == len(SPEECH)


def _spy(fn, calls):
    """``fn``, recording the batch count of each state it returns (the state is mutated later)."""

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(out.done)
        return out

    return wrapped


# --- bad input: one line naming the file or argument, exit status 1, no traceback ---------------


def cli_error(capsys, *args) -> str:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 1, captured
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    (root / "text.wav").write_text("this is not audio\n" * 100)
    (root / "empty.wav").write_bytes(b"")
    sf.write(root / "zero.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "short.wav", np.random.default_rng(0).standard_normal(300) * 0.1, 16000)
    t = np.arange(int(44100 * 1.5)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3
    sf.write(root / "stereo44k.wav", stereo, 44100)
    t48 = np.arange(48000) / 48000
    sf.write(root / "mono48k.flac", np.sin(2 * np.pi * 200 * t48) * 0.3, 48000)
    return root


def analyze_args(models, audio_arg, out, *extra):
    return ["analyze", *models, "--audio", *audio_arg, "--out", str(out), "--no-report",
            "--quiet", "--metrics", "linear_cka", *extra]  # fmt: skip


def test_missing_audio_path(capsys, models, tmp_path):
    line = cli_error(capsys, *analyze_args(models, [str(tmp_path / "nope.wav")], tmp_path / "o"))
    assert "nope.wav" in line


@pytest.mark.parametrize("name", ["text.wav", "empty.wav", "zero.wav"])
def test_unreadable_or_empty_audio(capsys, models, bad_audio, tmp_path, name):
    line = cli_error(capsys, *analyze_args(models, [str(bad_audio / name)], tmp_path / "o"))
    assert name in line


def test_short_clip_skipped_with_warning_all_short_fails(capsys, models, bad_audio, tmp_path):
    code = cli.main(analyze_args(models, [str(bad_audio / "short.wav"), SPEECH[0]], tmp_path / "a"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning:" in captured.err and "short.wav" in captured.err
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert [u["path"] for u in run["utterances"]] == [SPEECH[0]]
    line = cli_error(capsys, *analyze_args(models, [str(bad_audio / "short.wav")], tmp_path / "b"))
    assert "short.wav" in line


def test_stereo_and_high_sample_rates_work(capsys, models, bad_audio, tmp_path):
    files = [str(bad_audio / "stereo44k.wav"), str(bad_audio / "mono48k.flac")]
    assert cli.main(analyze_args(models, files, tmp_path)) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert [u["sample_rate_in"] for u in run["utterances"]] == [44100, 48000]
    assert [u["channels_in"] for u in run["utterances"]] == [2, 1]
    assert [u["num_samples"] for u in run["utterances"]] == [24000, 16000]


def test_model_directory_errors(capsys, models, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(models[0], no_config)
    (no_config / "config.json").unlink()
    line = cli_error(capsys, *analyze_args([str(no_config)], SPEECH[:1], tmp_path / "o"))
    assert "no_config" in line and "config.json" in line


def test_missing_and_unexpected_weights(capsys, tmp_path):
    from safetensors.numpy import load_file, save_file

    torch = pytest.importorskip("torch")
    del torch
    from tests import hf_models

    cfg = json.loads((resources.files("sslsim_jax") / "data" / "tiny_hubert.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    good = tmp_path / "good"
    hf_models.build(good, "hubert", **cfg)
    capsys.readouterr()  # transformers' save progress bar
    state = load_file(good / "model.safetensors")
    for name, change in {
        "missing": lambda s: s.pop("encoder.layers.1.final_layer_norm.weight"),
        "unexpected": lambda s: s.update({"encoder.extra.weight": np.zeros(3, np.float32)}),
    }.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        broken = dict(state)
        change(broken)
        save_file(broken, str(bad / "model.safetensors"))
        line = cli_error(capsys, *analyze_args([str(bad)], SPEECH[:1], tmp_path / "o"))
        key = "final_layer_norm.weight" if name == "missing" else "encoder.extra.weight"
        assert f"{name} key" in line and key in line and str(bad) in line


def test_layers_out_of_range(capsys, models, tmp_path):
    line = cli_error(capsys, *analyze_args(models, SPEECH[:1], tmp_path, "--layers", "0", "9"))
    assert "--layers" in line and "9" in line and "w2v" in line


def test_final_layer_of_post_ln_model_is_an_error(capsys, models, tmp_path):
    line = cli_error(capsys, *analyze_args(models, SPEECH[:1], tmp_path, "--layers", "final"))
    assert "--layers" in line and "post-LN" in line


def test_unknown_metric(capsys, models, tmp_path):
    line = cli_error(capsys, *analyze_args(models, SPEECH[:1], tmp_path, "--metrics", "cosine"))
    assert "--metrics" in line and "cosine" in line


def test_unwritable_out(capsys, models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = cli_error(capsys, *analyze_args(models, SPEECH[:1], blocker / "out"))
    assert "--out" in line and "a_file" in line


def test_nan_in_activations_names_model_layer_and_utterance(capsys, models, tmp_path):
    poisoned = save_demo_model(tmp_path / "poisoned", poison_layer=2)
    line = cli_error(capsys, *analyze_args([models[1], poisoned], SPEECH[:2], tmp_path / "o"))
    assert "model poisoned" in line and "layer 3" in line and SPEECH[0] in line


def test_error_has_no_traceback_in_a_real_process(models, tmp_path):
    run = run_cli(*analyze_args(models, [str(tmp_path / "missing.flac")], tmp_path / "o"))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("sslsim analyze: error:")


def test_report_command_redraws_from_saved_results(analysis, capsys):
    out, _ = analysis
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_models_with_different_frame_rates_are_named(capsys, models, tmp_path):
    other = tmp_path / "fast"
    shutil.copytree(models[0], other)
    config = json.loads((other / "config.json").read_text())
    config["conv_stride"] = [5, 2, 2, 2, 2, 2, 1]  # 160 samples per frame: same param shapes
    (other / "config.json").write_text(json.dumps(config))
    line = cli_error(capsys, *analyze_args([models[0], str(other)], SPEECH[:1], tmp_path / "o"))
    assert "frame rates" in line and "w2v (320" in line and "fast (160" in line


def test_finished_run_reuses_its_statistics_for_other_metrics(models, analysis, monkeypatch):
    """Runs last in this file: it rewrites the shared analysis' similarities.csv."""
    out, _ = analysis

    def no_extraction(*args, **kwargs):
        raise AssertionError("a finished run must not run the models again")

    monkeypatch.setattr(sslsim_jax.SpeechModel, "intermediates", no_extraction)
    settings = Settings(
        metrics=("procrustes",),
        attention=True,
        attention_methods=("fro", "js", "linear_cka"),
        batch_seconds=5.0,
        bootstrap=4,
    )
    table = analyze(models, SPEECH[:3], out, settings, progress=False, report=False)
    assert set(table.metric) == {
        "procrustes",
        "attention_fro",
        "attention_js",
        "attention_linear_cka",
    }
    self_pairs = table[(table.metric == "procrustes") & (table.model_a == table.model_b)]
    self_pairs = self_pairs[self_pairs.layer_a == self_pairs.layer_b]
    np.testing.assert_allclose(self_pairs.value, 0.0, atol=1e-4)


def test_precision_and_dtype_settings_reach_the_models_and_metrics(models, tmp_path, monkeypatch):
    from sslsim_jax.analysis import tables

    seen = {}
    forward, compare = sslsim_jax.SpeechModel.intermediates, tables.compare_moments

    def spy_forward(self, *args, **kwargs):
        seen["model"] = (jax.config.jax_default_matmul_precision, self.module.dtype)
        return forward(self, *args, **kwargs)

    def spy_compare(*args, **kwargs):
        seen["metrics"] = jax.config.jax_default_matmul_precision
        return compare(*args, **kwargs)

    monkeypatch.setattr(sslsim_jax.SpeechModel, "intermediates", spy_forward)
    monkeypatch.setattr(tables, "compare_moments", spy_compare)
    settings = Settings(
        metrics=("linear_cka",), max_seconds=1.0, precision="tensorfloat32", dtype="bfloat16"
    )
    table = analyze(models, SPEECH[:1], tmp_path, settings, progress=False, report=False)
    assert seen == {"model": ("tensorfloat32", jax.numpy.bfloat16), "metrics": "tensorfloat32"}
    assert np.isfinite(table.value).all()
    assert jax.config.jax_default_matmul_precision is None  # restored after the run
    for bad in (dict(precision="fast"), dict(dtype="float16")):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}: expected one of"):
            Settings(**bad)


def test_statistics_too_large_for_the_device_fail_early(capsys, models, tmp_path, monkeypatch):
    """Under the device's memory the statistics run in passes; only when one pair of networks
    cannot fit does the run stop, before any model runs, naming --max-memory."""
    plan = importlib.import_module("sslsim_jax.analysis.plan")
    extract = importlib.import_module("sslsim_jax.analysis.extract")

    def no_extraction(*args, **kwargs):
        raise AssertionError("must fail before running the models")

    # Two networks of width 96: 4·192²·(1 + 10 + 3) ≈ 2.06 MB, more than 1 MB.
    monkeypatch.setattr(plan, "memory_limit", lambda device: (1_000_000, "test device"))
    monkeypatch.setattr(sslsim_jax.SpeechModel, "intermediates", no_extraction)
    line = cli_error(capsys, *analyze_args(models, SPEECH[:1], tmp_path, "--bootstrap", "10"))
    assert line.endswith(
        "--max-memory: one pair of networks (192 neurons, bootstrap 10) needs 2.1 MB per "
        "device, more than the budget of 1.0 MB: raise it, keep fewer replicates or split the "
        "statistics over devices (stat_shards)"
    )
    # The statistics of 11 networks (1056 neurons): 4·1056²·14 ≈ 62.4 MB.
    monkeypatch.setattr(plan, "memory_limit", lambda device: (4_000_000, "test device"))
    mesh = jax.sharding.Mesh(jax.devices(), "d")
    with pytest.raises(ValueError, match="need about 62.4 MB per device, more than the 4.0 MB"):
        extract.check_memory((96,) * 11, Settings(bootstrap=10), mesh)
    monkeypatch.setattr(plan, "memory_limit", lambda device: (10**12, "test device"))
    extract.check_memory((96,) * 10, Settings(bootstrap=10), mesh)  # fits: no error


# 4·W²·(1 + 2 + 3) bytes for W neurons: 14.2 MB holds 768 neurons, groups of at most 384 (4
# networks of 96), so the 11 networks of the two models make 3 groups and 3 passes.
PASSES = Settings(
    metrics=("maxcorr", "linreg", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes"),
    max_seconds=1.0,
    bootstrap=2,
    batch_seconds=1.0,
    checkpoint_seconds=0,
    max_memory="14155776",
)


def test_each_model_traces_once_per_batch_shape(models, tmp_path, monkeypatch):
    from sslsim_jax import intermediates as intermediates_module

    # 5 clips cropped to 1 s (one padded length) in batches of 2, 2 and 1: batch sizes 2 and 1.
    settings = Settings(metrics=("linear_cka",), max_seconds=1.0, batch_seconds=2.0)
    traced = chex.assert_max_traces(intermediates_module.forward, n=4)  # 2 layouts x 2 shapes
    monkeypatch.setattr(intermediates_module, "forward", traced)
    intermediates_module._forward.clear_cache()  # shared by every model: other tests filled it
    analyze(models, SPEECH, tmp_path / "o", settings, progress=False, report=False)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["compilation"]["batch_shapes"] == [[1, 16000], [2, 16000]]
    with pytest.raises(AssertionError, match="traced > 4 times"):  # the counter counts
        settings = dataclasses.replace(settings, max_seconds=1.5)
        analyze(models, SPEECH, tmp_path / "p", settings, progress=False, report=False)


def test_batch_sizes_come_from_a_small_set():
    from sslsim_jax.analysis.inputs import padded_batch

    sizes = [padded_batch(n) for n in range(1, 100)]
    assert sorted(set(sizes)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert all(n <= s <= max(n * 3 / 2, 2) for n, s in zip(range(1, 100), sizes, strict=True))
    assert [padded_batch(n, 8) for n in (1, 5, 9, 13, 17)] == [8, 8, 16, 16, 24]


def test_several_passes_equal_one_pass(models, tmp_path):
    from sslsim_jax.analysis.plan import plan_passes

    assert len(plan_passes((96,) * 11, budget=14155776, bootstrap=2).passes) == 3
    # More frames (~400) than neurons (96): with fewer, canonical correlations tie at 1 and
    # PWCCA's weights depend on float rounding in any implementation (see test_metrics).
    many = dataclasses.replace(
        PASSES,
        max_seconds=2.0,
        batch_seconds=2.0,
        attention=True,
        attention_methods=("fro", "js", "linear_cka", "svcca"),
    )
    one = dataclasses.replace(many, max_memory=None)
    analyze(models, SPEECH[:4], tmp_path / "one", one, progress=False, report=False)
    analyze(models, SPEECH[:4], tmp_path / "three", many, progress=False, report=False)
    run = json.loads((tmp_path / "three" / "run.json").read_text())
    assert len(run["plan"]["passes"]) == 3 and len(run["plan"]["groups"]) == 3
    assert (
        run["attention_skipped_utterances"]
        == json.loads((tmp_path / "one" / "run.json").read_text())["attention_skipped_utterances"]
    )
    table = pd.read_csv(tmp_path / "three" / "similarities.csv")
    assert {"attention_fro", "attention_js", "attention_linear_cka", "attention_svcca"} < set(
        table.metric
    )
    # Every attention measure gets bootstrap intervals.
    attention = table[table.metric.str.startswith("attention_")]
    assert np.isfinite(attention[["ci_low", "ci_high"]]).all().all()
    assert (attention.ci_low <= attention.ci_high + 1e-6).all()
    for metric, rows in attention.groupby("metric"):
        assert (rows.ci_low < rows.ci_high).any(), metric
    for name in ("similarities.csv", "neurons.csv", "neuron_rankings.csv", "topk.csv",
                 "localization.csv", "attention_heads.csv"):  # fmt: skip
        a = pd.read_csv(tmp_path / "one" / name)
        b = pd.read_csv(tmp_path / "three" / name)
        if name == "similarities.csv":
            # A bootstrap replicate keeps ~250 distinct frames for 2 x 96 neurons: its canonical
            # correlations nearly tie and PWCCA's weights follow float32 rounding (measured:
            # CI bounds 2e-3 apart, its value 2e-7). linreg's pseudo-inverse there keeps
            # eigenvalues down to 8 eps of the largest, whose float32 rounding moves a CI bound
            # (a replicate's R² of 0.98; the value is 0.54) by 1.3e-5 on one AMD EPYC and by
            # 1.05e-4 on a Zen 4 (AVX-512 kernels). Every other CI within 1e-5.
            for metric, atol in (("pwcca", 1e-2), ("linreg", 1e-3)):
                rows = a.metric == metric
                for col in ("ci_low", "ci_high"):
                    np.testing.assert_allclose(a[col][rows], b[col][rows], atol=atol)
                    a.loc[rows, col] = b.loc[rows, col]
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-5, obj=name)


def test_a_run_interrupted_between_passes_resumes(models, tmp_path, monkeypatch):
    from sslsim_jax.analysis import state as state_lib

    save, saved = state_lib.save_checkpoint, []

    def save_then_stop(path, state):
        save(path, state)
        saved.append(path)
        if len(set(saved)) == 2:  # the first checkpoint of the second pass
            raise KeyboardInterrupt

    monkeypatch.setattr(state_lib, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        analyze(models, SPEECH[:2], tmp_path / "out", PASSES, progress=False, report=False)
    monkeypatch.setattr(state_lib, "save_checkpoint", save)
    assert len(list((tmp_path / "out" / STATE_DIR).glob("*.npz"))) == 2
    resumed = analyze(models, SPEECH[:2], tmp_path / "out", PASSES, progress=False, report=False)
    fresh = analyze(models, SPEECH[:2], tmp_path / "fresh", PASSES, progress=False, report=False)
    pd.testing.assert_frame_equal(resumed, fresh, check_exact=False, rtol=1e-6)


def test_compiled_programs_are_cached_across_runs(models, tmp_path):
    cache = tmp_path / "cache"
    args = analyze_args(models, SPEECH[:1], tmp_path / "o", "--max-seconds", "1")
    # The tiny models compile in under the cache's 1 s threshold: JAX's own variable lowers it.
    env = dict(
        os.environ, SSLSIM_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    run = subprocess.run(
        [sys.executable, "-m", "sslsim_jax.cli", *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    entries = list(cache.iterdir())
    assert entries, "the compiled programs should be in the cache"
    assert cli.compilation_cache() is None  # this process: SSLSIM_CACHE_DIR=none (conftest)


def test_share_keeps_list_indices_and_may_be_empty_with_several_processes(
    models, bad_audio, tmp_path
):
    from sslsim_jax.analysis import load_share, prepare_models

    entries = prepare_models(models[:1], Settings())
    paths = [SPEECH[0], str(bad_audio / "short.wav"), SPEECH[1], SPEECH[2]]
    with pytest.warns(UserWarning, match="shorter than the model's receptive field"):
        utterances, ids = load_share(paths, entries, Settings())
    assert ids == [0, 2, 3] and [u.path for u in utterances] == [paths[i] for i in ids]
    # The bootstrap seeds are list indices, also in a process's share.
    assert load_share(paths, entries, Settings(), shard=(0, 2))[1] == [0, 2]
    with pytest.warns(UserWarning):
        assert load_share(paths, entries, Settings(), shard=(1, 4)) == ([], [])
        with pytest.raises(ValueError, match="no usable audio"):
            load_share(paths[1:2], entries, Settings())


def test_analysis_leaves_the_callers_models_untouched(tmp_path):
    model = demo.demo_model("tiny_wav2vec2", seed=0)
    params = model.params
    settings = Settings(metrics=("linear_cka",), max_seconds=1.0)
    analyze([("w2v", model)], SPEECH[:1], tmp_path, settings, progress=False, report=False)
    assert model.params is params
    placed = model.placed(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert placed.params is not params and placed.module is model.module
    np.testing.assert_array_equal(jax.tree.leaves(placed.params)[0], jax.tree.leaves(params)[0])
