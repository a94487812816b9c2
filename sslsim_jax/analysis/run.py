"""`analyze`: models and audio in, similarity tables out (the stages composed).

settings -> networks (models, layers) -> inputs (audio share) -> extract (statistics, resumable)
-> state (process merge) -> tables -> results files (`sslsim_jax.results`) -> report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

from sslsim_jax import distributed, results
from sslsim_jax.analysis import plan as plan_lib
from sslsim_jax.analysis.extract import extract, run_mesh
from sslsim_jax.analysis.inputs import batch_shape, load_share, plan_batches
from sslsim_jax.analysis.networks import (
    ModelEntry,
    finetune_pairs,
    layers_for,
    model_name,
    network_names,
    network_sizes,
    prepare_models,
)
from sslsim_jax.analysis.plan import Plan, parse_size, plan_passes
from sslsim_jax.analysis.settings import AnalysisError, Settings
from sslsim_jax.analysis.state import STATE_DIR, CheckpointSaver, merge_processes, run_key
from sslsim_jax.analysis.tables import (
    NeuronMatches,
    attention_layer_names,
    attention_map_rows,
    attention_tables,
    localization_rows,
    pair_values,
    similarity_table,
    topk_rows,
)
from sslsim_jax.compile_log import compile_log
from sslsim_jax.intermediates import SpeechModel
from sslsim_jax.memory import format_bytes


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


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str):
    """Adds the wall seconds of the block to ``seconds[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _model_of(entries: Sequence[ModelEntry]) -> list[str]:
    return [e.name for e in entries for _ in e.layers]


def _digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(names).encode()).hexdigest()[:10]


def memory_budget(settings: Settings) -> int:
    """Bytes per device the statistics may take: ``settings.max_memory``, or what a device
    of the run's mesh holds."""
    if settings.max_memory is not None:
        return parse_size(settings.max_memory)
    return plan_lib.memory_limit(run_mesh(settings).devices.flat[0])[0]


def make_plan(entries: Sequence[ModelEntry], settings: Settings) -> Plan:
    """The passes of the analysis under `memory_budget` (`sslsim_jax.analysis.plan`)."""
    return plan_passes(
        network_sizes(entries),
        budget=memory_budget(settings),
        bootstrap=settings.bootstrap,
        shards=settings.stat_shards,
    )


def planned_networks(
    models: Sequence[str | tuple[str, SpeechModel]], settings: Settings
) -> tuple[list[str], list[int], list[str]]:
    """(names, widths, model of each) of the networks an analysis of ``models`` compares, from
    the models' config.json alone: no weights are read."""
    from sslsim_jax import checkpoints
    from sslsim_jax.models import ModelConfig

    names, sizes, model_of, taken = [], [], [], set()
    for item in models:
        if isinstance(item, tuple):
            name, config = item[0], item[1].config
        else:
            directory = checkpoints.resolve(item)
            config = ModelConfig.from_json_file(os.path.join(directory, "config.json"))
            name = model_name(os.fspath(item))
        base, k = name, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        for label in layers_for(config, name, settings.layers):
            names.append(f"{name}:{label}")
            sizes.append(config.hidden_size)
            model_of.append(name)
    return names, sizes, model_of


def describe_plan(models: Sequence[str | tuple[str, SpeechModel]], settings: Settings) -> str:
    """The plan of an analysis (`make_plan`), from the models' config.json alone: no weights
    are read and nothing is run (``sslsim analyze ... --plan``)."""
    names, sizes, model_of = planned_networks(models, settings)
    plan = plan_passes(
        sizes, budget=memory_budget(settings), bootstrap=settings.bootstrap,
        shards=settings.stat_shards,
    )  # fmt: skip
    width = sum(sizes)
    return (
        plan.describe(names, model_of) + f"\n  all networks in one pass would need "
        f"{format_bytes(plan_lib.statistics_bytes(width, bootstrap=settings.bootstrap))}"
        f" ({width} neurons)"
    )


def _batch_shapes(utterances, settings: Settings) -> list[list[int]]:
    lengths = [u.num_samples for u in utterances]
    multiple = distributed.batch_multiple(run_mesh(settings))
    shapes = {batch_shape(b, lengths, multiple) for b in plan_batches(lengths, settings)}
    return [list(shape) for shape in sorted(shapes)]


def pass_entries(entries: Sequence[ModelEntry], networks: Sequence[int]) -> list[ModelEntry]:
    """The models of a pass, each with only the layers among ``networks`` (global column
    indices); models with none are left out, so a pass runs only the models it needs."""
    chosen, out, n = set(networks), [], 0
    for e in entries:
        layers = [label for k, label in enumerate(e.layers, start=n) if k in chosen]
        n += len(e.layers)
        if layers:
            out.append(dataclasses.replace(e, layers=layers))
    return out


