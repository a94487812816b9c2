"""Audio input: file lists, loading, normalisation, length-bucketed batches and frame masks.

The data flow, host side, is::

    paths = list_audio("corpus/")                      # directory, list, or text file of paths
    utts = load_utterances(paths, max_seconds=10.0)    # mono, 16 kHz, float32; errors name files
    utts = filter_short(utts, min_samples=cfg.receptive_field)
    for batch in make_batches([u.num_samples for u in utts], batch_seconds=40.0):
        waveforms, lengths = pad([utts[i].samples for i in batch], multiple_of=16000)
        waveforms = normalize(waveforms, lengths)      # if the feature extractor says so
        # waveforms: [B, S], lengths: [B] -> the model; cfg.frame_lengths + frame_mask: [B, T]

File access happens only in ``list_audio``, ``load``/``load_utterance``/``load_utterances``,
``feature_extractor_settings`` and ``demo_audio_paths``; everything else is a pure function of
arrays. ``frame_mask`` also accepts ``jax.Array`` input and then works under ``jax.jit``. The
frame geometry (receptive field, stride, frames per utterance) lives on the model config
(``ModelConfig.frame_lengths``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import soundfile
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
SAMPLE_RATE = 16000
# soxr's "VHQ" preset (28-bit precision, steep filter) rather than the default "HQ" (20-bit):
# float32 carries 24 bits, and resampling is a small cost next to the model's forward pass.
RESAMPLE_QUALITY = "VHQ"
# The epsilon transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds to the variance.
NORM_EPS = 1e-7

PathLike = str | os.PathLike


# A list of paths larger than this is not a list of paths (e.g. a binary file misnamed).
MAX_LIST_BYTES = 256 * 2**20


class AudioError(ValueError):
    """An audio file or file list that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class Utterance:
    """One loaded audio file: model-ready samples plus what the file was.

    Attributes:
        path: the file, as listed.
        samples: [S] float32 mono samples at ``sample_rate``, after resampling and cropping
            (not normalised).
        sample_rate: rate of ``samples`` in Hz (16000 for every supported model).
        sample_rate_in: the file's sample rate in Hz.
        channels_in: the file's channel count (averaged to mono).
        format_in: the file's container and encoding, e.g. ``"FLAC/PCM_16"``.
        duration_in: the whole file's duration in seconds, before cropping.
    """

    path: str
    samples: np.ndarray
    sample_rate: int
    sample_rate_in: int
    channels_in: int
    format_in: str
    duration_in: float

    @property
    def num_samples(self) -> int:
        """S, the number of model-input samples."""
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        """Seconds of audio the model sees (after cropping)."""
        return self.num_samples / self.sample_rate

    @property
    def cropped(self) -> bool:
        """Whether ``max_seconds`` cut the file short."""
        return self.duration < self.duration_in - 1.0 / self.sample_rate

    def load(self) -> np.ndarray:
        """[S] float32 samples (already in memory; `Clip.load` decodes)."""
        return self.samples

    def identity(self) -> list:
        """What the run key records of the content (`file_identity`)."""
        return file_identity(self.path)

    def record(self) -> dict[str, Any]:
        """A JSON-ready description (no samples), for a run's provenance."""
        return {
            "path": self.path,
            "num_samples": self.num_samples,
            "duration": self.duration,
            "sample_rate": self.sample_rate,
            "sample_rate_in": self.sample_rate_in,
            "channels_in": self.channels_in,
            "format_in": self.format_in,
            "duration_in": self.duration_in,
            "cropped": self.cropped,
        }


# --- file lists ---------------------------------------------------------------------------------


def _is_audio_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def _audio_in_directory(directory: str) -> list[str]:
    """Audio files under ``directory``, recursively, sorted by relative path; hidden files and
    folders (names starting with ".", e.g. macOS "._x.wav" resource forks) are skipped."""
    found = []
    # Symlinked folders are followed; a link back to a folder already seen (a loop, or a second
    # way to the same folder) is skipped with a warning, so no file is listed twice.
    seen: set[str] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            warnings.warn(
                f"{root}: skipped, a symbolic link to {real}, which is already listed",
                stacklevel=3,
            )
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if _is_audio_name(name) and not name.startswith("."):
                rel = os.path.relpath(os.path.join(root, name), directory)
                found.append(rel)
    # Sort on path components so "a/b.wav" and "a-b.wav" order the same on every OS.
    found.sort(key=lambda rel: rel.split(os.sep))
    if not found:
        raise AudioError(
            f"{directory}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this directory "
            "or below"
        )
    return [os.path.join(directory, rel) for rel in found]


