"""The analysis: models and audio in, similarity tables out.

Every model runs once over the audio, batch by batch. Each batch's hidden states (valid frames
only, the same frames in every model) are appended side by side and folded into one set of
joint streaming statistics (`sslsim_jax.stats.Moments`); attention maps, when asked, fold into
head-pair sums (`sslsim_jax.metrics.attention`). No activation outlives its batch. At the end
every metric of every ordered pair of networks (``model:layer``) comes from the statistics.

Resumable: the statistics are checkpointed (atomically) under ``OUT/.sslsim_state/`` as the run
goes, keyed by the models, the audio list and the settings; a run started again with the same
arguments continues after the last checkpointed batch and gives the same table as an
uninterrupted run (batches are deterministic and merged in the same order).

Confidence intervals (``bootstrap > 0``): a Poisson bootstrap over utterances. Replicate r
weights every frame of utterance u by w[u, r] ~ Poisson(1), drawn from ``(seed, u)`` so the
weights do not depend on batching or resumption; each replicate keeps its own statistics (memory
grows with the number of replicates) and the interval is the 2.5–97.5 % percentile range.
Attention-level metrics get no interval.

Devices: every padded batch [B, S] is split over the ``"data"`` axis of a mesh
(`sslsim_jax.distributed`), B rounded up to a multiple of the device count with silent
utterances that have a valid length but weight 0 (they enter no statistic, attention sum, frame
count or NaN check); the jitted statistics update reduces across devices. Batches do not depend
on the device count, so neither do the results (up to float32 reduction order).

Processes (after `sslsim_jax.distributed.initialize`): process p of P reads utterances
p, p + P, p + 2P, … of the list, runs them on its own devices, and checkpoints under its own
run key; the statistics of all processes are then merged (Chan's update, in process order) and
only process 0 writes outputs. Bootstrap weights are drawn from the utterance's index in the
full list, so they match a single-process run unless clips were dropped as too short.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sslsim_jax import audio, distributed, sharded, stats
from sslsim_jax.intermediates import SpeechModel, load_model
from sslsim_jax.metrics import attention as attn
from sslsim_jax.pairwise import METRICS, compare_moments

LAYER_METRICS = tuple(m for m in METRICS if m != "rbf_cka")
ATTENTION_METHODS = ("fro", "pearson", "js")
DEFAULT_METRICS = ("maxcorr", "linreg", "svcca", "pwcca", "linear_cka")
STATE_DIR = ".sslsim_state"
# Padded lengths are rounded up on a grid (`audio.padded_length`): multiples of 0.25 s up to
# 4 s, then of 0.5 s up to 8 s, and so on (at most 12.5 % padding above 4 s), so batches of
# similar lengths share one compiled shape: each new shape costs a compilation (10-60 s on a
# GPU).
PAD_MULTIPLE = 4000
PAD_STEPS = 16
FINAL = "final"
# Values of ``jax.default_matmul_precision`` offered by --precision, most exact first.
PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16", "default")
DTYPES = ("float32", "bfloat16")


class AnalysisError(ValueError):
    """Bad input to the analysis (arguments, models or audio); the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to compute. Defaults are the paper's measures over all layers.

    Attributes:
        metrics: layer-level metrics (see ``sslsim_jax.pairwise.METRICS``; rbf_cka excluded).
        layers: layer indices to keep for every model (None: all, 0..L); pre-LN models also
            get their final LayerNorm output as layer "final" when layers is None or lists it.
        attention: also compare attention heads (methods ``attention_methods``).
        max_utterances: use at most this many utterances (in list order).
        max_seconds: crop each utterance to this duration.
        batch_seconds: padded audio per batch (B × longest utterance).
        bootstrap: number of Poisson-bootstrap replicates for confidence intervals (0: none).
        seed: seeds the bootstrap.
        checkpoint_seconds: minimum wall time between checkpoints (0: after every batch).
        devices: local devices to split batches over (None: all); results do not depend on it.
        precision: matmul precision of the whole run, model and metrics
            (``jax.default_matmul_precision``): "highest" is exact float32 on every backend;
            "tensorfloat32" (GPU) and "bfloat16"/"default" (TPU) are faster and change the
            activations in the 3rd-4th significant digit (README "Precision").
        dtype: the models' compute dtype, "float32" or "bfloat16" (norms and softmax stay
            float32; statistics are always accumulated in float32).
        stat_shards: split the joint statistics by rows over this many devices
            (`sslsim_jax.sharded`; a divisor of ``devices``), for more networks than one
            device's memory holds; 1 keeps a full copy on every device.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    layers: tuple[int | str, ...] | None = None
    attention: bool = False
    attention_methods: tuple[str, ...] = ATTENTION_METHODS
    max_utterances: int | None = None
    max_seconds: float | None = None
    batch_seconds: float = 40.0
    bootstrap: int = 0
    seed: int = 0
    checkpoint_seconds: float = 120.0
    devices: int | None = None
    precision: str = "highest"
    dtype: str = "float32"
    stat_shards: int = 1

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in LAYER_METRICS]
        if unknown:
            raise AnalysisError(
                f"--metrics: unknown metric(s) {', '.join(unknown)}; "
                f"choose from {', '.join(LAYER_METRICS)}"
            )
        if not self.metrics:
            raise AnalysisError("--metrics: expected at least one metric")
        bad = [m for m in self.attention_methods if m not in ATTENTION_METHODS]
        if bad:
            raise AnalysisError(f"unknown attention method(s) {bad}; expected {ATTENTION_METHODS}")
        for field in ("max_utterances", "max_seconds"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise AnalysisError(f"--{field.replace('_', '-')}: expected > 0, got {value}")
        if self.batch_seconds <= 0:
            raise AnalysisError(f"--batch-seconds: expected > 0, got {self.batch_seconds}")
        if self.devices is not None and self.devices < 1:
            raise AnalysisError(f"--devices: expected >= 1, got {self.devices}")
        if self.bootstrap < 0:
            raise AnalysisError(f"--bootstrap: expected >= 0, got {self.bootstrap}")
        if self.stat_shards < 1:
            raise AnalysisError(f"--stat-shards: expected >= 1, got {self.stat_shards}")
        if self.precision not in PRECISIONS:
            raise AnalysisError(
                f"--precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.dtype not in DTYPES:
            raise AnalysisError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclasses.dataclass
class ModelEntry:
    """A model in the analysis: its name, the loaded model and the layers kept."""

    name: str
    model: SpeechModel
    normalize: bool
    layers: list[str]
    source: str
    config_hash: str

    def hidden(self, out, label: str) -> jax.Array:
        """[B, T, D] hidden state of layer ``label`` from the model's intermediates."""
        return out.final_hidden_state if label == FINAL else out.hidden_states[int(label)]


def model_name(source: str) -> str:
    """A short display name: the directory's or hub id's last component."""
    return os.path.basename(os.path.normpath(os.fspath(source))) or os.fspath(source)


def _config_hash(model: SpeechModel) -> str:
    data = json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _layers_for(model: SpeechModel, name: str, layers: Sequence[int | str] | None) -> list[str]:
    top = model.config.num_hidden_layers
    final = [FINAL] if model.config.do_stable_layer_norm else []
    if layers is None:
        return [str(i) for i in range(top + 1)] + final
    out = []
    for layer in layers:
        if str(layer) == FINAL:
            if not final:
                raise AnalysisError(
                    f"--layers: 'final' is only defined for pre-LN models; {name} is post-LN "
                    f"(its layer {top} is already the encoder output)"
                )
            out.append(FINAL)
            continue
        index = int(layer)
        if not 0 <= index <= top:
            raise AnalysisError(
                f"--layers: layer {index} is out of range for model {name} (layers 0..{top})"
            )
        out.append(str(index))
    return out


def prepare_models(
    models: Sequence[str | tuple[str, SpeechModel]], settings: Settings
) -> list[ModelEntry]:
    """Loads the models (paths, hub ids, or ``(name, SpeechModel)`` pairs)."""
    if not models:
        raise AnalysisError("expected at least one MODEL")
    entries: list[ModelEntry] = []
    names: set[str] = set()
    for item in models:
        if isinstance(item, tuple):
            name, model = item
            source, normalize = model.path or name, True
        else:
            source = os.fspath(item)
            model = load_model(source, dtype=jnp.dtype(settings.dtype))
            name = model_name(source)
            normalize = audio.feature_extractor_settings(model.path)["do_normalize"]
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        entries.append(
            ModelEntry(
                name=name,
                model=model,
                normalize=bool(normalize),
                layers=_layers_for(model, name, settings.layers),
                source=source,
                config_hash=_config_hash(model),
            )
        )
    strides = {e.name: e.model.config.frame_stride for e in entries}
    if len(set(strides.values())) > 1:
        raise AnalysisError(
            "models have different frame rates, so frames do not align: "
            + ", ".join(f"{n} ({s} samples/frame)" for n, s in strides.items())
        )
    return entries


def finetune_pairs(entries: Sequence[ModelEntry]) -> list[tuple[str, str]]:
    """(pre-trained, fine-tuned) pairs: same architecture, one with a CTC head, one without."""

    def arch(e: ModelEntry):
        c = e.model.config
        return (c.model_type, c.hidden_size, c.num_hidden_layers, c.do_stable_layer_norm)

    pairs = []
    for pre in entries:
        for ft in entries:
            if not pre.model.config.ctc_head and ft.model.config.ctc_head and arch(pre) == arch(ft):
                pairs.append((pre.name, ft.name))
    return pairs


def load_audio(
    source: Any,
    entries: Sequence[ModelEntry],
    settings: Settings,
    *,
    shard: tuple[int, int] = (0, 1),
) -> list[audio.Utterance]:
    """Loads, crops and filters the utterances; checks every model sees the same frames.

    ``shard=(p, P)`` keeps utterances p, p + P, p + 2P, … of the list (process p of P).
    """
    return load_share(source, entries, settings, shard=shard)[0]


def load_share(
    source: Any,
    entries: Sequence[ModelEntry],
    settings: Settings,
    *,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[audio.Utterance], list[int]]:
    """`load_audio`, plus each kept utterance's index in the whole list (which seeds its
    bootstrap weights, so a dropped clip changes no other clip's draws, whatever the process
    count). With several processes a share may hold no usable clip; `analyze` checks the
    total."""
    paths = audio.list_audio(source)
    if settings.max_utterances is not None:
        paths = paths[: settings.max_utterances]
    index, count = shard
    positions = range(index, len(paths), count)
    loaded = [audio.load_utterance(paths[i], max_seconds=settings.max_seconds) for i in positions]
    field = max(e.model.config.receptive_field for e in entries)
    try:
        utterances = audio.filter_short(loaded, min_samples=field)
    except audio.AudioError:
        if count == 1:
            raise
        utterances = []
    kept = {id(u) for u in utterances}
    ids = [i for i, u in zip(positions, loaded, strict=True) if id(u) in kept]
    for u in utterances:
        frames = {e.name: e.model.config.num_frames(len(u.samples)) for e in entries}
        if len(set(frames.values())) > 1:
            raise AnalysisError(
                f"{u.path}: models disagree on the number of frames ({frames}); their conv "
                f"stacks differ, so frames do not align"
            )
    return utterances, ids


@dataclasses.dataclass
class State:
    """Everything the run accumulates; what a checkpoint holds."""

    done: int
    moments: stats.Moments
    replicates: stats.Moments | None
    heads: dict[tuple[str, str, str], attn.HeadSimilarityState]
    frames: int


def _init_state(sizes, settings, entries, mesh=None) -> State:
    """Empty statistics; with ``settings.stat_shards`` > 1 in the padded layout of
    `sslsim_jax.sharded`, allocated split over ``mesh``."""
    replicates = None
    if settings.stat_shards > 1:
        layout = sharded.Layout(sizes, settings.stat_shards)
        moments = sharded.init(layout, mesh)
        if settings.bootstrap:
            replicates = sharded.init(layout, mesh, settings.bootstrap)
    else:
        moments = stats.init(sizes)
        if settings.bootstrap:
            replicates = jax.tree.map(lambda a: jnp.stack([a] * settings.bootstrap), moments)
    heads = {}
    if settings.attention:
        for i, a in enumerate(entries):
            for b in entries[i:]:
                ha = a.model.config.num_hidden_layers * a.model.config.num_attention_heads
                hb = b.model.config.num_hidden_layers * b.model.config.num_attention_heads
                for method in settings.attention_methods:
                    heads[a.name, b.name, method] = attn.init_state(ha, hb)
    return State(done=0, moments=moments, replicates=replicates, heads=heads, frames=0)


_MOMENT_FIELDS = ("count", "mean", "comoment", "row_cross", "row_gram")
_HEAD_FIELDS = ("total", "count", "skipped")


def _head_key(key: tuple[str, str, str]) -> str:
    return "heads." + "\x1f".join(key)


def _flatten_state(state: State) -> dict[str, np.ndarray]:
    arrays = {"done": np.array(state.done), "frames": np.array(state.frames)}
    for field in _MOMENT_FIELDS:
        arrays[f"moments.{field}"] = np.asarray(getattr(state.moments, field))
        if state.replicates is not None:
            arrays[f"replicates.{field}"] = np.asarray(getattr(state.replicates, field))
    for key, s in state.heads.items():
        for field in _HEAD_FIELDS:
            arrays[f"{_head_key(key)}.{field}"] = np.asarray(getattr(s, field))
    return arrays


def _place(array: np.ndarray, like: Any) -> jax.Array:
    """``array`` on the devices of ``like`` when that is split over several (sharded
    statistics: straight to their devices, never whole on one); else a default-device array."""
    if isinstance(like, jax.Array) and len(like.sharding.device_set) > 1:
        return jax.device_put(array, like.sharding)
    return jnp.asarray(array)


def _restore_state(arrays: dict[str, np.ndarray], template: State) -> State:
    def moments(prefix, like):
        if like is None:
            return None
        return dataclasses.replace(
            like, **{f: _place(arrays[f"{prefix}.{f}"], getattr(like, f)) for f in _MOMENT_FIELDS}
        )

    heads = {
        key: attn.HeadSimilarityState(
            *(jnp.asarray(arrays[f"{_head_key(key)}.{f}"]) for f in _HEAD_FIELDS)
        )
        for key in template.heads
    }
    return State(
        done=int(arrays["done"]),
        moments=moments("moments", template.moments),
        replicates=moments("replicates", template.replicates),
        heads=heads,
        frames=int(arrays["frames"]),
    )


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes via a temporary file in the same directory and ``os.replace``: never half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".partial"
    )
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_key(entries, utterances, settings) -> str:
    """Identifies a run for resumption: models, audio (paths, sizes), extraction settings.

    A finished run keeps its statistics, so the same command with other ``--metrics`` (or on
    another number of ``--devices``) skips extraction.
    """
    key = {
        "models": [(e.name, e.source, e.config_hash, e.layers, e.normalize) for e in entries],
        "audio": [(u.path, len(u.samples)) for u in utterances],
        # Metrics are computed from the statistics, so changing them reuses a finished run.
        "settings": dataclasses.asdict(settings)
        | {"checkpoint_seconds": None, "metrics": None, "devices": None},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _update(m: stats.Moments, z: jax.Array, where: jax.Array) -> stats.Moments:
    return stats.update(m, z, where=where)


def _update_replicates(m: stats.Moments, z: jax.Array, weights: jax.Array) -> stats.Moments:
    return jax.vmap(lambda mr, w: stats.update(mr, z, where=w))(m, weights)


@functools.cache
def _updaters(mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
    """The jitted statistics updates for ``mesh``: frames z [B*T, ΣD] arrive split over
    ``"data"`` and the statistics leave replicated, so XLA reduces across devices."""
    out = distributed.replicated(mesh)
    return jax.jit(_update, out_shardings=out), jax.jit(_update_replicates, out_shardings=out)


def _check_finite(entry: ModelEntry, out, mask: np.ndarray, batch_paths: Sequence[str]) -> None:
    # One device computation and one transfer for all kept layers: [layers, B, T].
    finite = jnp.stack(
        [jnp.all(jnp.isfinite(entry.hidden(out, label).astype(jnp.float32)), axis=-1)
         for label in entry.layers]
    )  # fmt: skip
    bad = ~np.asarray(finite) & mask
    if bad.any():
        layer, u, _ = np.argwhere(bad)[0]  # first layer, then first utterance
        raise AnalysisError(
            f"model {entry.name}: NaN or Inf in layer {entry.layers[layer]} for utterance "
            f"{batch_paths[u]}"
        )


def _memory_limit(device) -> tuple[int, str]:
    """(bytes, description) of the memory one device of the mesh can use."""
    stats_ = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats_ and stats_.get("bytes_limit"):
        return int(stats_["bytes_limit"]), f"{device.device_kind} {device.platform} device"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cpus = sum(d.platform == "cpu" for d in jax.local_devices())
    return ram // max(cpus, 1), "host memory per CPU device"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_memory(sizes: Sequence[int], settings: Settings, mesh) -> None:
    """Fails early, naming the settings to change, when the joint statistics cannot fit.

    Estimate per device, float32: 4·D²/S bytes per copy of the statistics (1 + bootstrap
    copies) and about 3 more copies' worth of temporaries (the batch's rows, the merge, the
    metrics' block-sized arrays); D = the statistics' width (padded when sharded).
    """
    shards = settings.stat_shards
    width = sum(sharded.Layout(tuple(sizes), shards).padded_sizes if shards > 1 else sizes)
    need = 4 * width**2 * (1 + settings.bootstrap + 3) / shards
    limit, what = _memory_limit(mesh.devices.flat[0])
    if need > limit:
        raise AnalysisError(
            f"the joint statistics of {len(sizes)} networks ({width} neurons) with "
            f"--bootstrap {settings.bootstrap} need about {_size(need)} per device, more "
            f"than the {_size(limit)} of {what}: keep fewer --layers, lower --bootstrap, "
            f"or split them over devices with --stat-shards (now {shards})"
        )


def _poisson_weights(seed: int, index: int, replicates: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).poisson(1.0, size=replicates).astype(np.float32)


def extract(
    entries: Sequence[ModelEntry],
    utterances: Sequence[audio.Utterance],
    settings: Settings,
    *,
    state_path: str | None = None,
    progress: bool = True,
    ids: Sequence[int] | None = None,
) -> State:
    """Runs every model over the audio and accumulates the statistics (resumably).

    Batches are split over ``settings.devices`` devices of this process (see the module
    docstring). ``ids``: each utterance's index in the full list, which seeds its bootstrap
    weights (default: its position in ``utterances``).
    """
    from tqdm.auto import tqdm

    ids = range(len(utterances)) if ids is None else ids
    mesh = _mesh(settings)
    multiple = distributed.batch_multiple(mesh)
    sizes = network_sizes(entries)
    if settings.stat_shards > 1:
        layout = sharded.Layout(sizes, settings.stat_shards)
        join = layout.pad
        update = functools.partial(sharded.update, mesh=mesh)
        update_replicates = functools.partial(sharded.update_replicates, mesh=mesh)
    else:
        join = functools.partial(jnp.concatenate, axis=1)
        update, update_replicates = _updaters(mesh)
    # Params placed once per run on every device of the mesh (the caller's models keep theirs).
    replicated = distributed.replicated(mesh)
    entries = [dataclasses.replace(e, model=e.model.placed(replicated)) for e in entries]
    field = max(e.model.config.receptive_field for e in entries)

    check_memory(sizes, settings, mesh)
    state = _init_state(sizes, settings, entries, mesh)
    if state_path and os.path.isfile(state_path):
        with np.load(state_path) as arrays:
            state = _restore_state(dict(arrays), state)
    lengths = [len(u.samples) for u in utterances]
    batches = audio.make_batches(
        lengths, batch_seconds=settings.batch_seconds, multiple_of=PAD_MULTIPLE, steps=PAD_STEPS
    )
    seconds = [sum(lengths[i] for i in b) / 16000 for b in batches]
    bar = tqdm(
        total=round(sum(seconds), 1),
        initial=round(sum(seconds[: state.done]), 1),
        unit="s",
        desc="extracting (audio seconds)",
        disable=not progress,
    )
    last = time.monotonic()
    for index, batch in enumerate(batches):
        if index < state.done:
            continue
        paths = [utterances[i].path for i in batch]
        # Silent dummies fill the batch to a multiple of the device count: a valid length (one
        # receptive field), weight 0 everywhere below.
        dummies = -len(batch) % multiple
        waves = [utterances[i].samples for i in batch] + [np.zeros(field, np.float32)] * dummies
        real = np.arange(len(waves)) < len(batch)  # [B]
        columns, mask, maps = [], None, {}
        for entry in entries:
            padded, lens = audio.pad(waves, multiple_of=PAD_MULTIPLE, steps=PAD_STEPS)
            if entry.normalize:
                padded = audio.normalize(padded, lens)
            out = entry.model.intermediates(
                distributed.shard_batch(padded, mesh), lens, attentions=settings.attention
            )
            frame_mask = np.asarray(out.frame_mask) & real[:, None]  # [B, T]
            _check_finite(entry, out, frame_mask, paths)
            mask = frame_mask.reshape(-1)  # [B, T] -> [B*T]; identical for every model
            for label in entry.layers:
                h = entry.hidden(out, label)
                columns.append(h.reshape(-1, h.shape[-1]))  # [B, T, D] -> [B*T, D]
            if settings.attention:
                a = out.attentions  # [L, B, H, T, T] -> [B, L*H, T, T]
                maps[entry.name] = jnp.swapaxes(a, 0, 1).reshape(
                    a.shape[1], a.shape[0] * a.shape[2], *a.shape[3:]
                )
                # Dummies get 0 frames: they add nothing to any sum, only to ``skipped``.
                frame_lengths = jnp.where(jnp.asarray(real), out.frame_lengths, 0)
        z = join(columns)  # [B*T, ΣD] (padded layout when sharded)
        state.moments = update(state.moments, z, jnp.asarray(mask))
        if state.replicates is not None:
            w = np.stack(
                [_poisson_weights(settings.seed, ids[i], settings.bootstrap) for i in batch]
            )
            w = np.pad(w, ((0, dummies), (0, 0)))  # [B, R]
            t = len(mask) // len(waves)
            frame_w = np.repeat(w, t, axis=0).T * mask  # [R, B*T]
            state.replicates = update_replicates(state.replicates, z, jnp.asarray(frame_w))
        for (a, b, method), s in state.heads.items():
            s = attn.update_state(s, maps[a], maps[b], frame_lengths, method)
            state.heads[a, b, method] = s._replace(skipped=s.skipped - dummies)
        state.frames += int(mask.sum())
        state.done = index + 1
        bar.update(round(seconds[index], 1))
        bar.set_postfix(utterances=sum(len(b) for b in batches[: index + 1]))
        now = time.monotonic()
        final = index == len(batches) - 1
        if state_path and (final or now - last >= settings.checkpoint_seconds):
            arrays = _flatten_state(_fetch(state))
            atomic_write(state_path, lambda f, a=arrays: np.savez(f, **a), mode="wb")
            last = now
    bar.close()
    return _fetch(state)


def merge_processes(state: State) -> State:
    """The statistics of every process's utterances, on every process (host arrays)."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    arrays = _flatten_state(state)
    gathered = {k: np.asarray(multihost_utils.process_allgather(v)) for k, v in arrays.items()}
    # Host memory (this process's CPU): sharded statistics need not fit on one device.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return _merge_parts(gathered, state)


def _merge_parts(gathered: dict[str, np.ndarray], state: State) -> State:
    parts = [
        _restore_state({k: v[p] for k, v in gathered.items()}, state)
        for p in range(jax.process_count())
    ]
    merged = parts[0]
    for part in parts[1:]:
        merged = State(
            done=merged.done,
            moments=stats.merge(merged.moments, part.moments),
            replicates=None
            if merged.replicates is None
            else jax.vmap(stats.merge)(merged.replicates, part.replicates),
            heads={k: attn.merge_states(s, part.heads[k]) for k, s in merged.heads.items()},
            frames=merged.frames + part.frames,
        )
    return _fetch(merged)


def _fetch(state: State) -> State:
    """The statistics as host arrays, so the metrics run once rather than on every device."""
    return dataclasses.replace(
        state,
        moments=distributed.fetch_replicated(state.moments),
        replicates=distributed.fetch_replicated(state.replicates),
        heads=distributed.fetch_replicated(state.heads),
    )


def network_sizes(entries: Sequence[ModelEntry]) -> tuple[int, ...]:
    """The width of each network (model layer) in the joint statistics, in column order."""
    return tuple(e.model.config.hidden_size for e in entries for _ in e.layers)


def network_names(entries: Sequence[ModelEntry]) -> list[str]:
    """``"model:layer"`` of each network, in column order."""
    return [f"{e.name}:{label}" for e in entries for label in e.layers]


def _mesh(settings: Settings) -> jax.sharding.Mesh:
    """This process's mesh for the run's ``devices`` and ``stat_shards``."""
    return distributed.make_mesh(settings.devices, local=True, stat_shards=settings.stat_shards)


def _pair_rows(names_a, names_b, values: np.ndarray, metric: str) -> pd.DataFrame:
    """Tidy rows (model_a, layer_a, model_b, layer_b, metric, value) of a [Ka, Kb] matrix."""
    ia, ib = np.meshgrid(np.arange(len(names_a)), np.arange(len(names_b)), indexing="ij")
    a = [names_a[i].rsplit(":", 1) for i in ia.ravel()]
    b = [names_b[i].rsplit(":", 1) for i in ib.ravel()]
    return pd.DataFrame(
        {
            "model_a": [x[0] for x in a],
            "layer_a": [x[1] for x in a],
            "model_b": [x[0] for x in b],
            "layer_b": [x[1] for x in b],
            "metric": metric,
            "value": values.ravel().astype(np.float64),
        }
    )


def pairwise_fn(entries: Sequence[ModelEntry], settings: Settings) -> Callable[..., dict]:
    """``(moments, names, metrics=..., neurons=...) -> {metric: [K, K]}`` for the statistics
    `extract` returns: `compare_moments`, or `sharded.pairwise` when they are split over
    devices (``settings.stat_shards`` > 1)."""
    if settings.stat_shards == 1:

        def full(m, names, *, metrics, neurons=False):
            from sslsim_jax.metrics import _core

            out = compare_moments(m, names, metrics=metrics)
            if neurons:
                b = _core.blocks(m)
                best, matched = _core.neuron_best(b, _core.inv_sd(b))  # [K, P, K]
                out |= {"best": best, "matched": matched, "valid": b.valid}
            return {k: np.asarray(v) for k, v in out.items()}

        return full
    layout = sharded.Layout(network_sizes(entries), settings.stat_shards)
    mesh = _mesh(settings)
    return lambda m, names, **kwargs: sharded.pairwise(m, layout, mesh, names, **kwargs)


def similarity_table(
    state: State, entries: Sequence[ModelEntry], settings: Settings, *, progress: bool = True
) -> pd.DataFrame:
    """The tidy table of every layer metric for every ordered pair of networks (with CIs)."""
    pairwise = pairwise_fn(entries, settings)
    from tqdm.auto import tqdm

    names = network_names(entries)
    bar = tqdm(
        total=1 + settings.bootstrap,
        desc=f"metrics ({len(names)} networks, {len(settings.metrics)} metrics)",
        unit="pass",
        disable=not progress,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        values = pairwise(state.moments, names, metrics=settings.metrics)
    bar.update()
    replicates = {metric: [] for metric in settings.metrics}
    for r in range(settings.bootstrap):
        m_r = jax.tree.map(lambda a, r=r: a[r], state.replicates)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once above, on the full data
            values_r = pairwise(m_r, names, metrics=settings.metrics)
        for metric in settings.metrics:
            replicates[metric].append(values_r[metric].ravel())
        bar.update()
    bar.close()
    frames = []
    for metric in settings.metrics:
        frame = _pair_rows(names, names, values[metric], metric)
        if settings.bootstrap:
            reps = np.stack(replicates[metric])  # [R, K*K]
            frame["ci_low"] = np.percentile(reps, 2.5, axis=0)
            frame["ci_high"] = np.percentile(reps, 97.5, axis=0)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def attention_tables(
    state: State, entries: Sequence[ModelEntry]
) -> tuple[list[pd.DataFrame], pd.DataFrame | None]:
    """Layer-level attention rows (metric ``attention_<method>``) and the head-level table."""
    by_name = {e.name: e for e in entries}
    layer_rows, head_rows = [], []
    for (a, b, method), s in state.heads.items():
        sim = np.asarray(attn.finalize(s))  # [La*Ha, Lb*Hb]
        for x, y, matrix in ((a, b, sim), (b, a, sim.T)) if a != b else ((a, b, sim),):
            cx, cy = by_name[x].model.config, by_name[y].model.config
            split = np.asarray(
                attn.split_layers(jnp.asarray(matrix), cx.num_hidden_layers, cy.num_hidden_layers)
            )  # [Lx, Ly, Hx, Hy]
            score, _ = attn.layer_score(jnp.asarray(split))
            # Attention of block i is labelled with layer i (its output), 1-based.
            names_x = [f"{x}:{i + 1}" for i in range(cx.num_hidden_layers)]
            names_y = [f"{y}:{i + 1}" for i in range(cy.num_hidden_layers)]
            metric = f"attention_{method}"
            layer_rows.append(_pair_rows(names_x, names_y, np.asarray(score), metric))
            lx, ly, hx, hy = split.shape
            idx = np.indices(split.shape).reshape(4, -1)
            head_rows.append(
                pd.DataFrame(
                    {
                        "model_a": x,
                        "layer_a": (idx[0] + 1).astype(str),
                        "head_a": idx[2],
                        "model_b": y,
                        "layer_b": (idx[1] + 1).astype(str),
                        "head_b": idx[3],
                        "method": method,
                        "value": split.reshape(-1).astype(np.float64),
                    }
                )
            )
    heads = pd.concat(head_rows, ignore_index=True) if head_rows else None
    return layer_rows, heads


def neuron_tables(
    state: State, entries: Sequence[ModelEntry], settings: Settings | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matched neurons of every network pair, and Wu et al.'s MaxCorr/MinCorr neuron rankings.

    The rankings of a network's neurons use the networks of the *other* models: MaxCorr ranks a
    neuron by its highest best-|r| over them, MinCorr by its lowest.
    """
    names, sizes = network_names(entries), network_sizes(entries)
    pairwise = pairwise_fn(entries, settings or Settings())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported with the similarity table
        out = pairwise(state.moments, names, metrics=("linear_cka",), neurons=True)
    best, matched, valid = out["best"], out["matched"], out["valid"]  # [K, P, K], [K, P]
    pair_rows, rank_rows = [], []
    models = np.array([n.rsplit(":", 1)[0] for n in names])
    for i, name in enumerate(names):
        d = sizes[i]
        model_a, layer_a = name.rsplit(":", 1)
        for j, other in enumerate(names):
            model_b, layer_b = other.rsplit(":", 1)
            pair_rows.append(
                pd.DataFrame(
                    {
                        "model_a": model_a,
                        "layer_a": layer_a,
                        "neuron_a": np.arange(d),
                        "model_b": model_b,
                        "layer_b": layer_b,
                        "matched_neuron_b": matched[i, :d, j],
                        "correlation": best[i, :d, j].astype(np.float64),
                    }
                )
            )
        others = np.flatnonzero(models != model_a)
        if len(others):
            mx = best[i, :d][:, others].max(axis=1)
            mn = best[i, :d][:, others].min(axis=1)
            ok = valid[i, :d]
            rank_rows.append(
                pd.DataFrame(
                    {
                        "model": model_a,
                        "layer": layer_a,
                        "neuron": np.arange(d),
                        "maxcorr": np.where(ok, mx, np.nan),
                        "mincorr": np.where(ok, mn, np.nan),
                        "maxcorr_rank": _rank(np.where(ok, -mx, np.inf)),
                        "mincorr_rank": _rank(np.where(ok, -mn, np.inf)),
                        "constant": ~ok,
                    }
                )
            )
    ranks = pd.concat(rank_rows, ignore_index=True) if rank_rows else pd.DataFrame()
    return pd.concat(pair_rows, ignore_index=True), ranks


def _rank(key: np.ndarray) -> np.ndarray:
    order = np.argsort(key, kind="stable")
    ranks = np.empty(len(key), np.int64)
    ranks[order] = np.arange(1, len(key) + 1)
    return ranks


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
    try:
        os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise AnalysisError(f"--out {out}: not writable ({e.strerror or e})") from None
    return out


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
    atomic_write(os.path.join(out, "similarities.csv"), lambda f: table.to_csv(f, index=False))
    pairs, ranks = neuron_tables(state, entries, settings)
    atomic_write(os.path.join(out, "neurons.csv"), lambda f: pairs.to_csv(f, index=False))
    atomic_write(os.path.join(out, "neuron_rankings.csv"), lambda f: ranks.to_csv(f, index=False))
    if heads is not None:
        path = os.path.join(out, "attention_heads.csv")
        atomic_write(path, lambda f: heads.to_csv(f, index=False))
    skipped = {f"{a}|{b}|{m}": int(s.skipped) for (a, b, m), s in state.heads.items()}
    run = {
        "models": [
            {
                "name": e.name,
                "path": e.source,
                "config_hash": e.config_hash,
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
    atomic_write(os.path.join(out, "run.json"), lambda f: json.dump(run, f, indent=2))
    if report:
        from sslsim_jax import report as report_module

        report_module.build_report(out)
    return table
