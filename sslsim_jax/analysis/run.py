"""`analyze`: models and audio in, similarity tables out (the stages composed).

settings -> networks (models, layers) -> inputs (audio share) -> extract (statistics, resumable)
-> state (process merge) -> tables -> results files (`sslsim_jax.results`) -> report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import platform
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import pandas as pd

from sslsim_jax import distributed, results
from sslsim_jax.analysis.extract import extract
from sslsim_jax.analysis.inputs import load_share
from sslsim_jax.analysis.networks import finetune_pairs, prepare_models
from sslsim_jax.analysis.settings import AnalysisError, Settings
from sslsim_jax.analysis.state import STATE_DIR, merge_processes, run_key
from sslsim_jax.analysis.tables import attention_tables, neuron_tables, similarity_table
from sslsim_jax.intermediates import SpeechModel


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("sslsim-jax", "jax", "jaxlib", "flax", "numpy", "transformers", "orbax-checkpoint"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["devices"] = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return out


def check_output_dir(out: str | os.PathLike) -> str:
    """Creates ``out`` if needed and checks it is writable; errors name it."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise AnalysisError(f"{out}: exists and is not a directory", argument="out")
    try:
        os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise AnalysisError(f"{out}: not writable ({e.strerror or e})", argument="out") from None
    return out


@contextlib.contextmanager
def lock_output_dir(out: str):
    """Holds an exclusive lock on ``out`` for this process (``.sslsim_state/lock.P``).

    Two runs into one directory would overwrite each other's files and both report success;
    the second one stops instead, naming the holder. The lock is released when the process
    ends, however it ends.
    """
    path = os.path.join(out, STATE_DIR, f"lock.{jax.process_index()}")
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AnalysisError(
            f"{out}: another sslsim run ({holder}) is writing into this directory; wait for it "
            "or choose another directory",
            argument="out",
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def remove_stale_outputs(out: str, written: set[str]) -> None:
    """Deletes the result tables of an earlier run that this run did not write (e.g. its
    ``attention_heads.csv``), so the directory holds one run only. Called once this run's
    files are complete; nothing but the file names of `sslsim_jax.results` is touched."""
    for name in results.COLUMNS:
        if name not in written:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.unlink(path)


def analyze(
    models: Sequence[str | tuple[str, SpeechModel]],
    audio_source: Any,
    out: str | os.PathLike,
    settings: Settings | None = None,
    *,
    progress: bool = True,
    report: bool = True,
) -> pd.DataFrame:
    """Runs the whole analysis and writes its outputs into ``out``.

    Args:
        models: paths or hub ids (anything ``load_model`` accepts), or ``(name, SpeechModel)``.
        audio_source: a directory, a list of files, or a text file of paths.
        out: output directory (created; must be writable).
        settings: what to compute (default ``Settings()``).
        progress: show tqdm progress bars.
        report: also draw the figures and ``report.html`` (``sslsim_jax.report``).

    Returns:
        The similarity table also written to ``out/similarities.csv``.
    """
    settings = settings or Settings()
    with jax.default_matmul_precision(settings.precision):
        return _analyze(models, audio_source, out, settings, progress=progress, report=report)


def _analyze(models, audio_source, out, settings: Settings, *, progress: bool, report: bool):
    out = check_output_dir(out)
    with lock_output_dir(out):
        return _analyze_locked(
            models, audio_source, out, settings, progress=progress, report=report
        )


def _analyze_locked(models, audio_source, out, settings, *, progress: bool, report: bool):
    entries = prepare_models(models, settings)
    process, processes = jax.process_index(), jax.process_count()
    utterances, ids = load_share(audio_source, entries, settings, shard=(process, processes))
    if processes > 1 and not sum(distributed.allgather_json(len(utterances))):
        raise AnalysisError(
            "no usable audio in any process: every clip is shorter than the models' receptive "
            "field (see the warnings)"
        )
    key = run_key(entries, utterances, settings)
    state = extract(
        entries,
        utterances,
        settings,
        state_path=os.path.join(out, STATE_DIR, f"{key}.npz"),
        progress=progress,
        ids=ids,
    )
    state = merge_processes(state)
    records = [
        {**u.record(), "frames": entries[0].model.config.num_frames(u.num_samples)}
        for u in utterances
    ]
    if processes > 1:
        gathered = distributed.allgather_json(list(zip(ids, records, strict=True)))
        records = [r for _, r in sorted(pair for part in gathered for pair in part)]
    attention_rows, heads = attention_tables(state, entries)
    table = pd.concat(
        [similarity_table(state, entries, settings, progress=progress), *attention_rows],
        ignore_index=True,
    )
    if process != 0:
        return table
    written = {results.SIMILARITIES, results.NEURONS, results.NEURON_RANKINGS}
    results.write_table(out, results.SIMILARITIES, table)
    pairs, ranks = neuron_tables(state, entries, settings)
    results.write_table(out, results.NEURONS, pairs)
    results.write_table(out, results.NEURON_RANKINGS, ranks)
    if heads is not None:
        results.write_table(out, results.ATTENTION_HEADS, heads)
        written.add(results.ATTENTION_HEADS)
    skipped = {f"{a}|{b}|{m}": int(s.skipped) for (a, b, m), s in state.heads.items()}
    run = {
        "models": [
            {
                "name": e.name,
                "path": e.source,
                "config_hash": e.config_hash,
                "weights_digest": e.weights_digest,
                "model_type": e.model.config.model_type,
                "num_layers": e.model.config.num_hidden_layers,
                "ctc_head": e.model.config.ctc_head,
                "layers": e.layers,
                "normalize": e.normalize,
            }
            for e in entries
        ],
        "finetune_pairs": finetune_pairs(entries),
        "frames": state.frames,
        "utterances": records,
        "processes": processes,
        "attention_skipped_utterances": skipped,
        "settings": dataclasses.asdict(settings),
        "versions": versions(),
        "run_key": key,
    }
    results.write_json(out, results.RUN, run)
    remove_stale_outputs(out, written)
    if report:
        from sslsim_jax import report as report_module

        report_module.build_report(out)
    return table
