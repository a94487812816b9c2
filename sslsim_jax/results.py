"""The output files of a run: names, columns, readers and validators, and one atomic writer.

Every file `sslsim analyze` writes into ``--out`` is declared here once; the analysis writes
through `write_table` / `write_json` (which check the columns) and the report reads through
`read_results` (which validates them):

- ``similarities.csv``: ``model_a, layer_a, model_b, layer_b, metric, value`` and, when
  bootstrapped, ``ci_low, ci_high`` (empty on the rows of ``rbf_cka``, whose frame
  subsample the bootstrap does not resample).
  Layers are strings: ``"0"`` … ``"L"`` (0 = transformer input, i = output of block i) and
  ``"final"`` (final LayerNorm of pre-LN models), which sorts after the numbers. Both orders
  of every pair are present.
- ``attention_heads.csv`` (with attention): ``model_a, layer_a, head_a, model_b, layer_b,
  head_b, method, value``.
- ``neurons.csv``: ``model_a, layer_a, neuron_a, model_b, layer_b, matched_neuron_b,
  correlation``.
- ``neuron_rankings.csv``: ``model, layer, neuron, maxcorr, mincorr, maxcorr_rank,
  mincorr_rank, constant`` (Wu et al.'s rankings against the other models' networks).
- ``topk.csv``: ``model_a, layer_a, model_b, layer_b, metric, k, value``: Wu et al.'s top-k
  of maxcorr, linreg, svcca and pwcca for k = 0.1, …, 1.0 (k = 1 is the metric itself).
- ``localization.csv``: ``model, layer, localized, distributed, score``: Wu et al.'s
  localization score (z(mean maxcorr) − z(mean svcca) over the networks of the run).
- ``run.json``: models (name, path, config and weights digests, …), fine-tune pairs, frame and
  utterance counts, settings and versions.

Files are written whole or not at all (a temporary file, fsync, rename) and get the
permissions the user's umask gives (0644 under umask 022), so colleagues on a shared cluster
can read a run's results.
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

__all__ = [
    "ATTENTION_HEADS",
    "NEURONS",
    "NEURON_RANKINGS",
    "OUTPUTS",
    "RUN",
    "Results",
    "ResultsError",
    "SIMILARITIES",
    "atomic_write",
    "layer_key",
    "layer_order",
    "read_npz",
    "read_results",
    "savez",
    "write_json",
    "write_table",
]

# File names in a run's output directory.
SIMILARITIES = "similarities.csv"
ATTENTION_HEADS = "attention_heads.csv"
NEURONS = "neurons.csv"
NEURON_RANKINGS = "neuron_rankings.csv"
TOPK = "topk.csv"
LOCALIZATION = "localization.csv"
RUN = "run.json"
REPORT = "report.html"
FIGURES = "figures"

SIMILARITY_COLUMNS = ("model_a", "layer_a", "model_b", "layer_b", "metric", "value")
CI_COLUMNS = ("ci_low", "ci_high")
HEAD_COLUMNS = ("model_a", "layer_a", "head_a", "model_b", "layer_b", "head_b", "method", "value")
NEURON_COLUMNS = (
    "model_a",
    "layer_a",
    "neuron_a",
    "model_b",
    "layer_b",
    "matched_neuron_b",
    "correlation",
)
# Grids up to this many rows and columns get their values written in the cells.
NEURON_RANKING_COLUMNS = (
    "model",
    "layer",
    "neuron",
    "maxcorr",
    "mincorr",
    "maxcorr_rank",
    "mincorr_rank",
    "constant",
)
TOPK_COLUMNS = ("model_a", "layer_a", "model_b", "layer_b", "metric", "k", "value")
LOCALIZATION_COLUMNS = ("model", "layer", "localized", "distributed", "score")
# Each table's required columns, in the order they are written.
COLUMNS: dict[str, tuple[str, ...]] = {
    TOPK: TOPK_COLUMNS,
    LOCALIZATION: LOCALIZATION_COLUMNS,
    SIMILARITIES: SIMILARITY_COLUMNS,
    ATTENTION_HEADS: HEAD_COLUMNS,
    NEURONS: NEURON_COLUMNS,
    NEURON_RANKINGS: NEURON_RANKING_COLUMNS,
}
# Every file and directory a run owns in its output directory.
OUTPUTS = (*COLUMNS, RUN, REPORT, FIGURES)


# ---------------------------------------------------------------------------------------------
# Writing

_UMASK_LOCK = threading.Lock()


def _file_mode() -> int:
    """0o666 less the process umask: what ``open(path, "w")`` would give a new file."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


