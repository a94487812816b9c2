"""Tests for sslsim_jax.audio: file lists, loading, errors, normalisation, batching, frames."""

from __future__ import annotations

import json
import os
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax import audio
from sslsim_jax.audio import AudioError
from sslsim_jax.models import ModelConfig

# Conv geometries: wav2vec 2.0 / HuBERT (every released checkpoint), a small one, an odd one.
BASE_CONV = ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
SMALL_CONV = ((10, 3), (5, 4))
ODD_CONV = ((7, 5, 3), (3, 2, 1))


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 48000])
def test_stereo_high_rate_loads_as_mono_16k(tmp_path, rate):
    left, right = sine(440, 1.0, rate, 0.5), sine(440, 1.0, rate, 0.3)
    path = tmp_path / f"stereo_{rate}.wav"
    soundfile.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")

    u = audio.load_utterance(path)

    assert u.samples.dtype == np.float32 and u.samples.shape == (16000,)
    assert (u.sample_rate, u.sample_rate_in, u.channels_in) == (16000, rate, 2)
    assert u.format_in == "WAV/FLOAT"
    assert u.duration == pytest.approx(1.0) and u.duration_in == pytest.approx(1.0)
    assert peak_frequency(u.samples, 16000) == pytest.approx(440, abs=1)
    # Mono is the mean of the channels: a 0.4-amplitude sine, in phase (the resampler is
    # linear-phase with its delay compensated). Edges hold the filter's transients.
    np.testing.assert_allclose(u.samples[800:-800], sine(440, 1.0, 16000, 0.4)[800:-800], atol=1e-3)


