"""Hostile but realistic use: nothing silently wrong (stale statistics, files of an earlier run,
undefined values written as numbers), and faults that end in a one-line error or a recovery."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from sslsim_jax import audio, cli, results
from sslsim_jax.analysis import STATE_DIR, Settings, analyze
from sslsim_jax.analysis.run import lock_output_dir
from sslsim_jax.analysis.state import CheckpointWarning
from tests.conftest import run_on_devices
from tests.test_pipeline import cli_error, save_demo_model

SPEECH = audio.demo_audio_paths()
QUICK = Settings(metrics=("linear_cka",), max_seconds=1.0)


def quick(models, audio_source, out, settings=QUICK, **kwargs) -> pd.DataFrame:
    return analyze(models, audio_source, out, settings, progress=False, report=False, **kwargs)


@pytest.fixture
def model_dir(tmp_path):
    return save_demo_model(tmp_path / "w2v", "tiny_wav2vec2", seed=0)


def test_weights_changed_in_place_are_not_served_from_old_statistics(model_dir, tmp_path):
    out = tmp_path / "out"
    first = quick([model_dir], SPEECH[:1], out)
    digest = json.loads((out / results.RUN).read_text())["models"][0]["weights_digest"]
    shutil.rmtree(model_dir)
    save_demo_model(model_dir, "tiny_wav2vec2", seed=5)  # same path, same config, new weights
    again = quick([model_dir], SPEECH[:1], out)
    fresh = quick([model_dir], SPEECH[:1], tmp_path / "fresh")
    assert json.loads((out / results.RUN).read_text())["models"][0]["weights_digest"] != digest
    np.testing.assert_allclose(again.value, fresh.value, rtol=1e-6)
    assert not np.allclose(again.value, first.value, rtol=1e-3)


def test_audio_changed_in_place_is_not_served_from_old_statistics(model_dir, tmp_path):
    clip = tmp_path / "clip.wav"
    shutil.copy(SPEECH[0], clip)
    out = tmp_path / "out"
    first = quick([model_dir], [clip], out)
    samples, rate = sf.read(SPEECH[1], frames=16000)
    sf.write(clip, samples, rate)  # other speech, same name
    again = quick([model_dir], [clip], out)
    fresh = quick([model_dir], [clip], tmp_path / "fresh")
    np.testing.assert_allclose(again.value, fresh.value, rtol=1e-6)
    assert not np.allclose(again.value, first.value, rtol=1e-3)


def test_a_new_run_leaves_no_file_of_the_earlier_one(model_dir, tmp_path):
    other = save_demo_model(tmp_path / "hubert", "tiny_hubert", seed=1)
    out = tmp_path / "out"
    attention = Settings(
        metrics=("linear_cka",), max_seconds=1.0, attention=True, attention_methods=("js",)
    )
    analyze([model_dir, other], SPEECH[:1], out, attention, progress=False)
    assert (out / results.ATTENTION_HEADS).is_file()
    figures = set((out / results.FIGURES).glob("*.png"))
    analyze([model_dir], SPEECH[:1], out, QUICK, progress=False)
    assert not (out / results.ATTENTION_HEADS).exists()
    table = pd.read_csv(out / results.SIMILARITIES)
    assert set(table.model_a) == {"w2v"} and not table.metric.str.startswith("attention").any()
    page = (out / results.REPORT).read_text()
    assert "hubert" not in page and "Attention heads" not in page
    left = set((out / results.FIGURES).glob("*.png"))
    assert left and not any("hubert" in p.name for p in left) and left != figures


def test_second_run_into_a_locked_directory_stops(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).mkdir()
    with lock_output_dir(str(out)):
        line = cli_error(
            capsys, "analyze", model_dir, "--audio", SPEECH[0], "--out", str(out), "--quiet"
        )
    assert f"--out: {out}: another sslsim run (pid {os.getpid()}" in line
    assert not (out / results.SIMILARITIES).exists()


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated"])
def test_damaged_checkpoint_is_named_and_recomputed(model_dir, tmp_path, damage):
    out = tmp_path / "out"
    first = quick([model_dir], SPEECH[:2], out)
    (checkpoint,) = (out / STATE_DIR).glob("*.npz")
    checkpoint.write_bytes(damage)
    with pytest.warns(CheckpointWarning, match=f"{checkpoint}: unreadable checkpoint"):
        again = quick([model_dir], SPEECH[:2], out)
    np.testing.assert_allclose(again.value, first.value, rtol=1e-6)
    assert checkpoint.with_suffix(".npz.bad").is_file()
    quick([model_dir], SPEECH[:2], out)  # and later runs are not blocked


def test_split_statistics_checkpoint_with_orbax_and_survive_damage():
    """stat_shards > 1: the checkpoint is an orbax folder written from the shards (no .npz),
    restored onto the same devices bit for bit; a damaged one is named, set aside and
    recomputed like a damaged .npz."""
    code = """
        import os, tempfile, warnings
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from sslsim_jax import distributed, sharded
        from sslsim_jax.analysis import Settings
        from sslsim_jax.analysis import state as S
        settings = Settings(stat_shards=2, bootstrap=2, devices=2)
        mesh = distributed.make_mesh(2, local=True, stat_shards=2)
        sizes = (2, 3, 3)
        layout = sharded.Layout(sizes, 2)
        z = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
        zp = np.asarray(layout.pad([z[:, :2], z[:, 2:5], z[:, 5:]]))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
        state = S.init_state(sizes, settings, [], mesh)
        state.moments = sharded.update(state.moments, put(zp), put(np.ones(40, np.float32)), mesh)
        state.done, state.frames = 3, 40
        path = os.path.join(tempfile.mkdtemp(), "key.npz")
        S.save_checkpoint(path, state)
        assert not os.path.exists(path) and os.path.isdir(path[:-4] + ".orbax")
        template = S.init_state(sizes, settings, [], mesh)
        back = S.load_checkpoint(path, template)
        assert (back.done, back.frames) == (3, 40)
        assert back.moments.comoment.sharding == state.moments.comoment.sharding
        np.testing.assert_array_equal(back.moments.comoment, state.moments.comoment)
        for root, _, files in os.walk(path[:-4] + ".orbax"):
            for name in files:
                open(os.path.join(root, name), "wb").close()  # truncated to nothing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = S.load_checkpoint(path, template)
        assert again is template, again.done
        (message,) = [str(w.message) for w in caught if w.category is S.CheckpointWarning]
        assert message.startswith(path[:-4] + ".orbax: unreadable checkpoint"), message
        assert os.path.isdir(path[:-4] + ".orbax.bad")
        S.save_checkpoint(path, state)  # later runs are not blocked
        assert S.load_checkpoint(path, template).done == 3
        print("ok")
        """
    run = run_on_devices(code, devices=2, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_all_silent_audio_gives_undefined_not_zero(model_dir, tmp_path):
    clip = tmp_path / "silence.wav"
    sf.write(clip, np.zeros(16000, np.float32), 16000)
    settings = Settings(metrics=("linear_cka", "maxcorr", "svcca"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        table = quick([model_dir], [clip], tmp_path / "out", settings)
    same = table[table.layer_a == table.layer_b]
    # A network compared with itself is 1 when it varies at all, undefined (NaN) when not.
    assert ((same.value - 1).abs() < 1e-5).sum() + same.value.isna().sum() == len(same)
    assert not (table.value == 0.0).any()


def test_one_model_still_writes_headed_neuron_rankings(model_dir, tmp_path):
    quick([model_dir], SPEECH[:1], tmp_path / "out")
    header = (tmp_path / "out" / results.NEURON_RANKINGS).read_text().splitlines()[0]
    assert header.split(",") == list(results.NEURON_RANKING_COLUMNS)


def test_full_disk_names_the_file(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'x.csv'}: No space left"):
        results.atomic_write(tmp_path / "x.csv", full)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_outputs_are_readable_by_others_under_umask_022(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        analyze([model_dir], SPEECH[:1], tmp_path / "out", QUICK, progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    outputs = [p for p in files if STATE_DIR not in p.parts]
    assert {p.name for p in outputs} >= {results.SIMILARITIES, results.RUN, results.REPORT}
    for path in files:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_damaged_converted_model_names_the_files(model_dir, tmp_path, capsys):
    (metadata,) = [p for p in (tmp_path / "w2v" / "params").rglob("*") if p.name == "_METADATA"]
    metadata.write_text('{"tree_metadata": ')
    line = cli_error(capsys, "analyze", model_dir, "--audio", SPEECH[0], "--out", str(tmp_path))
    assert "params: damaged or incomplete orbax checkpoint of model" in line
    assert "w2v" in line


def test_the_cli_says_how_much_space_the_statistics_keep(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", model_dir, "--audio", SPEECH[0], "--out", str(out), "--quiet"]
    assert cli.main([*args, "--metrics", "linear_cka", "--no-report"]) == 0
    said = capsys.readouterr().out
    assert f"statistics kept in {out / STATE_DIR}" in said and "MB" in said


def test_a_file_failing_to_decode_mid_run_is_named_and_the_run_resumes(
    model_dir, tmp_path, monkeypatch, capsys
):
    """Audio is planned from headers and decoded batch by batch: a file that cannot be decoded
    when its batch comes stops the run with its name, and the checkpoints before it stay valid."""
    clips = [str(tmp_path / f"c{i}.wav") for i in range(3)]
    for i, clip in enumerate(clips):
        shutil.copy(SPEECH[i], clip)
    load = audio.load

    def failing(path, **kwargs):
        if os.fspath(path) == clips[2]:
            raise audio.AudioError(f"{path}: not a readable audio file (simulated)")
        return load(path, **kwargs)

    monkeypatch.setattr(audio, "load", failing)
    args = ["analyze", model_dir, "--audio", *clips, "--out", str(tmp_path / "out"), "--quiet",
            "--metrics", "linear_cka", "--no-report", "--max-seconds", "1",
            "--batch-seconds", "1", "--checkpoint-seconds", "0"]  # fmt: skip
    line = cli_error(capsys, *args)
    assert line.endswith(f"{clips[2]}: not a readable audio file (simulated)")
    (checkpoint,) = (tmp_path / "out" / STATE_DIR).glob("*.npz")
    with np.load(checkpoint) as arrays:
        assert int(arrays["done"]) == 2
    monkeypatch.setattr(audio, "load", load)
    assert cli.main(args) == 0
    fresh = quick([model_dir], clips, tmp_path / "fresh")
    table = pd.read_csv(tmp_path / "out" / results.SIMILARITIES)
    np.testing.assert_allclose(table.value, fresh.value, rtol=1e-6)


def test_attention_maps_of_a_long_utterance_stop_before_the_first_batch(
    model_dir, tmp_path, monkeypatch, capsys
):
    """The maps of the longest utterance (L·H·T² floats) are checked against the memory before
    any model runs: a one-line error naming --max-seconds, never the hang of a failed
    allocation."""
    from sslsim_jax import memory

    long = tmp_path / "long.wav"
    sf.write(long, np.random.default_rng(0).standard_normal(16000 * 120) * 0.1, 16000)
    monkeypatch.setattr(memory, "available_memory", lambda **kw: (2 * 10**9, "test RAM"))
    line = cli_error(
        capsys, "analyze", model_dir, "--audio", str(long), "--out", str(tmp_path / "out"),
        "--attention", "--quiet", "--no-report",
    )  # fmt: skip
    assert line.startswith("sslsim analyze: error: --max-seconds: an utterance of 120.0 s")
    assert "of maps" in line and "use --max-seconds" in line