class DirectWriter(io.RawIOBase):
    """A write-only, unseekable stream to a file opened with ``O_DIRECT``, for checkpoints.

    Buffered writes cost the kernel a page-cache copy: on a 2-core cloud VM, 4.7 s of CPU per
    1.6 GB (``dd``), taken from the metrics that run while the last checkpoint is written.
    ``O_DIRECT`` sends page-aligned blocks from this writer's buffer to the disk (0.4 s of CPU).
    The tail is padded to a whole block and the file cut back to its length when closed, then
    fsynced. `open` returns None where ``O_DIRECT`` is missing (macOS) or refused (tmpfs).
    """

    BLOCK = 1 << 12  # a multiple of every device's logical block size
    SIZE = 1 << 26  # bytes gathered per write

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd, self._length, self._filled = fd, 0, 0
        self._buffer = mmap.mmap(-1, self.SIZE)  # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buffer)

    @classmethod
    def open(cls, path: str) -> DirectWriter | None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | flag)
        except OSError:
            return None
        try:
            writer = cls(fd)
            # A file system that opens with O_DIRECT but refuses its writes: one zero block.
            os.write(fd, writer._view[: cls.BLOCK])
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            os.close(fd)
            return None
        return writer

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            take = min(len(data) - done, self.SIZE - self._filled)
            self._view[self._filled : self._filled + take] = data[done : done + take]
            self._filled += take
            done += take
            if self._filled == self.SIZE:
                self._flush_blocks()
        self._length += done
        return done

    def _flush_blocks(self) -> None:
        """Writes the buffer's whole blocks and keeps the rest at its start."""
        whole = self._filled - self._filled % self.BLOCK
        written = 0
        while written < whole:
            written += os.write(self._fd, self._view[written:whole])
        rest = self._filled - whole
        if whole:
            self._view[:rest] = self._view[whole : self._filled]
        self._filled = rest

    def close(self) -> None:
        if self.closed:
            return
        try:
            tail = self._filled
            if tail:  # the last, partial block: padded with zeros, then cut off
                padded = -(-tail // self.BLOCK) * self.BLOCK
                self._view[tail:padded] = bytes(padded - tail)
                self._filled = padded
                self._flush_blocks()
            os.ftruncate(self._fd, self._length)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._view.release()
            self._buffer.close()
            super().close()


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], None], *, binary=False, direct=False
) -> None:
    """Writes ``path`` whole or not at all: a temporary file in the same directory, fsync,
    then ``os.replace``. The file gets the permissions the umask gives (not mkstemp's 0600).

    Args:
        path: the file to write.
        write: called with the open temporary file.
        binary: open it in binary mode.
        direct: (binary, large files) write around the page cache (`DirectWriter`) where the
            file system allows it, else as usual.

    Raises:
        OSError: with the path in the message (a full disk says which file it was writing).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".partial"
        )
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        writer = DirectWriter.open(tmp) if direct and binary else None
        if writer is not None:
            os.close(fd)
            try:
                with writer:
                    write(writer)
            except OSError as e:  # a file system that took the first block but not the rest
                if e.errno != errno.EINVAL:
                    raise
                writer = None
            if writer is None:  # written again, buffered
                fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        if writer is None:
            with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and path not in str(e):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def savez(file: IO, arrays: dict[str, np.ndarray], *, chunk: int = 1 << 26) -> None:
    """``np.savez(file, **arrays)`` (an uncompressed ``.npz`` that `np.load` reads), written
    from the arrays' own memory in ``chunk``-byte pieces.

    `np.savez` copies each array in 16 MiB pieces while holding the GIL; here the only work
    under the GIL is a call per piece (the CRC and the write release it), so a checkpoint
    written on a background thread barely slows the Python work beside it (the metrics' host
    SVDs): a 1.6 GB checkpoint beside the SVDs of 100 pairs, 10.9 -> 7.7 s for both.
    """
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                write_npy(out, array, chunk=chunk)


def write_npy(file: IO, array: np.ndarray, *, chunk: int = 1 << 26) -> None:
    """``np.save(file, array)`` from the array's own memory, in ``chunk``-byte pieces (see
    `savez`)."""
    array = np.asarray(array)
    array = array if array.flags.c_contiguous else array.copy()
    np.lib.format.write_array_header_2_0(file, np.lib.format.header_data_from_array_1_0(array))
    data = memoryview(array.reshape(-1)).cast("B")
    for start in range(0, len(data), chunk):
        file.write(data[start : start + chunk])


def read_npz(path: str | os.PathLike, *, allocate=np.empty) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (`savez`'s or `np.savez`'s), each read from the file straight
    into memory from ``allocate(shape, dtype)`` (e.g. `host_stats.mapped_zeros`): no second
    copy of a checkpoint is held while it is placed. Compressed members and ``.npy`` format
    3.0 are read by NumPy as they are.

    Raises:
        ValueError: a member is not an ``.npy`` array, holds objects (as `np.load` without
            ``allow_pickle``) or ends early.
    """
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            with zf.open(info) as f:
                arrays[name] = _read_npy(f, allocate, info.compress_type == zipfile.ZIP_STORED)
    return arrays