def test_downmix_is_mean_of_channels(tmp_path):
    x = sine(300, 0.5, 16000)
    path = tmp_path / "opposite.wav"
    soundfile.write(path, np.stack([x, -x, 2 * x], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(audio.load(path), 2 * x / 3, atol=1e-7)


def test_16k_mono_is_read_unchanged(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, 12345).astype(np.float32)
    path = tmp_path / "same.wav"
    soundfile.write(path, x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load(path), x)


@pytest.mark.parametrize(
    ("suffix", "subtype", "atol"),
    [(".wav", "PCM_16", 1e-4), (".flac", "PCM_24", 1e-6), (".ogg", "VORBIS", 0.05)],
)
def test_wav_flac_ogg_load(tmp_path, suffix, subtype, atol):
    x = sine(1000, 0.8, 22050, 0.5)
    path = tmp_path / f"tone{suffix}"
    soundfile.write(path, x, 22050, subtype=subtype)

    y = audio.load(path)

    assert y.dtype == np.float32 and y.shape == (round(0.8 * 16000),)
    assert peak_frequency(y, 16000) == pytest.approx(1000, abs=2)
    interior = slice(400, -400)
    np.testing.assert_allclose(y[interior], sine(1000, 0.8, 16000, 0.5)[interior], atol=atol)


def test_max_seconds_crops_the_start(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, (3 * 44100, 2)).astype(np.float32)
    path = tmp_path / "long.flac"
    soundfile.write(path, x, 44100, subtype="PCM_24")

    full = audio.load_utterance(path)
    cropped = audio.load_utterance(path, max_seconds=1.25)
    whole = audio.load_utterance(path, max_seconds=10.0)

    assert cropped.num_samples == 20000 and cropped.cropped and not full.cropped
    assert cropped.duration_in == pytest.approx(3.0)
    # Only the start (plus a 0.1 s margin) is read and resampled; the kept samples equal the
    # fully resampled file's first 1.25 s.
    np.testing.assert_allclose(cropped.samples, full.samples[:20000], atol=1e-6)
    np.testing.assert_array_equal(whole.samples, full.samples)
    assert not whole.cropped


def test_record_is_json_ready(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, sine(200, 0.5, 8000), 8000)
    record = audio.load_utterance(path).record()
    assert json.loads(json.dumps(record)) == record
    assert record["num_samples"] == 8000 and record["sample_rate_in"] == 8000
    assert "samples" not in record


# --- errors name the file -----------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.load(missing)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.list_audio(missing)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.list_audio([missing])


def test_text_renamed_wav_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav: not a readable audio file"):
        audio.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.flac: empty file"):
        audio.load(path)


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    soundfile.write(path, np.zeros((0,), np.float32), 16000)
    assert os.path.getsize(path) > 0  # a valid header, no samples
    with pytest.raises(AudioError, match=r"zero\.wav: audio file has no samples"):
        audio.load(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_samples(tmp_path, bad):
    x = np.zeros((1000, 2), np.float32)
    x[123, 1] = bad
    path = tmp_path / "bad.wav"
    soundfile.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad\.wav: contains NaN or Inf .* sample 123, channel 1"):
        audio.load(path)


def test_directory_given_to_load(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        audio.load(tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_seconds"):
        audio.load(audio.demo_audio_paths()[0], max_seconds=0)


# --- file lists ---------------------------------------------------------------------------------


def write_tree(root) -> None:
    for rel in [
        "b.wav",
        "a/z.FLAC",
        "a/b/c.ogg",
        "a-b.wav",
        "notes.txt",
        ".hidden.wav",
        ".git/x.wav",
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_directory_is_recursive_and_sorted(tmp_path):
    write_tree(tmp_path)
    got = audio.list_audio(tmp_path)
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel == ["a/b/c.ogg", "a/z.FLAC", "a-b.wav", "b.wav"]
    assert audio.list_audio(str(tmp_path)) == got


def test_empty_directory_is_named(tmp_path):
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(AudioError, match=f"{tmp_path}: no audio files"):
        audio.list_audio(tmp_path)


def test_list_of_files_keeps_order(tmp_path):
    write_tree(tmp_path)
    files = [tmp_path / "b.wav", tmp_path / "a", tmp_path / "a-b.wav"]
    rel = [os.path.relpath(p, tmp_path) for p in audio.list_audio(files)]
    assert rel == ["b.wav", "a/b/c.ogg", "a/z.FLAC", "a-b.wav"]
    assert audio.list_audio(tmp_path / "b.wav") == [str(tmp_path / "b.wav")]


def test_text_file_of_paths(tmp_path):
    write_tree(tmp_path)
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    (elsewhere / "paths.txt").write_text(
        f"# a comment\n\n../b.wav\n  ../a/z.FLAC  \n{tmp_path / 'a-b.wav'}\n   # indented comment\n"
    )
    got = audio.list_audio(elsewhere / "paths.txt")
    assert [os.path.realpath(p) for p in got] == [
        os.path.realpath(tmp_path / rel) for rel in ["b.wav", "a/z.FLAC", "a-b.wav"]
    ]


def test_symlinked_folders_are_followed_once(tmp_path):
    write_tree(tmp_path / "corpus")
    (tmp_path / "more" / "deep").mkdir(parents=True)
    (tmp_path / "more" / "deep" / "m.wav").write_bytes(b"x")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "more", target_is_directory=True)
    (tmp_path / "more" / "loop").symlink_to(tmp_path / "more", target_is_directory=True)
    with pytest.warns(UserWarning, match="a symbolic link to .*more, which is already listed"):
        got = audio.list_audio(tmp_path / "corpus")
    rel = [os.path.relpath(p, tmp_path / "corpus") for p in got]
    assert rel == ["a/b/c.ogg", "a/z.FLAC", "a-b.wav", "b.wav", "linked/deep/m.wav"]


def test_mp3_is_audio_everywhere(tmp_path):
    """Directory, named file and list file treat MP3 alike (soundfile reads it)."""
    samples = np.sin(np.linspace(0, 300, 16000)).astype(np.float32) * 0.3
    path = tmp_path / "d" / "x.mp3"
    path.parent.mkdir()
    soundfile.write(path, samples, 16000, format="MP3")
    (tmp_path / "list.txt").write_text("d/x.mp3\n")
    for source in (tmp_path / "d", path, tmp_path / "list.txt"):
        (got,) = audio.list_audio(source)
        assert os.path.samefile(got, path), source
    assert audio.load_utterance(path).num_samples > 15000


def test_non_regular_files_are_refused_without_reading(tmp_path):
    with pytest.raises(AudioError, match="/dev/zero: not a regular file"):
        audio.list_audio("/dev/zero")
    (tmp_path / "list.txt").write_text("/dev/null\n")
    with pytest.raises(AudioError, match="/dev/null: not a regular file"):
        audio.list_audio(tmp_path / "list.txt")
    (tmp_path / "binary.dat").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(AudioError, match="binary.dat: neither an audio file"):
        audio.list_audio(tmp_path / "binary.dat")


def test_list_file_with_byte_order_mark_and_latin1_names(tmp_path):
    # b"caf\xe9.wav" is Latin-1, not valid UTF-8.
    with open(os.fsencode(tmp_path) + b"/caf\xe9.wav", "wb") as f:
        f.write(b"x")
    with open(tmp_path / "list.txt", "wb") as f:
        f.write(b"\xef\xbb\xbfcaf\xe9.wav\n")
    (got,) = audio.list_audio(tmp_path / "list.txt")
    assert os.fsencode(got) == os.fsencode(tmp_path) + b"/caf\xe9.wav"
    assert audio.list_audio(tmp_path) == [got]


def test_text_file_with_missing_entry(tmp_path):
    (tmp_path / "paths.lst").write_text("gone.wav\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.wav.*listed in .*paths\.lst"):
        audio.list_audio(tmp_path / "paths.lst")


def test_empty_text_file(tmp_path):
    (tmp_path / "paths.txt").write_text("# nothing\n")
    with pytest.raises(AudioError, match=r"paths\.txt: the list of audio paths is empty"):
        audio.list_audio(tmp_path / "paths.txt")


def test_binary_non_audio_file(tmp_path):
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    with pytest.raises(AudioError, match=r"data\.bin: neither an audio file"):
        audio.list_audio(tmp_path / "data.bin")


# --- short clips --------------------------------------------------------------------------------


def utterance(path: str, samples: int) -> audio.Utterance:
    return audio.Utterance(path, np.zeros(samples, np.float32), 16000, 16000, 1, "WAV/FLOAT", 0.0)


def test_short_clips_are_skipped_with_a_warning():
    utts = [utterance("long.wav", 400), utterance("short.wav", 399), utterance("x.wav", 16000)]
    with pytest.warns(UserWarning, match=r"short\.wav: skipped, 399 samples"):
        kept = audio.filter_short(utts, min_samples=400)
    assert [u.path for u in kept] == ["long.wav", "x.wav"]


def test_all_short_is_an_error():
    with pytest.raises(AudioError, match="all 2 clip"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audio.filter_short([utterance("a", 10), utterance("b", 20)], min_samples=400)


def test_load_utterances_filters_short(tmp_path):
    soundfile.write(tmp_path / "long.wav", sine(100, 0.1, 16000), 16000)
    soundfile.write(tmp_path / "tiny.wav", sine(100, 0.01, 16000), 16000)
    with pytest.warns(UserWarning, match=r"tiny\.wav: skipped"):
        utts = audio.load_utterances(tmp_path, min_samples=400)
    assert [os.path.basename(u.path) for u in utts] == ["long.wav"]


# --- normalisation ------------------------------------------------------------------------------


def random_batch(seed: int, lengths=(16000, 7001, 12345, 1)):
    rng = np.random.default_rng(seed)
    # Offset and scale differ per utterance, as in real recordings.
    return [
        (rng.normal(rng.uniform(-0.3, 0.3), rng.uniform(0.01, 0.5), n)).astype(np.float32)
        for n in lengths
    ]


@pytest.mark.parametrize("multiple_of", [None, 320])
def test_normalize_equals_transformers_feature_extractor(multiple_of):
    transformers = pytest.importorskip("transformers")
    waves = random_batch(0)
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)
    expected = extractor(
        waves,
        sampling_rate=16000,
        padding=True,
        pad_to_multiple_of=multiple_of,
        return_tensors="np",
    )["input_values"]

    padded, lengths = audio.pad(waves, multiple_of=multiple_of)
    got = audio.normalize(padded, lengths)

    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_normalize_one_utterance_equals_transformers_unbatched():
    transformers = pytest.importorskip("transformers")
    (x,) = random_batch(1, lengths=(9999,))
    expected = transformers.Wav2Vec2FeatureExtractor()(x, sampling_rate=16000)["input_values"][0]
    np.testing.assert_array_equal(audio.normalize(x[None], [len(x)])[0], expected)


def test_normalize_is_independent_of_padding():
    waves = random_batch(2)
    padded, lengths = audio.pad(waves, multiple_of=1000)
    batched = audio.normalize(padded, lengths)
    for i, w in enumerate(waves):
        alone = audio.normalize(w[None], [len(w)])[0]
        np.testing.assert_array_equal(batched[i, : len(w)], alone)
        assert np.all(batched[i, len(w) :] == 0)


def test_normalize_zero_length_row_and_checks():
    out = audio.normalize(np.ones((2, 5), np.float32), [5, 0])
    np.testing.assert_array_equal(out[1], 0)
    with pytest.raises(ValueError, match=r"expected waveforms of shape \[B, S\], got \(3,\)"):
        audio.normalize(np.zeros(3), [3])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6 is outside"):
        audio.normalize(np.zeros((1, 5)), [6])


def test_feature_extractor_settings(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert audio.feature_extractor_settings(tmp_path) == {
        "do_normalize": True,
        "sampling_rate": 16000,
        "path": None,
    }
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    settings = audio.feature_extractor_settings(tmp_path)
    assert settings["do_normalize"] is False and settings["sampling_rate"] == 16000
    assert settings["path"] == os.path.join(tmp_path, "preprocessor_config.json")


def test_feature_extractor_settings_errors(tmp_path):
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"sampling_rate": 8000}))
    with pytest.raises(AudioError, match=r"preprocessor_config\.json: sampling_rate = 8000"):
        audio.feature_extractor_settings(tmp_path)
    config.write_text("{not json")
    with pytest.raises(AudioError, match=r"preprocessor_config\.json: not valid JSON"):
        audio.feature_extractor_settings(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing-model"):
        audio.feature_extractor_settings(tmp_path / "missing-model")


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_batch_size", [None, 3])
def test_batches_cover_everything_once_within_budget(seed, max_batch_size):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(400, 16000 * 12, size=int(rng.integers(1, 40)))
    budget_seconds = float(rng.uniform(2, 30))
    batches = audio.make_batches(
        lengths, batch_seconds=budget_seconds, max_batch_size=max_batch_size
    )

    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert len(b) == 1 or padded <= budget_seconds * 16000
        assert max_batch_size is None or len(b) <= max_batch_size
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
    assert (
        audio.make_batches(lengths, batch_seconds=budget_seconds, max_batch_size=max_batch_size)
        == batches
    )


def test_batches_example():
    # Budget 10 samples: 5+5 fit together, 4+3+2 pad to 3 * 4 = 12 > 10 so 2 goes on alone.
    batches = audio.make_batches([3, 5, 4, 5, 2, 20], batch_seconds=10, sample_rate=1)
    assert batches == [[5], [1, 3], [2, 0], [4]]
    # Rounding up to a multiple of 4 counts in the budget: [3] pads to 4, [5] to 8.
    assert audio.make_batches([5, 3, 3], batch_seconds=10, sample_rate=1, multiple_of=4) == [
        [0],
        [1, 2],
    ]
    assert audio.make_batches([], batch_seconds=1) == []


def test_pad():
    waves = [np.ones(3), np.full(5, 2.0), np.full(1, 3.0)]
    padded, lengths = audio.pad(waves)
    assert padded.dtype == np.float32 and lengths.dtype == np.int32
    np.testing.assert_array_equal(lengths, [3, 5, 1])
    np.testing.assert_array_equal(padded, [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [3, 0, 0, 0, 0]])
    assert audio.pad(waves, multiple_of=4)[0].shape == (3, 8)
    assert audio.pad(waves, multiple_of=5)[0].shape == (3, 5)
    with pytest.raises(ValueError, match=r"expected waveforms\[1\] of shape \[S\], got \(2, 2\)"):
        audio.pad([np.ones(3), np.ones((2, 2))])
    with pytest.raises(ValueError, match="empty list"):
        audio.pad([])


# --- frames -------------------------------------------------------------------------------------


def expected_frames(length: int, kernel, stride) -> int:
    """transformers' _get_feat_extract_output_lengths, written out; 0 below one frame."""
    n = length
    for k, s in zip(kernel, stride, strict=True):
        n = (n - k) // s + 1
        if n < 1:
            return 0
    return n


def model_config(kernel, stride) -> ModelConfig:
    return ModelConfig.from_hf_config(
        {
            "model_type": "wav2vec2",
            "conv_dim": [8] * len(kernel),
            "conv_kernel": list(kernel),
            "conv_stride": list(stride),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "num_conv_pos_embedding_groups": 2,
        }
    )


@pytest.mark.parametrize("conv", [BASE_CONV, SMALL_CONV, ODD_CONV])
def test_frame_lengths_match_transformers_formula(conv):
    kernel, stride = conv
    config = model_config(kernel, stride)
    field = config.receptive_field
    lengths = np.array([0, 1, field - 1, field, field + 1, 16000, 16001, 160000 + 37])
    got = config.frame_lengths(lengths)

    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [expected_frames(n, kernel, stride) for n in lengths])
    np.testing.assert_array_equal(got, [config.num_frames(n) for n in lengths])
    assert got[2] == 0 and got[3] == 1


def test_receptive_field_of_wav2vec2():
    # 400 samples (25 ms) and a 320-sample stride: the wav2vec 2.0 paper, section 2.
    config = model_config(*BASE_CONV)
    assert config.receptive_field == 400 and config.frame_stride == 320
    np.testing.assert_array_equal(config.frame_lengths([16000, 400, 399]), [49, 1, 0])


@pytest.mark.parametrize("conv", [BASE_CONV, ODD_CONV])
def test_frame_lengths_equal_transformers_model_method(conv):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kernel, stride = conv
    # The method only reads these config fields, so a stand-in avoids building a model.
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(conv_kernel=kernel, conv_stride=stride, add_adapter=False)
    )
    config = model_config(kernel, stride)
    lengths = np.array([config.receptive_field, 4567, 16000, 48000 + 319])
    expected = transformers.Wav2Vec2PreTrainedModel._get_feat_extract_output_lengths(
        fake, torch.tensor(lengths)
    )
    np.testing.assert_array_equal(config.frame_lengths(lengths), expected.numpy())


def test_frame_lengths_and_mask_under_jit():
    config = model_config(*SMALL_CONV)
    lengths = np.array([1000, 50, 2345], np.int32)

    @jax.jit
    def frames_and_mask(lengths):
        n = config.frame_lengths(lengths)
        return n, audio.frame_mask(n, 120)

    n, mask = frames_and_mask(jnp.asarray(lengths))
    np.testing.assert_array_equal(n, config.frame_lengths(lengths))
    np.testing.assert_array_equal(mask, audio.frame_mask(np.asarray(n), 120))
    assert mask.shape == (3, 120) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask.sum(axis=1), n)
    np.testing.assert_array_equal(mask[:, 0], np.asarray(n) > 0)
    with pytest.raises(ValueError, match=r"expected frame_lengths of shape \[B\]"):
        audio.frame_mask(np.zeros((2, 2), np.int32), 3)


# --- shipped speech -----------------------------------------------------------------------------


def test_shipped_speech():
    paths = audio.demo_audio_paths()
    assert 3 <= len(paths) <= 6
    total_bytes = sum(os.path.getsize(p) for p in paths)
    assert total_bytes < 1_000_000
    infos = [soundfile.info(p) for p in paths]
    assert all(i.samplerate == 16000 and i.channels == 1 and i.format == "FLAC" for i in infos)
    assert 6 <= sum(i.duration for i in infos) <= 12
    utts = audio.load_utterances(paths, min_samples=400)
    assert [u.path for u in utts] == paths
    for u in utts:
        assert u.channels_in == 1 and u.sample_rate_in == 16000
        assert 0.1 < np.abs(u.samples).max() <= 1.0  # speech, not silence or clipping
    source = os.path.join(os.path.dirname(paths[0]), "SOURCE.md")
    assert "espeak-ng" in open(source).read()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2_000_000))