def attention_owners(plan: Plan, entries: Sequence[ModelEntry]) -> dict[tuple[str, str], int]:
    """(model a, model b) -> the pass that compares their attention: the first pass that runs
    both (every pair of models meets in some pass, since every pair of groups has one)."""
    owner: dict[tuple[str, str], int] = {}
    for i, p in enumerate(plan.passes):
        names = [e.name for e in pass_entries(entries, p.networks)]
        for a in names:
            for b in names:
                owner.setdefault((a, b), i)
    return owner


def _owned_models(frame: pd.DataFrame, owner: dict, index: int) -> pd.DataFrame:
    keep = [owner.get(ab) == index for ab in zip(frame.model_a, frame.model_b, strict=True)]
    return frame[np.asarray(keep, bool)]


def _in_model_order(frame: pd.DataFrame, entries: Sequence[ModelEntry]) -> pd.DataFrame:
    """Head rows of several passes in the one-pass order: model pairs as `init_state` makes
    them (a before b in the run's order), each pair's rows as they came."""
    rank = {e.name: i for i, e in enumerate(entries)}
    lo = np.minimum(frame.model_a.map(rank), frame.model_b.map(rank))
    hi = np.maximum(frame.model_a.map(rank), frame.model_b.map(rank))
    keys = pd.DataFrame({"lo": lo, "hi": hi})
    return frame.iloc[keys.sort_values(["lo", "hi"], kind="stable").index].reset_index(drop=True)


def _in_network_order(frame: pd.DataFrame, index: dict) -> pd.DataFrame:
    """Rows of several passes in the one-pass order: metric blocks, then network a, network b,
    as a single pass writes them."""
    if frame.empty:
        return frame
    keys = pd.DataFrame(
        {
            "a": (frame.model_a + ":" + frame.layer_a).map(index),
            "b": (frame.model_b + ":" + frame.layer_b).map(index),
        }
    )
    order = ["a", "b"]
    if "metric" in frame.columns:
        first = {m: i for i, m in enumerate(dict.fromkeys(frame.metric))}
        keys.insert(0, "m", frame.metric.map(first))
        order.insert(0, "m")
    if "k" in frame.columns:
        keys["k"] = frame.k
        order.append("k")
    return frame.iloc[keys.sort_values(order, kind="stable").index].reset_index(drop=True)


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
        audio_source: a directory, a list of files, or a text file of paths; a directory
            written by ``datasets.Dataset.save_to_disk`` (``DIR:SPLIT`` for one split of a
            DatasetDict) or a ``datasets.Dataset`` with an ``Audio`` column; or a sequence
            (or iterable, then held in memory) of ``(id, waveform, sample_rate)``. Audio is
            planned from lengths and decoded batch by batch (`sslsim_jax.sources`).
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
    with lock_output_dir(out), compile_log() as compiled:
        return _analyze_locked(
            models, audio_source, out, settings, progress=progress, report=report,
            compiled=compiled,
        )  # fmt: skip