def _read_npy(file: IO, allocate, stored: bool) -> np.ndarray:
    fmt = np.lib.format
    version = fmt.read_magic(file)
    if not stored or version not in ((1, 0), (2, 0)):
        file.seek(0)
        return fmt.read_array(file, allow_pickle=False)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(file)
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    out = allocate(shape[::-1] if fortran else shape, dtype)
    data = memoryview(out.reshape(-1)).cast("B")
    done = 0
    while done < len(data):  # in pieces: a zip member's readinto reads the whole rest first
        n = file.readinto(data[done : done + (1 << 26)])
        if not n:
            raise ValueError(f"expected {len(data)} bytes of array data, got {done}")
        done += n
    return out.T if fortran else out


def write_table(out_dir: str | os.PathLike, name: str, frame: pd.DataFrame) -> str:
    """Writes table ``name`` (one of `COLUMNS`) into ``out_dir``; returns its path.

    Raises:
        ValueError: the frame lacks a column of the file's schema (a bug, never user input).
    """
    missing = [c for c in COLUMNS[name] if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing} (has {list(frame.columns)})")
    path = os.path.join(os.fspath(out_dir), name)
    atomic_write(path, lambda f: frame.to_csv(f, index=False))
    return path


def _csv_field(text: str) -> str:
    """``text`` as one CSV field, quoted where pandas' ``to_csv`` (``QUOTE_MINIMAL``) quotes."""
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def write_neurons(
    out_dir: str | os.PathLike,
    names: Sequence[str],
    sizes: Sequence[int],
    best: np.ndarray,
    matched: np.ndarray,
) -> str:
    """Writes ``neurons.csv`` from its arrays; returns its path.

    The same text as `write_table` of the rows (network a, neuron a, network b; the float64
    repr of each |r|, empty for NaN), without building them: the paper's grid has 23 million
    rows, written in 42 s where pandas took 99 s and 8.9 GB to build and write them
    (`scripts/bench_tables.py`).

    Args:
        out_dir: the output directory.
        names: the K ``"model:layer"`` networks.
        sizes: their widths.
        best: [K, P, K] |r| of neuron i of network a with its best match in network b; rows
            i ≥ sizes[a] are not written.
        matched: [K, P, K] that neuron of b.
    """
    columns = [f.rsplit(":", 1) for f in names]
    heads = ["," + _csv_field(m) + "," + _csv_field(x) + "," for m, x in columns]
    ints = [str(i) for i in range(max(sizes))]

    def write(f):
        f.write((",".join(NEURON_COLUMNS) + "\n").encode())
        for a, d in enumerate(sizes):
            model, layer = columns[a]
            prefix = _csv_field(model) + "," + _csv_field(layer) + ","
            starts = [prefix + ints[i] + h for i in range(d) for h in heads]
            picked = matched[a, :d].ravel().tolist()
            picked = [ints[m] if 0 <= m < len(ints) else str(m) for m in picked]
            r = best[a, :d].astype(np.float64).ravel().tolist()
            values = [repr(v) if v == v else "" for v in r]  # NaN: an empty cell
            rows = zip(starts, picked, values, strict=True)
            f.write("".join([s + m + "," + v + "\n" for s, m, v in rows]).encode())

    path = os.path.join(os.fspath(out_dir), NEURONS)
    atomic_write(path, write, binary=True)
    return path