def test_padding_grid_bounds_padding_and_is_a_fixed_point(n):
    p = audio.padded_length(n, 4000, 16)
    assert n <= p < n + max(4000, 2 * n / 16)
    assert p % 4000 == 0 and audio.padded_length(p, 4000, 16) == p
    assert audio.padded_length(n, 4000) <= p  # never finer than the plain multiple


def test_padding_grid_has_few_lengths_and_batches_use_it():
    lengths = np.arange(16000, 35 * 16000 + 1, 160)  # 1 s to 35 s
    assert len({audio.padded_length(int(n), 4000) for n in lengths}) == 137
    assert len({audio.padded_length(int(n), 4000, 16) for n in lengths}) == 38
    # Above 4 s the grid steps by 0.5 s: 4.1 s and 4.3 s both pad to 4.5 s.
    waves = [np.ones(65600, np.float32), np.ones(68800, np.float32)]
    assert audio.pad(waves, multiple_of=4000, steps=16)[0].shape == (2, 72000)
    assert audio.pad(waves[:1], multiple_of=4000)[0].shape == (1, 68000)
    for seconds, expected in ((8.9, [[1], [0]]), (9.0, [[1, 0]])):  # 2 × 4.5 s
        batches = audio.make_batches(
            [65600, 68800], batch_seconds=seconds, multiple_of=4000, steps=16
        )
        assert batches == expected


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 32000, 44100, 48000, 16000])
@pytest.mark.parametrize("frames", [1, 7, 1000, 12345, 44101, 99999])
def test_resampled_length_is_what_soxr_gives(rate, frames):
    got = soxr.resample(np.zeros(frames, np.float32), rate, 16000, quality="VHQ")
    assert audio.resampled_length(frames, rate) == len(got)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
@pytest.mark.parametrize("max_seconds", [None, 1.3, 9.0])
def test_probe_plans_the_decoded_length_from_the_header(tmp_path, fmt, max_seconds):
    path = tmp_path / f"x.{fmt.lower()}"
    x = (np.sin(np.arange(22050 * 3) / 10) * 0.3).astype(np.float32)
    soundfile.write(path, np.stack([x, -x], 1), 22050, format=fmt)
    clip = audio.probe(path, max_seconds=max_seconds)
    utterance = audio.load_utterance(path, max_seconds=max_seconds)
    assert clip.num_samples == utterance.num_samples == len(clip.load())
    assert clip.record() == utterance.record()