def _analyze_locked(
    models, audio_source, out, settings, *, progress: bool, report: bool, compiled: dict
):
    began = time.perf_counter()
    seconds: dict[str, float] = {}  # wall seconds by stage, recorded in run.json
    entries = prepare_models(models, settings)
    process, processes = jax.process_index(), jax.process_count()
    utterances, ids = load_share(audio_source, entries, settings, shard=(process, processes))
    if processes > 1 and not sum(distributed.allgather_json(len(utterances))):
        raise AnalysisError(
            "no usable audio in any process: every clip is shorter than the models' receptive "
            "field (see the warnings)"
        )
    key = run_key(entries, utterances, settings)
    plan = make_plan(entries, settings)
    if len(plan.passes) > 1 and progress and process == 0:
        print(plan.describe(network_names(entries), _model_of(entries)), file=sys.stderr)
    names = network_names(entries)
    group_of = plan.group_of
    index = {n: i for i, n in enumerate(names)}
    tables, topk_parts, head_parts = [], [], []
    matches = NeuronMatches.empty(names, network_sizes(entries)) if process == 0 else None
    owner = attention_owners(plan, entries) if settings.attention else {}
    skipped, frames = {}, 0
    # The last checkpoint of a pass (GBs for many networks) is written while its metrics run.
    with CheckpointSaver() as saver:
        for i, p in enumerate(plan.passes):
            sub = pass_entries(entries, p.networks)
            suffix = "" if len(plan.passes) == 1 else "-" + _digest([names[n] for n in p.networks])
            # Attention: only the model pairs this pass owns; none -> no attention maps at all.
            pairs = {ab for ab, k in owner.items() if k == i}
            path = os.path.join(out, STATE_DIR, f"{key}{suffix}.npz")

            def owned(frame, a=("model_a", "layer_a"), b=("model_b", "layer_b"), p=p):
                if len(plan.passes) == 1:  # one pass owns every pair
                    return frame
                ia = (frame[a[0]] + ":" + frame[a[1]]).map(index)
                ib = (frame[b[0]] + ":" + frame[b[1]]).map(index)
                keep = [p.owns(group_of, x, y) for x, y in zip(ia, ib, strict=True)]
                return frame[np.asarray(keep, bool)]

            with _timed(seconds, "statistics"):
                saver.wait()  # the previous pass's, before this pass's statistics take memory
                state = extract(
                    sub,
                    utterances,
                    settings
                    if pairs or not settings.attention
                    else dataclasses.replace(settings, attention=False),
                    state_path=path,
                    progress=progress,
                    ids=ids,
                    attention_pairs=pairs,
                    finished=functools.partial(saver.save, path),
                )
                state = merge_processes(state, settings)
            with _timed(seconds, "metrics"):
                values = pair_values(state, sub, settings)  # each pair's values computed once
                tables.append(
                    owned(similarity_table(state, sub, settings, progress=progress, values=values))
                )
                if pairs:
                    attention_rows, heads = attention_tables(state, sub)
                    maps = attention_map_rows(state, sub, settings)
                    tables += [_owned_models(t, owner, i) for t in (*attention_rows, *maps)]
                    if heads is not None:
                        head_parts.append(heads)
                    skipped |= {
                        f"{a}|{b}|{m}": int(s.skipped) for (a, b, m), s in state.heads.items()
                    }
                frames = state.frames
                if process == 0:
                    owns = None
                    if len(plan.passes) > 1:
                        owns = [[p.owns(group_of, x, y) for y in p.networks] for x in p.networks]
                    matches.fill(values, p.networks, owns)
                    topk_parts.append(owned(topk_rows(state, sub, settings, values)))
                del values
        waiting = time.perf_counter()  # for the last checkpoint, written while the metrics ran
    seconds["checkpoint"] = time.perf_counter() - waiting
    tables_began = time.perf_counter()
    # Attention layers ("model:i", 1-based) sort with the networks of the same name, or after.
    layers = [n for e in entries for n in attention_layer_names(e)] if settings.attention else []
    order = {n: i for i, n in enumerate(dict.fromkeys([*names, *layers]))}
    table = _in_network_order(pd.concat(tables, ignore_index=True), order)
    records = [
        {**u.record(), "frames": entries[0].model.config.num_frames(u.num_samples)}
        for u in utterances
    ]
    if processes > 1:
        gathered = distributed.allgather_json(list(zip(ids, records, strict=True)))
        records = [r for _, r in sorted(pair for part in gathered for pair in part)]
    if process != 0:
        return table
    written = {results.SIMILARITIES, results.NEURONS, results.NEURON_RANKINGS}
    results.write_table(out, results.SIMILARITIES, table)
    matches.write(out)
    results.write_table(out, results.NEURON_RANKINGS, matches.rankings(settings.neuron_pool))
    if head_parts:
        heads = _in_model_order(pd.concat(head_parts, ignore_index=True), entries)
        results.write_table(out, results.ATTENTION_HEADS, heads)
        written.add(results.ATTENTION_HEADS)
    topk = pd.concat(topk_parts, ignore_index=True)
    if len(topk):
        results.write_table(out, results.TOPK, _in_network_order(topk, index))
        written.add(results.TOPK)
    localization = localization_rows(table, settings)
    if localization is not None:
        results.write_table(out, results.LOCALIZATION, localization)
        written.add(results.LOCALIZATION)
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
        "frames": frames,
        "utterances": records,
        "processes": processes,
        "attention_skipped_utterances": skipped,
        "settings": dataclasses.asdict(settings),
        "versions": versions(),
        "run_key": key,
        "plan": plan.record(),
        # Up to here (the report's figures are not jitted): the distinct padded batch shapes
        # [B, S] of this process's batches, and what JAX traced, lowered and XLA compiled.
        "compilation": {
            "batch_shapes": _batch_shapes(utterances, settings),
            **{k: round(v, 3) for k, v in compiled.items()},
        },
        # Wall seconds of this process by stage: the statistics (forward passes, updates,
        # checkpoints, process merge), the metrics and their tables, the wait for the last
        # checkpoint, writing the tables; the total from the models' loading to here.
        "seconds": {
            **{k: round(v, 2) for k, v in seconds.items()},
            "tables": round(time.perf_counter() - tables_began, 2),
            "total": round(time.perf_counter() - began, 2),
        },
    }
    results.write_json(out, results.RUN, run)
    remove_stale_outputs(out, written)
    if report:
        from sslsim_jax import report as report_module

        report_module.build_report(out)
    return table