def write_json(out_dir: str | os.PathLike, name: str, value: Any) -> str:
    """Writes ``value`` as indented JSON to ``out_dir/name``; returns its path."""
    path = os.path.join(os.fspath(out_dir), name)
    atomic_write(path, lambda f: json.dump(value, f, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Reading


class ResultsError(ValueError):
    """A result file is missing or does not follow the file contract; the message names it."""


_LAYER = re.compile(r"^(0|[1-9][0-9]*)$")


def layer_key(layer: str) -> tuple[int, int, str]:
    """Sort key of a layer name: numbers by value, then ``"final"``, anything else last."""
    if _LAYER.match(layer):
        return (0, int(layer), "")
    if layer == "final":
        return (1, 0, "")
    return (2, 0, layer)


def layer_order(layers: Iterable[str]) -> list[str]:
    """Distinct layer names in network order: ``"0"``, ``"1"``, …, ``"10"``, then ``"final"``.

    Args:
      layers: layer names (strings), with repeats.

    Returns:
      The distinct names, numbers by value, ``"final"`` after them, anything else last.
    """
    return sorted(set(layers), key=layer_key)


@dataclass(frozen=True)
class Results:
    """The saved results of one run, as read by `read_results`.

    Attributes:
      out_dir: the output directory.
      run: the parsed ``run.json``.
      similarities: the tidy similarity table; model and layer columns are strings, ``value``
        (and ``ci_low``, ``ci_high`` when present) floats.
      attention_heads: the head-level table, or None when the run wrote none.
      neurons: the neuron-level table, or None when the run wrote none.
      topk: Wu et al.'s top-k table, or None.
      localization: the localization scores, or None.
    """

    out_dir: Path
    run: dict[str, Any]
    similarities: pd.DataFrame
    attention_heads: pd.DataFrame | None = None
    neurons: pd.DataFrame | None = None
    topk: pd.DataFrame | None = None
    localization: pd.DataFrame | None = None
    models: list[str] = field(init=False)

    def __post_init__(self) -> None:
        names = [m["name"] for m in self.run["models"]]
        object.__setattr__(self, "models", names)

    @property
    def frames(self) -> int | None:
        """Valid frames pooled over all utterances, or None when run.json does not say."""
        return self.run.get("frames")

    @property
    def finetune_pairs(self) -> list[tuple[str, str]]:
        """(pre-trained, fine-tuned) model name pairs."""
        return [(a, b) for a, b in self.run.get("finetune_pairs", [])]

    @property
    def has_ci(self) -> bool:
        """Whether the similarity table carries bootstrap confidence intervals."""
        return all(c in self.similarities.columns for c in CI_COLUMNS)


def _read_csv(
    path: Path,
    columns: Sequence[str],
    *,
    text: Sequence[str],
    numbers: Sequence[str],
    integers: Sequence[str] = (),
    optional_numbers: Sequence[str] = (),
) -> pd.DataFrame:
    """Reads and checks one table. Text columns are Python strings (object dtype), numbers
    floats (NaN for an empty cell or ``nan``), integers int64.

    A well-formed file is parsed with typed columns (`_read_typed`: a paper-scale
    ``neurons.csv`` of 23 million rows in 26 s, against 98 s as strings,
    `scripts/bench_tables.py`); anything that parser refuses is read again as strings and
    checked cell by cell, so that the error names the column and the row.
    """

    def check_columns(frame: pd.DataFrame) -> None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ResultsError(
                f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(c) for c in missing)} (has {list(frame.columns)})"
            )
        present = [c for c in optional_numbers if c in frame.columns]
        if present and len(present) != len(optional_numbers):
            absent = [c for c in optional_numbers if c not in frame.columns]
            raise ResultsError(
                f"{path}: has column {present[0]!r} but not {absent[0]!r} "
                f"(confidence intervals need both)"
            )

    kinds = dict(numbers=(*numbers, *optional_numbers), integers=integers)
    frame = _read_typed(path, text=text, **kinds)
    if frame is None:
        frame = _read_strings(path, check_columns, **kinds)  # checks the columns itself
    else:
        check_columns(frame)
    for c in text:
        values = frame[c].astype("category")
        empty = [i for i, x in enumerate(values.cat.categories) if not str(x).strip()]
        if empty:
            row = int(np.flatnonzero(np.isin(values.cat.codes, empty))[0])
            raise ResultsError(f"{path}: column {c!r} is empty in data row {row + 1}")
        frame[c] = values.astype(object)  # one string object per distinct value
    for c in ("layer_a", "layer_b"):
        if c in frame.columns:
            bad_layers = sorted(x for x in frame[c].unique() if layer_key(x)[0] == 2)
            if bad_layers:
                raise ResultsError(
                    f"{path}: column {c!r} expects a layer number or 'final', got {bad_layers[0]!r}"
                )
    return frame


