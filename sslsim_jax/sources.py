"""Where the audio of an analysis comes from: files, waveforms from Python, or a dataset.

`catalogue(source)` turns any accepted source into a count and a function that plans item i
(a clip that knows its model-input length and decodes only when its batch comes), so the
analysis plans batches without holding the audio:

- a path or list of paths (`sslsim_jax.audio.list_audio`): files read from their headers;
- a directory written by ``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``: rows of
  its audio column (an ``Audio`` feature), read as the encoded file bytes and decoded with
  soundfile (no torchcodec needed); the optional ``datasets`` extra;
- a sequence of ``(id, waveform, sample_rate)``: waveforms [S] or [S, channels] (numpy or
  JAX), read once to plan (their length and a digest of their samples) and again when their
  batch comes; any other iterable of such tuples is read once and held in memory.

Every clip has ``path`` (a name for messages and ``run.json``), ``num_samples``, ``load()``,
``record()`` and ``identity()`` (what the run key keeps of its content).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import soundfile

from sslsim_jax import audio

Planner = Callable[[int, "float | None"], Any]


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a Dataset or DatasetDict)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name))
        for name in ("dataset_info.json", "dataset_dict.json")
    )


def _is_dataset(source: Any) -> bool:
    return type(source).__module__.startswith("datasets.") and hasattr(source, "features")


def load_saved_dataset(path: str, *, split: str | None = None):
    """The ``datasets.Dataset`` saved at ``path``; a saved DatasetDict needs ``split``."""
    try:
        import datasets
    except ImportError:
        raise audio.AudioError(
            f"{path}: a saved Hugging Face dataset; reading it needs the optional extra: "
            "pip install 'sslsim-jax[datasets]'"
        ) from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise audio.AudioError(
                f"{path}: a dataset with splits {sorted(loaded)}; choose one "
                f"(got {split!r}), e.g. {path}:{sorted(loaded)[0]}"
            )
        loaded = loaded[split]
    return loaded


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class RowClip(audio.Clip):
    """A row of a dataset's ``Audio`` column, planned from the encoded file's header."""

    rows: Any  # the dataset, its audio column not decoded
    column: str
    index: int
    fingerprint: str

    def identity(self) -> list:
        return [self.fingerprint, self.index]

    def load(self) -> np.ndarray:
        with _row_file(self.rows[self.index][self.column], self.path) as f:
            x = f.read(
                frames=audio.read_margin(f.samplerate, self.max_seconds),
                dtype="float32",
                always_2d=True,
            )
        return audio.model_samples(x, self.sample_rate_in, self.path, max_seconds=self.max_seconds)


def _row_file(cell: Any, name: str) -> soundfile.SoundFile:
    """The encoded audio of a dataset cell ``{"bytes", "path"}`` opened with soundfile."""
    if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
        raise audio.AudioError(f"{name}: no audio in this row (got {type(cell).__name__})")
    source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
    try:
        return soundfile.SoundFile(source)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise audio.AudioError(f"{name}: not readable audio ({e})") from None


def _dataset_catalogue(dataset: Any, label: str) -> tuple[int, Planner]:
    import datasets

    columns = [k for k, f in dataset.features.items() if isinstance(f, datasets.Audio)]
    if not columns:
        raise audio.AudioError(
            f"{label}: no column of type datasets.Audio (columns: {sorted(dataset.features)})"
        )
    column = columns[0]
    rows = dataset.cast_column(column, datasets.Audio(decode=False))
    fingerprint = getattr(dataset, "_fingerprint", None) or label

    def plan(i: int, max_seconds: float | None) -> RowClip:
        cell = rows[i][column]
        origin = cell.get("path") if isinstance(cell, dict) else None
        name = f"{label}[{i}]" + (f" ({origin})" if origin else "")
        with _row_file(cell, name) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            fmt = f"{f.format}/{f.subtype}"
        if frames <= 0:
            raise audio.AudioError(f"{name}: no samples (zero length)")
        return RowClip(
            path=name,
            num_samples=audio.cropped_length(frames, rate, max_seconds),
            sample_rate_in=rate,
            channels_in=channels,
            format_in=fmt,
            duration_in=frames / rate,
            rows=rows,
            column=column,
            index=i,
            fingerprint=fingerprint,
            max_seconds=max_seconds,
        )

    return len(rows), plan


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ArrayClip(audio.Clip):
    """A waveform given from Python; ``load`` reads the item again from its sequence."""

    digest: str
    items: Sequence[Any]
    index: int

    def identity(self) -> list:
        return [self.digest]

    def load(self) -> np.ndarray:
        name, x, rate = _array_item(self.items[self.index], self.index)
        if _digest(x, rate) != self.digest:
            raise audio.AudioError(f"{name}: the waveform changed since the run was planned")
        x = x[: audio.read_margin(rate, self.max_seconds)] if self.max_seconds else x
        return audio.model_samples(x, rate, name, max_seconds=self.max_seconds)


def _array_item(item: Any, index: int) -> tuple[str, np.ndarray, int]:
    """``(id, waveform, sample_rate)`` checked: [S_in, C] float32 and an integer rate."""
    if not isinstance(item, tuple | list) or len(item) != 3:
        raise audio.AudioError(
            f"audio item {index}: expected a tuple (id, waveform, sample_rate), got "
            f"{type(item).__name__}"
        )
    name, wave, rate = item
    name = str(name)
    x = np.asarray(wave)
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2):
        raise audio.AudioError(
            f"{name}: expected a waveform [samples] or [samples, channels] of numbers, got "
            f"{x.dtype} {x.shape}"
        )
    if x.size == 0:
        raise audio.AudioError(f"{name}: the waveform has no samples")
    if x.dtype.kind in "iu":  # integer PCM -> [-1, 1) as soundfile reads it
        info = np.iinfo(x.dtype)
        half = (int(info.max) - int(info.min) + 1) // 2  # unsigned PCM is centred on half
        x = (x.astype(np.float64) - (half if x.dtype.kind == "u" else 0)) / half
    x = x.astype(np.float32).reshape(x.shape[0], -1)
    if int(rate) != rate or rate < 1:
        raise audio.AudioError(f"{name}: expected a positive integer sample_rate, got {rate!r}")
    return name, x, int(rate)


def _digest(x: np.ndarray, rate: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rate}:{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _array_catalogue(items: Sequence[Any]) -> tuple[int, Planner]:
    def plan(i: int, max_seconds: float | None) -> ArrayClip:
        name, x, rate = _array_item(items[i], i)
        return ArrayClip(
            path=name,
            num_samples=audio.cropped_length(x.shape[0], rate, max_seconds),
            sample_rate_in=rate,
            channels_in=x.shape[1],
            duration_in=x.shape[0] / rate,
            format_in="array",
            digest=_digest(x, rate),
            items=items,
            index=i,
            max_seconds=max_seconds,
        )

    return len(items), plan


def _file_catalogue(paths: list[str]) -> tuple[int, Planner]:
    return len(paths), lambda i, max_seconds: audio.probe(paths[i], max_seconds=max_seconds)


def catalogue(source: Any) -> tuple[int, Planner]:
    """How many items ``source`` has and a function ``plan(i, max_seconds)`` that plans item i
    (see the module docstring for the sources accepted).

    A path ``DIR:SPLIT`` names one split of a saved DatasetDict.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        head, _, split = path.rpartition(":")
        if head and not os.path.exists(path) and is_saved_dataset(head):
            return _dataset_catalogue(load_saved_dataset(head, split=split), head)
        if is_saved_dataset(path):
            return _dataset_catalogue(load_saved_dataset(path), path)
        return _file_catalogue(audio.list_audio(path))
    if _is_dataset(source):
        if not hasattr(source, "cast_column") or hasattr(source, "keys"):
            raise audio.AudioError(
                f"expected one split of the dataset (a datasets.Dataset), got "
                f"{type(source).__name__}"
                + (f" with splits {sorted(source.keys())}" if hasattr(source, "keys") else "")
            )
        return _dataset_catalogue(source, "dataset")
    if isinstance(source, bytes | np.ndarray):
        raise TypeError(
            f"expected paths, a dataset or (id, waveform, sample_rate) tuples, got "
            f"{type(source).__name__}"
        )
    if not isinstance(source, Sequence):
        if not isinstance(source, Iterable):
            raise TypeError(f"expected an audio source, got {type(source).__name__}")
        source = list(source)  # an iterator is read once: held in memory
    if source and isinstance(source[0], tuple | list):
        return _array_catalogue(source)
    if source and not isinstance(source[0], str | os.PathLike):
        raise audio.AudioError(
            "audio item 0: expected a path or a tuple (id, waveform, sample_rate), got "
            f"{type(source[0]).__name__}"
        )
    return _file_catalogue(audio.list_audio(source))
