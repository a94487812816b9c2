"""Audio sources (`sslsim_jax.sources`): waveforms from Python and Hugging Face datasets give
the same model input as the files they came from, are planned without decoding, and bad items
are one-line errors naming the item."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import soxr

from sslsim_jax import audio, cli, sources
from sslsim_jax.analysis import Settings, analyze
from tests.test_pipeline import save_demo_model

datasets = pytest.importorskip("datasets")

SPEECH = audio.demo_audio_paths()


def planned(source, max_seconds=None):
    count, plan = sources.catalogue(source)
    return [plan(i, max_seconds) for i in range(count)]


def file_samples(max_seconds=None):
    return [audio.load(p, max_seconds=max_seconds) for p in SPEECH[:3]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The first 3 demo clips as a saved Dataset and as a saved DatasetDict."""
    root = tmp_path_factory.mktemp("datasets")
    ds = datasets.Dataset.from_dict({"audio": SPEECH[:3], "text": ["a", "b", "c"]})
    ds = ds.cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(root / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(root / "dict"))
    return root


@pytest.mark.parametrize("max_seconds", [None, 1.3])
def test_dataset_rows_give_the_files_samples(saved, max_seconds):
    clips = planned(str(saved / "one"), max_seconds)
    expected = file_samples(max_seconds)
    assert [c.num_samples for c in clips] == [len(x) for x in expected]  # planned = decoded
    for clip, x in zip(clips, expected, strict=True):
        np.testing.assert_array_equal(clip.load(), x)
    assert clips[0].path.startswith(str(saved / "one") + "[0]")
    assert clips[0].record()["format_in"].startswith("FLAC")


def test_a_split_of_a_saved_dataset_dict(saved):
    assert len(planned(f"{saved / 'dict'}:test")) == 1
    with pytest.raises(audio.AudioError, match=r"splits \['test', 'train'\]"):
        planned(str(saved / "dict"))


def test_waveforms_at_another_rate_and_in_channels_are_resampled_and_averaged():
    x = sf.read(SPEECH[0], dtype="float32")[0]
    slow = soxr.resample(x, 16000, 8000)  # [S] at 8 kHz
    stereo = np.stack([x, 0.5 * x], axis=1)  # [S, 2]
    pcm = np.round(x * 32767).astype(np.int16)
    unsigned = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8)  # offset binary
    items = [("slow", slow, 8000), ("stereo", stereo, 16000), ("pcm", pcm, 16000),
             ("u8", unsigned, 16000)]  # fmt: skip
    clips = planned(items, 2.0)
    assert [c.num_samples for c in clips] == [len(c.load()) for c in clips] == [32000] * 4
    whole = soxr.resample(slow, 8000, 16000, quality=audio.RESAMPLE_QUALITY)  # then cropped
    np.testing.assert_allclose(clips[0].load(), whole[:32000], atol=1e-6)
    np.testing.assert_allclose(clips[1].load(), 0.75 * x[:32000], rtol=1e-6)
    np.testing.assert_allclose(clips[2].load(), x[:32000], atol=1 / 32768)
    np.testing.assert_allclose(clips[3].load(), x[:32000], atol=0.5 / 128 + 1e-7)
    assert clips[0].identity() != planned([("slow", slow[:-1], 8000)])[0].identity()


def test_an_iterator_is_read_once_and_held():
    waves = file_samples()
    clips = planned((f"u{i}", x, 16000) for i, x in enumerate(waves))
    for clip, x in zip(clips, waves, strict=True):
        np.testing.assert_array_equal(clip.load(), x)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (("bad", np.array([0.0, np.nan, 1.0] * 100), 16000), "bad: contains NaN or Inf"),
        (("empty", np.zeros(0), 16000), "empty: the waveform has no samples"),
        (("rate", np.zeros(100), 0), "rate: expected a positive integer sample_rate"),
        (("text", np.array(["a"]), 16000), "text: expected a waveform"),
        (np.zeros(100), "audio item 0: expected a path or a tuple"),
        (("id", np.zeros(100)), "audio item 0: expected a tuple"),
    ],
)
def test_bad_waveforms_are_named(item, message):
    with pytest.raises(audio.AudioError, match=message):
        clips = planned([item])
        clips[0].load()


def test_a_changed_waveform_is_an_error_when_its_batch_comes():
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    (clip,) = planned([("u", x, 16000)])
    x[5] = 0.25  # the caller changed the array in place after planning
    with pytest.raises(audio.AudioError, match="u: the waveform changed"):
        clip.load()


def test_a_dataset_without_audio_column_is_named():
    ds = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(audio.AudioError, match=r"no column of type datasets.Audio.*text"):
        planned(ds)


def test_analyze_on_a_dataset_and_on_waveforms_equals_analyze_on_the_files(saved, tmp_path):
    models = [
        save_demo_model(tmp_path / "w2v", "tiny_wav2vec2", seed=0),
        save_demo_model(tmp_path / "hubert", "tiny_hubert", seed=1),
    ]
    settings = Settings(metrics=("linear_cka", "maxcorr"), max_seconds=1.0)
    files = analyze(models, SPEECH[:3], tmp_path / "f", settings, progress=False, report=False)
    waves = [(p, x, 16000) for p, x in zip(SPEECH, file_samples(), strict=False)]
    arrays = analyze(models, waves, tmp_path / "a", settings, progress=False, report=False)
    pd.testing.assert_frame_equal(files, arrays)
    # The CLI takes the saved dataset as --audio.
    args = ["analyze", *models, "--audio", str(saved / "one"), "--out", str(tmp_path / "d"),
            "--no-report", "--quiet", "--metrics", "linear_cka", "maxcorr",
            "--max-seconds", "1"]  # fmt: skip
    assert cli.main(args) == 0
    rows = pd.read_csv(tmp_path / "d" / "similarities.csv")
    np.testing.assert_allclose(rows.value, files.value, rtol=1e-6)