# Cells the typed parser reads as numbers and `_read_strings` refuses: booleans.
_BOOLEANS = (b"true", b"false")


def _read_typed(
    path: Path, *, text: Sequence[str], numbers: Sequence[str], integers: Sequence[str]
) -> pd.DataFrame | None:
    """The table with typed columns (text as categories), or None where the typed parser
    fails or could read a cell differently from `_read_strings` (a boolean anywhere)."""
    try:
        with open(path, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 26):
                block = (tail + chunk).lower()
                if any(word in block for word in _BOOLEANS):
                    return None
                tail = block[-8:]
    except OSError:
        return None  # reported by `_read_strings`
    dtype = {
        **{c: "category" for c in text},
        **{c: np.float64 for c in numbers},
        **{c: np.int64 for c in integers},
    }
    try:
        frame = pd.read_csv(
            path,
            dtype=dtype,
            keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in numbers},
        )
    except Exception:  # noqa: BLE001 - `_read_strings` says what is wrong, or reads it
        return None
    if any(c in frame.columns and frame[c].dtype != dtype[c] for c in dtype):
        return None
    # pandas infers the categories' type: "1" and "01" both become 1. Text that reads as numbers
    # (a run's layers 0-12) is read again as strings, those columns only.
    again = [
        c
        for c in text
        if c in frame.columns and not all(isinstance(x, str) for x in frame[c].cat.categories)
    ]
    if again:
        raw = pd.read_csv(path, usecols=again, dtype=str, keep_default_na=False)
        for c in again:
            frame[c] = raw[c].astype("category")
    return frame