def _expand(path: str, *, listed_in: str | None = None) -> list[str]:
    """A directory becomes its audio files; a file stays itself; a missing path is an error."""
    if os.path.isdir(path):
        return _audio_in_directory(path)
    where = f" (listed in {listed_in})" if listed_in else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory{where}")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: not a regular file or directory{where}")
    return [path]


def _read_path_list(list_file: str) -> list[str]:
    """Paths from a text file, one per line; blank lines and "#" comments are ignored; relative
    paths are resolved against the text file's folder."""
    if not os.path.isfile(list_file):
        raise AudioError(f"{list_file}: not a regular file or directory")
    size = os.path.getsize(list_file)
    with open(list_file, "rb") as f:
        head = f.read(8192)
    if b"\0" in head or size > MAX_LIST_BYTES:
        raise AudioError(
            f"{list_file}: neither an audio file ({', '.join(AUDIO_EXTENSIONS)}) nor a text "
            "file of paths"
        )
    # utf-8-sig drops a byte-order mark; surrogateescape keeps file names that are not UTF-8
    # (e.g. Latin-1) as the same bytes the file system has, as os.listdir does.
    with open(list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    base = os.path.dirname(list_file)
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = os.path.expanduser(entry)
        paths.extend(_expand(os.path.join(base, entry), listed_in=list_file))
    if not paths:
        raise AudioError(f"{list_file}: the list of audio paths is empty")
    return paths


def list_audio(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """The audio files to analyse, in a deterministic order.

    Args:
        paths: one of
            - a directory: every ``.wav``, ``.flac``, ``.ogg`` and ``.mp3`` file below it (any
              case, recursively, hidden files and folders skipped, symbolic links to folders
              followed once), sorted by relative path;
            - an audio file (one of those extensions): just that file;
            - any other regular file: a UTF-8 text file of paths (a byte-order mark is allowed;
              names that are not UTF-8 are kept byte for byte), one per line; blank lines and lines
              starting with ``#`` are ignored; relative paths are resolved against the text
              file's folder; listed directories are expanded as above;
            - a list of files and/or directories, kept in the given order (directories
              expanded in place). Duplicates are kept.

    Returns:
        File paths as strings. Whether each is readable audio is checked by ``load``.

    Raises:
        FileNotFoundError: a path (given or listed) does not exist; the message names it.
        AudioError: a directory holds no audio files, a list is empty, or a list file is not
            text; the message names it.
    """
    if isinstance(paths, str | os.PathLike):
        path = os.fspath(paths)
        if not os.path.isdir(path) and os.path.exists(path) and not _is_audio_name(path):
            return _read_path_list(path)
        return _expand(path)
    if isinstance(paths, bytes):
        raise TypeError("expected a path or a list of paths, got bytes")
    out = []
    for p in paths:
        out.extend(_expand(os.fspath(p)))
    if not out:
        raise AudioError("the list of audio paths is empty")
    return out


# --- loading ------------------------------------------------------------------------------------


def load_utterance(
    path: PathLike, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> Utterance:
    """Reads one audio file as mono float32 at ``sample_rate``.

    Channels are averaged (mono = mean of channels). A file at another rate is resampled with
    soxr, quality ``"VHQ"``. With ``max_seconds``, only the first
    ``round(max_seconds * sample_rate)`` output samples are kept (the start of the file; a file
    that is shorter is kept whole); only that part of the file, plus a margin of 0.1 s for the
    resampling filter, is read, so the kept samples equal cropping the fully resampled file up to
    the resampler's rounding (checked to 1e-6 in the tests).

    Args:
        path: an audio file soundfile can read (wav, flac, ogg, ...).
        sample_rate: output rate in Hz.
        max_seconds: keep at most this many seconds from the start; None keeps everything.

    Returns:
        ``Utterance`` whose ``samples`` are [S] float32.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioError: the path is a directory, the file is empty, not audio or unreadable, has no
            samples, or holds NaN or Inf samples; the message names the file.
    """
    path = os.fspath(path)
    if int(sample_rate) != sample_rate or sample_rate < 1:
        raise ValueError(f"expected a positive integer sample_rate, got {sample_rate!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"expected max_seconds > 0 or None, got {max_seconds!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, expected an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with soundfile.SoundFile(path) as f:
            rate_in, channels, frames_in = f.samplerate, f.channels, f.frames
            format_in = f"{f.format}/{f.subtype}"
            x = f.read(frames=read_margin(rate_in, max_seconds), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: audio file has no samples (zero length)")
    return Utterance(
        path=path,
        samples=model_samples(x, rate_in, path, sample_rate=sample_rate, max_seconds=max_seconds),
        sample_rate=int(sample_rate),
        sample_rate_in=int(rate_in),
        channels_in=int(channels),
        format_in=format_in,
        duration_in=frames_in / rate_in,
    )


def read_margin(rate_in: int, max_seconds: float | None) -> int:
    """Input samples to read for ``max_seconds`` of output: the crop plus 0.1 s for the
    resampling filter (-1: all)."""
    return -1 if max_seconds is None else math.ceil((max_seconds + 0.1) * rate_in)


def model_samples(
    x: np.ndarray,
    rate_in: int,
    name: str,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """[S] float32 model input from decoded samples ``x`` [S_in, C] at ``rate_in``: channels
    averaged, resampled with soxr (``"VHQ"``), cropped to ``max_seconds``. NaN or Inf samples
    are an `AudioError` naming ``name`` and the first bad sample."""
    bad = ~np.isfinite(x)
    if bad.any():
        frame, channel = np.argwhere(bad)[0]
        raise AudioError(
            f"{name}: contains NaN or Inf samples (first at sample {frame}, channel {channel})"
        )
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if rate_in != sample_rate:
        mono = soxr.resample(mono, rate_in, sample_rate, quality=RESAMPLE_QUALITY)
    if max_seconds is not None:
        mono = mono[: round(max_seconds * sample_rate)]
    return np.ascontiguousarray(mono, dtype=np.float32)


def cropped_length(frames: int, rate_in: int, max_seconds: float | None) -> int:
    """S, the model-input samples `model_samples` gives for ``frames`` input samples."""
    samples = resampled_length(frames, rate_in)
    if max_seconds is not None:
        samples = min(samples, round(max_seconds * SAMPLE_RATE))
    return int(samples)


def file_identity(path: str) -> list:
    """What identifies an audio file's content cheaply: its size and modification time (ns)."""
    try:
        info = os.stat(path)
    except OSError:
        return [None, None]
    return [info.st_size, info.st_mtime_ns]


def resampled_length(frames: int, rate_in: int, rate_out: int = SAMPLE_RATE) -> int:
    """Samples soxr gives for ``frames`` input samples at ``rate_in`` resampled to ``rate_out``:
    ``frames · rate_out / rate_in`` rounded half up (checked against soxr in the tests)."""
    if rate_in == rate_out:
        return int(frames)
    return (2 * int(frames) * int(rate_out) + int(rate_in)) // (2 * int(rate_in))


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    """An audio file planned from its header, decoded only when its batch comes.

    Attributes:
        path: the file, as listed.
        num_samples: S, the model-input samples it will give (after resampling and cropping).
        sample_rate_in, channels_in, format_in, duration_in: as in `Utterance`.
        max_seconds: the crop applied when it is decoded.
    """

    path: str
    num_samples: int
    sample_rate_in: int
    channels_in: int
    format_in: str
    duration_in: float
    max_seconds: float | None = None

    @property
    def duration(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def record(self) -> dict[str, Any]:
        """A JSON-ready description, as `Utterance.record`."""
        return clip_record(self)

    def identity(self) -> list:
        """What the run key records of the content (`file_identity`)."""
        return file_identity(self.path)

    def load(self) -> np.ndarray:
        """[S] float32 samples, decoded now; an error names the file when it cannot be read or
        no longer gives the planned length (changed since it was listed)."""
        samples = load(self.path, max_seconds=self.max_seconds)
        if samples.shape[0] != self.num_samples:
            raise AudioError(
                f"{self.path}: gives {samples.shape[0]} samples, but its header said "
                f"{self.num_samples} when the run was planned (was the file changed?)"
            )
        return samples


def clip_record(clip: Any) -> dict[str, Any]:
    """`Utterance.record` of a planned clip (anything with a `Clip`'s attributes)."""
    return {
        "path": clip.path,
        "num_samples": clip.num_samples,
        "duration": clip.num_samples / SAMPLE_RATE,
        "sample_rate": SAMPLE_RATE,
        "sample_rate_in": clip.sample_rate_in,
        "channels_in": clip.channels_in,
        "format_in": clip.format_in,
        "duration_in": clip.duration_in,
        "cropped": clip.num_samples / SAMPLE_RATE < clip.duration_in - 1.0 / SAMPLE_RATE,
    }


def probe(path: PathLike, *, max_seconds: float | None = None) -> Clip:
    """A `Clip` from the file's header alone (``soundfile.info``): nothing is decoded.

    Raises:
        FileNotFoundError, AudioError: as `load_utterance`, naming the file.
    """
    path = os.fspath(path)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"expected max_seconds > 0 or None, got {max_seconds!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: not a regular file, expected an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = soundfile.info(path)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if info.frames <= 0:
        raise AudioError(f"{path}: audio file has no samples (zero length)")
    return Clip(
        path=path,
        num_samples=cropped_length(info.frames, info.samplerate, max_seconds),
        sample_rate_in=int(info.samplerate),
        channels_in=int(info.channels),
        format_in=f"{info.format}/{info.subtype}",
        duration_in=info.frames / info.samplerate,
        max_seconds=max_seconds,
    )


def load(
    path: PathLike, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """[S] float32 mono samples of one file; see ``load_utterance`` for the details."""
    return load_utterance(path, sample_rate=sample_rate, max_seconds=max_seconds).samples


def load_utterances(
    paths: PathLike | Sequence[PathLike],
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    min_samples: int = 0,
) -> list[Utterance]:
    """``list_audio`` + ``load_utterance`` for each file + ``filter_short``.

    Args:
        paths: anything ``list_audio`` accepts.
        sample_rate, max_seconds: as in ``load_utterance``.
        min_samples: skip, with a warning, clips shorter than this (the models' receptive field).

    Returns:
        The usable utterances, in ``list_audio`` order.
    """
    utts = [
        load_utterance(p, sample_rate=sample_rate, max_seconds=max_seconds)
        for p in list_audio(paths)
    ]
    return filter_short(utts, min_samples=min_samples)


def filter_short(utterances: Sequence[Utterance], *, min_samples: int) -> list[Utterance]:
    """Drops clips too short for one model frame, warning for each.

    Args:
        utterances: loaded utterances.
        min_samples: the fewest samples that give a frame: ``ModelConfig.receptive_field`` (the
            largest over the models compared).

    Returns:
        The utterances with at least ``min_samples`` samples, in order.

    Raises:
        AudioError: no utterance is long enough (or none was given).
    """
    kept = []
    for u in utterances:
        if u.num_samples >= min_samples:
            kept.append(u)
        else:
            warnings.warn(
                f"{u.path}: skipped, {u.num_samples} samples ({u.duration:.4f} s) is shorter "
                f"than the model's receptive field of {min_samples} samples",
                stacklevel=2,
            )
    if not kept:
        names = ", ".join(u.path for u in utterances[:3])
        more = f" and {len(utterances) - 3} more" if len(utterances) > 3 else ""
        raise AudioError(
            f"no usable audio: all {len(utterances)} clip(s) are shorter than the model's "
            f"receptive field of {min_samples} samples ({names}{more})"
        )
    return kept


def demo_audio_paths() -> list[str]:
    """The speech shipped with the package (``sslsim_jax/data/speech``, see its SOURCE.md):
    five short English utterances, 16 kHz mono FLAC."""
    folder = resources.files("sslsim_jax").joinpath("data", "speech")
    return sorted(os.fspath(f) for f in folder.iterdir() if f.name.endswith(".flac"))


# --- feature extractor --------------------------------------------------------------------------


def feature_extractor_settings(model_dir: PathLike) -> dict[str, Any]:
    """The preprocessing a model expects, from its ``preprocessor_config.json``.

    Args:
        model_dir: a model directory (a transformers checkpoint folder).

    Returns:
        ``{"do_normalize": bool, "sampling_rate": int, "path": str | None}``; ``path`` is the
        file read, or None when the directory has none (then transformers' defaults apply:
        ``do_normalize=True``, 16000 Hz).

    Raises:
        FileNotFoundError: ``model_dir`` does not exist.
        AudioError: the file is not valid JSON, describes another kind of feature extractor, or
            asks for a sampling rate other than 16000 Hz or for multi-dimensional features; the
            message names the file.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.exists(path):
        return {"do_normalize": True, "sampling_rate": SAMPLE_RATE, "path": None}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AudioError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AudioError(f"{path}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
    if kind != "Wav2Vec2FeatureExtractor":
        raise AudioError(
            f"{path}: feature_extractor_type = {kind!r}, expected 'Wav2Vec2FeatureExtractor'"
        )
    rate = config.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise AudioError(
            f"{path}: sampling_rate = {rate!r}, but sslsim-jax supports only {SAMPLE_RATE} Hz "
            "models"
        )
    if config.get("feature_size", 1) != 1:
        raise AudioError(f"{path}: feature_size = {config['feature_size']!r}, expected 1")
    do_normalize = config.get("do_normalize", True)
    if not isinstance(do_normalize, bool):
        raise AudioError(f"{path}: do_normalize = {do_normalize!r}, expected true or false")
    return {"do_normalize": do_normalize, "sampling_rate": SAMPLE_RATE, "path": path}


# --- arrays -------------------------------------------------------------------------------------


def _check_lengths(lengths: Any, batch: int, samples: int, name: str = "lengths") -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"expected {name} of shape [B] = ({batch},), got {lengths.shape}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"expected integer {name}, got dtype {lengths.dtype}")
    if np.any(lengths < 0) or np.any(lengths > samples):
        i = int(np.argmax((lengths < 0) | (lengths > samples)))
        raise ValueError(f"{name}[{i}] = {lengths[i]} is outside [0, S = {samples}]")
    return lengths.astype(np.int64)


def normalize(waveforms: np.ndarray, lengths: Any) -> np.ndarray:
    """Zero mean, unit variance per utterance over its valid samples; padding set to 0.0.

    Exactly transformers' ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` with an attention
    mask: ``(x - mean) / sqrt(var + 1e-7)`` with mean and (population) variance over the first
    ``length`` samples, computed in float32 by the same numpy calls, so the result is equal
    bit for bit. An utterance thus gets the same input alone as in any padded batch. (transformers'
    batched call *without* an attention mask, the default for base checkpoints, includes the
    padding zeros in the statistics instead; we never do.) Rows with length 0 become all zeros.

    Args:
        waveforms: [B, S] float samples, padded.
        lengths: [B] int valid samples per row, 0 <= length <= S.

    Returns:
        [B, S] float32 normalised waveforms (a new array).
    """
    waveforms = np.asarray(waveforms)
    if waveforms.ndim != 2:
        raise ValueError(f"expected waveforms of shape [B, S], got {waveforms.shape}")
    lengths = _check_lengths(lengths, *waveforms.shape)
    out = np.zeros(waveforms.shape, np.float32)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        x = waveforms[i].astype(np.float32)  # [S]
        # The same expression as transformers, on the same float32 dtypes.
        normed = (x - x[:n].mean()) / np.sqrt(x[:n].var() + NORM_EPS)
        out[i, :n] = normed[:n]
    return out


def make_batches(
    lengths: Sequence[int] | np.ndarray,
    *,
    batch_seconds: float,
    sample_rate: int = SAMPLE_RATE,
    max_batch_size: int | None = None,
    multiple_of: int | None = None,
    steps: int | None = None,
) -> list[list[int]]:
    """Length-bucketed batches that bound the padded size B * S.

    Utterances are sorted by length, longest first (ties by index); each batch takes the next
    utterances while ``B * S <= batch_seconds * sample_rate``, where S is the batch's longest
    length (rounded up to ``multiple_of`` when given, as ``pad`` will). A batch always holds at
    least one utterance, so an utterance longer than the budget gets a batch of its own.

    Args:
        lengths: [N] samples per utterance.
        batch_seconds: the padded-audio budget per batch, in seconds.
        sample_rate: samples per second of ``lengths``.
        max_batch_size: at most this many utterances per batch; None for no limit.
        multiple_of: the padding multiple that ``pad`` will use; None for none.
        steps: the padding grid's steps per doubling that ``pad`` will use (`padded_length`).

    Returns:
        Batches of indices into ``lengths``, longest first within and across batches; every
        index appears exactly once. Deterministic: the same lengths give the same batches.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"expected lengths of shape [N], got {lengths.shape}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"expected integer lengths, got dtype {lengths.dtype}")
    if np.any(lengths < 0):
        raise ValueError(f"expected lengths >= 0, got {int(lengths.min())}")
    if not batch_seconds > 0:
        raise ValueError(f"expected batch_seconds > 0, got {batch_seconds!r}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"expected max_batch_size >= 1 or None, got {max_batch_size!r}")
    budget = batch_seconds * sample_rate
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            padded = padded_length(int(lengths[batch[0]]), multiple_of, steps)
            full = max_batch_size is not None and len(batch) >= max_batch_size
            if not full and (len(batch) + 1) * padded <= budget:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def padded_length(n: int, multiple_of: int | None, steps: int | None = None) -> int:
    """``n`` rounded up to the padding grid.

    Without ``steps``: the next multiple of ``multiple_of``. With ``steps``: multiples of
    ``multiple_of`` up to ``steps * multiple_of``, then of twice that up to twice as far, and so
    on, so the grid has ``steps / 2`` lengths per octave (about 40 between 1 s and 35 s with
    0.25 s and 16 steps, instead of 136) and pads by less than ``max(multiple_of, 2 n / steps)``.
    Each distinct padded shape costs one compilation: seconds on a CPU, 10–60 s on a GPU.
    """
    if multiple_of is None:
        return n
    if steps is not None and n > steps * multiple_of:
        multiple_of <<= math.ceil(math.log2(n / (steps * multiple_of)))
    return -(-n // multiple_of) * multiple_of


def pad(
    waveforms: Sequence[np.ndarray], *, multiple_of: int | None = None, steps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stacks 1-D waveforms into a zero-padded batch.

    With ``multiple_of``, S is the longest length rounded up to a multiple of it, so that batches
    of similar lengths share a padded shape and a jit-compiled model compiles once per shape
    (e.g. ``multiple_of=16000``: at most one compilation per second of audio length and batch
    size). ``lengths`` keep the true sizes; padded samples are zeros.

    Args:
        waveforms: B arrays of shape [S_b].
        multiple_of: round S up to a multiple of this; None pads to the longest.
        steps: with ``multiple_of``, round S up on the coarser grid of `padded_length`.

    Returns:
        ([B, S] float32 waveforms, [B] int32 lengths).
    """
    if len(waveforms) == 0:
        raise ValueError("expected at least one waveform, got an empty list")
    if multiple_of is not None and (int(multiple_of) != multiple_of or multiple_of < 1):
        raise ValueError(f"expected a positive integer multiple_of or None, got {multiple_of!r}")
    arrays = [np.asarray(w) for w in waveforms]
    for i, w in enumerate(arrays):
        if w.ndim != 1:
            raise ValueError(f"expected waveforms[{i}] of shape [S], got {w.shape}")
    lengths = np.array([w.shape[0] for w in arrays], np.int32)
    samples = max(padded_length(int(lengths.max()), multiple_of, steps), 1)
    out = np.zeros((len(arrays), samples), np.float32)  # [B, S]
    for i, w in enumerate(arrays):
        out[i, : w.shape[0]] = w
    return out, lengths


def frame_mask(frame_lengths: Any, num_frames: int) -> Any:
    """[B, T] bool mask, True on each utterance's first ``frame_lengths[b]`` frames.

    Args:
        frame_lengths: [B] int frames per utterance (``ModelConfig.frame_lengths``); a ``jax.Array``
            (also under ``jax.jit``) or array-like.
        num_frames: T, the padded frame count (static).

    Returns:
        [B, T] bool, a ``jax.Array`` for ``jax.Array`` input, else ``np.ndarray``.
    """
    xp = jnp if isinstance(frame_lengths, jax.Array) else np
    frame_lengths = xp.asarray(frame_lengths)
    if frame_lengths.ndim != 1:
        raise ValueError(f"expected frame_lengths of shape [B], got {tuple(frame_lengths.shape)}")
    return xp.arange(int(num_frames))[None, :] < frame_lengths[:, None]