def _read_strings(
    path: Path,
    check_columns: Callable[[pd.DataFrame], None],
    *,
    numbers: Sequence[str],
    integers: Sequence[str],
) -> pd.DataFrame:
    """The table read as strings, its columns checked (``check_columns``), then its number and
    integer columns converted cell by cell (`ResultsError` naming the column and row of the
    first bad cell)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ResultsError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not a readable CSV file ({e})") from None
    check_columns(frame)
    for c in (*numbers, *integers):
        if c not in frame.columns:
            continue
        raw = frame[c].str.strip()
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() & ~raw.str.lower().isin(["", "nan"])
        if c in integers:
            bad |= values.isna() | (values != values.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "an integer" if c in integers else "a number"
            raise ResultsError(
                f"{path}: column {c!r} expects {kind}, got {frame[c].iloc[i]!r} in data row {i + 1}"
            )
        frame[c] = values.astype(int) if c in integers else values.astype(float)
    return frame


def _check_unique(frame: pd.DataFrame, path: Path, key: Sequence[str]) -> None:
    dup = frame.duplicated(list(key))
    if dup.any():
        row = frame[dup].iloc[0]
        raise ResultsError(f"{path}: duplicate row for {', '.join(f'{k}={row[k]}' for k in key)}")


def _check_models(frame: pd.DataFrame, path: Path, models: Sequence[str]) -> None:
    for c in ("model_a", "model_b", "model"):
        if c not in frame.columns:
            continue
        unknown = sorted(set(frame[c]) - set(models))
        if unknown:
            raise ResultsError(
                f"{path}: column {c!r} names model {unknown[0]!r}, which run.json does not "
                f"list (models: {list(models)})"
            )


def _read_run(path: Path) -> dict[str, Any]:
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(run, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(run).__name__}")
    models = run.get("models")
    if models is None:
        raise ResultsError(f"{path}: missing key 'models'")
    if not isinstance(models, list) or not models:
        raise ResultsError(f"{path}: key 'models' expects a non-empty list, got {models!r}")
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise ResultsError(f"{path}: models[{i}] expects an object with a 'name', got {m!r}")
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise ResultsError(f"{path}: duplicate model names in 'models': {names}")
    for i, pair in enumerate(run.get("finetune_pairs", [])):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and set(pair) <= set(names)):
            raise ResultsError(
                f"{path}: finetune_pairs[{i}] expects [pre-trained, fine-tuned] model names "
                f"from 'models' {names}, got {pair!r}"
            )
    frames = run.get("frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)):
        raise ResultsError(f"{path}: key 'frames' expects an integer, got {frames!r}")
    for key, kind in (("utterances", list), ("settings", dict), ("versions", dict)):
        if key in run and not isinstance(run[key], kind):
            raise ResultsError(
                f"{path}: key {key!r} expects a JSON {'array' if kind is list else 'object'}"
            )
    return run


def read_results(out_dir: str | os.PathLike[str]) -> Results:
    """Reads and validates the result files of one run.

    Args:
      out_dir: the run's output directory.

    Returns:
      The parsed `Results`.

    Raises:
      ResultsError: a required file (``run.json``, ``similarities.csv``) is missing, or any file
        breaks the contract (missing column, non-numeric value, unknown layer or model name,
        duplicate row, only one of ``ci_low``/``ci_high``); the message names file and column.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ResultsError(f"{out}: not a directory")
    run = _read_run(out / RUN)
    models = [m["name"] for m in run["models"]]

    sim_path = out / SIMILARITIES
    similarities = _read_csv(
        sim_path,
        SIMILARITY_COLUMNS,
        text=("model_a", "layer_a", "model_b", "layer_b", "metric"),
        numbers=("value",),
        optional_numbers=CI_COLUMNS,
    )
    _check_models(similarities, sim_path, models)
    _check_unique(similarities, sim_path, SIMILARITY_COLUMNS[:5])

    optional = {
        name: _read_optional(out / name, models, unique=unique, **kinds)
        for name, (kinds, unique) in _OPTIONAL.items()
    }
    return Results(
        out,
        run,
        similarities,
        optional[ATTENTION_HEADS],
        optional[NEURONS],
        optional[TOPK],
        optional[LOCALIZATION],
    )


# The optional tables: their text, number and integer columns, and their key (checked unique).
_OPTIONAL = {
    ATTENTION_HEADS: (
        dict(
            text=("model_a", "layer_a", "model_b", "layer_b", "method"),
            numbers=("value",),
            integers=("head_a", "head_b"),
        ),
        HEAD_COLUMNS[:7],
    ),
    NEURONS: (
        dict(
            text=("model_a", "layer_a", "model_b", "layer_b"),
            numbers=("correlation",),
            integers=("neuron_a", "matched_neuron_b"),
        ),
        (),
    ),
    TOPK: (
        dict(text=("model_a", "layer_a", "model_b", "layer_b", "metric"), numbers=("k", "value")),
        (),
    ),
    LOCALIZATION: (
        dict(text=("model", "layer"), numbers=("localized", "distributed", "score")),
        (),
    ),
}


def _read_optional(
    path: Path, models: Sequence[str], *, unique: Sequence[str], **kinds
) -> pd.DataFrame | None:
    """An optional table (None when the run wrote none), validated like the required ones."""
    if not path.exists():
        return None
    frame = _read_csv(path, COLUMNS[path.name], **kinds)
    _check_models(frame, path, models)
    if unique:
        _check_unique(frame, path, unique)
    return frame
