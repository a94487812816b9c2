"""Extraction: every model over the audio, batch by batch, into the joint statistics.

Each batch's hidden states (valid frames only, the same frames in every model) are placed side
by side and folded into one set of joint streaming statistics (`sslsim_jax.stats.Moments`);
attention maps, when asked, fold into head-pair sums (`sslsim_jax.metrics.attention`). No
activation outlives its batch.

Confidence intervals (``bootstrap > 0``): a Poisson bootstrap over utterances. Replicate r
weights every frame of utterance u by w[u, r] ~ Poisson(1), drawn from ``(seed, u)`` so the
weights do not depend on batching or resumption; each replicate keeps its own statistics.
The attention head sums and attention-map statistics are computed once per utterance and
added with the same weights to the full data's and each replicate's (stacked [1 + R, ...],
`attention_weights`).

Devices: every padded batch [B, S] is split over the ``"data"`` axis of a mesh
(`sslsim_jax.distributed`), B rounded up to a size of a small set that is a multiple of the
device count (`inputs.padded_batch`) with silent utterances that have a valid length but
weight 0 (they enter no statistic, attention sum, frame
count or NaN check); the jitted statistics update reduces across devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax import audio, distributed, host_stats, memory, sharded, stats
from sslsim_jax.analysis import plan as plan_lib
from sslsim_jax.analysis import state as state_lib
from sslsim_jax.analysis.inputs import (
    PAD_MULTIPLE,
    PAD_STEPS,
    batch_shape,
    padded_batch,
    plan_batches,
    poisson_weights,
    prefetch,
)
from sslsim_jax.analysis.networks import ModelEntry, network_sizes
from sslsim_jax.analysis.plan import statistics_bytes
from sslsim_jax.analysis.settings import AnalysisError, Settings
from sslsim_jax.analysis.state import State
from sslsim_jax.metrics import attention as attn
from sslsim_jax.metrics import attention_maps


def run_mesh(settings: Settings) -> jax.sharding.Mesh:
    """This process's mesh for the run's ``devices`` and ``stat_shards``."""
    return distributed.make_mesh(settings.devices, local=True, stat_shards=settings.stat_shards)


# While streaming, the co-moments hold their upper blocks only (`stats.update` with
# ``upper=True``); `_mirror` makes them whole once, when the loop is done.
def _update(m: stats.Moments, z: jax.Array, where: jax.Array) -> stats.Moments:
    return stats.update(m, z, where=where, upper=True)


def _host_update(m: stats.Moments, z: jax.Array, where: jax.Array) -> stats.Moments:
    return host_stats.update(m, z, where=where)


def _update_replicates(m: stats.Moments, z: jax.Array, weights: jax.Array) -> stats.Moments:
    # A chunk of replicates at a time: temporaries [chunk, N, D], not [R, N, D].
    return stats.update_replicates(m, z, weights, upper=True)


@functools.cache
def _updaters(mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
    """The jitted statistics updates for ``mesh``: frames z [B*T, ΣD] arrive split over
    ``"data"`` and the statistics leave replicated, so XLA reduces across devices. The
    statistics are donated: the co-moment is updated in its own buffer, not copied."""
    out = distributed.replicated(mesh)
    return tuple(
        jax.jit(f, out_shardings=out, donate_argnums=0) for f in (_update, _update_replicates)
    )


def attention_weights(w: np.ndarray) -> np.ndarray:
    """[1 + R, B] int32 weights of a batch's utterances in the stacked head states: 1 for the
    full data, then each utterance's R bootstrap draws ``w`` [B, R]."""
    return np.concatenate([np.ones((1, w.shape[0]), np.int32), w.T.astype(np.int32)])


@functools.cache
def _mirror(mesh: jax.sharding.Mesh) -> Callable:
    """`stats.mirror_upper`, jitted for ``mesh`` (statistics donated, left replicated)."""
    return jax.jit(stats.mirror_upper, out_shardings=distributed.replicated(mesh), donate_argnums=0)


def _update_heads(
    s: attn.HeadSimilarityState,
    maps_a: jax.Array,
    maps_b: jax.Array,
    lengths: jax.Array,
    dummies: int,
    weights: jax.Array | None,
    method: str,
) -> attn.HeadSimilarityState:
    """One batch added to a head pair's sums: the full data, or with ``weights`` [1 + R, B]
    the full data and its replicates from one computation (`attention_weights`); the
    ``dummies`` padding the batch are skipped utterances that are not counted."""
    s = attn.add_utterances(s, attn.utterance_sums(maps_a, maps_b, lengths, method), weights)
    return s._replace(skipped=s.skipped - dummies)


@functools.cache
def _head_updater(mesh: jax.sharding.Mesh) -> Callable:
    """`_update_heads` as one jitted program (sums left replicated): one cross-device
    reduction per head pair and batch, not one per array (`distributed.settle`)."""
    return jax.jit(
        _update_heads, static_argnames="method", out_shardings=distributed.replicated(mesh)
    )


@functools.cache
def _map_updater(mesh: jax.sharding.Mesh) -> Callable:
    """The jitted update of the attention-map statistics (`attention_maps.update`)."""
    return jax.jit(attention_maps.update, out_shardings=distributed.replicated(mesh))


@functools.cache
def _weighted_map_updater(mesh: jax.sharding.Mesh) -> Callable:
    """`attention_maps.update_weighted`, jitted like `_map_updater`."""
    return jax.jit(attention_maps.update_weighted, out_shardings=distributed.replicated(mesh))


def _bad_frames(entry: ModelEntry, out, mask: jax.Array) -> jax.Array:
    """[layers, B] device flags: a valid frame of the utterance holds NaN or Inf in that kept
    layer. Computed where the activations are; read later (`_raise_if_bad`), not per model."""
    bad = jnp.stack(
        [jnp.any(~jnp.isfinite(entry.hidden(out, label).astype(jnp.float32)), axis=-1)
         for label in entry.layers]
    )  # fmt: skip
    return jnp.any(bad & mask, axis=-1)


def _host_layers(entry: ModelEntry, out) -> list[np.ndarray]:
    """The kept layers of ``out`` as NumPy views [B*T, D] of the CPU buffers: on the host path
    no small XLA program is compiled per batch shape to slice, check or join them."""
    host = dataclasses.replace(  # waits for the forward pass; views, no copies
        out,
        hidden_states=np.asarray(out.hidden_states),
        final_hidden_state=np.asarray(out.final_hidden_state),
    )
    layers = [entry.hidden(host, label) for label in entry.layers]
    return [h.reshape(-1, h.shape[-1]) for h in layers]


def _host_bad_frames(columns: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """[layers, B] flags of `_bad_frames` from the NumPy layers of `_host_layers` and the
    [B, T] frame mask."""
    bad = np.stack([~np.isfinite(h).all(axis=-1).reshape(mask.shape) for h in columns])
    return (bad & mask).any(axis=-1)


def _raise_if_bad(pending: list[tuple[ModelEntry, jax.Array, Sequence[str]]]) -> None:
    """Reads the NaN/Inf flags of the batches folded since the last check (in batch, then model
    order) and names the first model, layer and utterance with one; empties ``pending``."""
    checks, pending[:] = list(pending), []
    for entry, flags, paths in checks:
        bad = np.asarray(flags)
        if bad.any():
            layer, u = np.argwhere(bad)[0]  # first layer, then first utterance
            raise AnalysisError(
                f"model {entry.name}: NaN or Inf in layer {entry.layers[layer]} for utterance "
                f"{paths[u]}"
            )


def host_frame_mask(entry: ModelEntry, samples: int, lens: np.ndarray, real: np.ndarray):
    """[B, T] valid frames of a padded batch of ``samples`` samples from the lengths alone
    (`ModelConfig.frame_lengths`, the model's own formula); False on dummy utterances."""
    config = entry.model.config
    frames = config.frame_lengths(np.asarray(lens))
    return (np.arange(config.num_frames(samples))[None] < frames[:, None]) & real[:, None]


# Batches folded between two reads of the NaN/Inf flags (and at every checkpoint and the end).
CHECK_EVERY = 8


def check_memory(sizes: Sequence[int], settings: Settings, mesh) -> None:
    """Fails early, naming the settings to change, when the joint statistics cannot fit.

    Estimate per device, float32: 4·D²/S bytes per copy of the statistics (1 + bootstrap
    copies) and about 3 more copies' worth of temporaries (the batch's rows, the merge, the
    metrics' block-sized arrays); D = the statistics' width (padded when sharded).
    """
    shards = settings.stat_shards
    width = sum(sharded.Layout(tuple(sizes), shards).padded_sizes if shards > 1 else sizes)
    need = statistics_bytes(width, bootstrap=settings.bootstrap, shards=shards)
    limit, what = plan_lib.memory_limit(mesh.devices.flat[0])
    if need > limit:
        raise AnalysisError(
            f"the joint statistics of {len(sizes)} networks ({width} neurons) with "
            f"--bootstrap {settings.bootstrap} need about {memory.format_bytes(need)} per device, "
            f"more than the {memory.format_bytes(limit)} of {what}: keep fewer --layers, lower "
            f"--bootstrap, or split them over devices with --stat-shards (now {shards})"
        )


def check_forward(entries, lengths, batches, settings: Settings, mesh) -> None:
    """Before the first batch: each padded batch shape must fit one forward pass of each model
    (with attention maps when asked: L·H·T² floats per utterance), else a one-line error that
    names ``max_seconds`` (`sslsim_jax.memory.check_forward_memory`)."""
    limit, what = memory.device_memory(mesh.devices.flat[0])
    devices = distributed.batch_multiple(mesh)
    shapes = {batch_shape(b, lengths, devices) for b in batches}
    for batch, samples in sorted(shapes, key=lambda bs: bs[0] * bs[1] ** 2, reverse=True)[:3]:
        try:
            memory.check_forward_memory(
                {e.name: e.model.config for e in entries},
                samples,
                max(batch // devices, 1),
                attentions=settings.attention,
                limit_bytes=limit,
                limit_description=what,
            )
        except ValueError as e:
            raise AnalysisError(str(e), argument="max_seconds") from None


def rbf_plan(
    entries: Sequence[ModelEntry], lengths: Sequence[int], settings: Settings
) -> list[np.ndarray]:
    """rbf_cka's frame subsample: for each utterance, the frames (indices t) kept.

    ``settings.rbf_frames`` frames are drawn without replacement, uniformly over all valid
    frames of the run, from ``seed``; fixed before the first batch, so a resumed run keeps the
    same frames. ``lengths``: every utterance of the run in list order, all processes' shares
    included (`run_lengths`), so each process draws the same frames as one process would.
    """
    frames = [entries[0].model.config.num_frames(n) for n in lengths]
    offsets = np.cumsum([0, *frames])
    total = int(offsets[-1])
    if total < settings.rbf_frames:
        raise AnalysisError(
            f"expected at most the run's {total} frames, got {settings.rbf_frames}",
            argument="rbf_frames",
        )
    rng = np.random.default_rng([settings.seed, 0x5BF])
    picked = np.sort(rng.choice(total, settings.rbf_frames, replace=False))
    return [
        picked[(picked >= lo) & (picked < hi)] - lo
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def run_lengths(utterances: Sequence[Any], ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids, samples) of every utterance of the run, in list order, from every process's
    share (one small all-gather); this process's own in a one-process run."""
    mine = [[int(i), int(u.num_samples)] for i, u in zip(ids, utterances, strict=True)]
    every = sorted(pair for part in distributed.allgather_json(mine) for pair in part)
    return [i for i, _ in every], [n for _, n in every]


def extract(
    entries: Sequence[ModelEntry],
    utterances: Sequence[audio.Clip | audio.Utterance],
    settings: Settings,
    *,
    state_path: str | None = None,
    progress: bool = True,
    ids: Sequence[int] | None = None,
    attention_pairs: set[tuple[str, str]] | None = None,
    finished: Callable[[State], None] | None = None,
) -> State:
    """Runs every model over the audio and accumulates the statistics (resumably).

    Batches are split over ``settings.devices`` devices of this process (see the module
    docstring). ``ids``: each utterance's index in the full list, which seeds its bootstrap
    weights (default: its position in ``utterances``). ``attention_pairs``: the model pairs
    whose attention heads are compared (default: all; see `state.init_state`).
    ``finished``: called with the final statistics (host arrays) when batches ran, instead of
    writing the last checkpoint here (`analyze` writes it while the metrics run).
    """
    from tqdm.auto import tqdm

    ids = range(len(utterances)) if ids is None else ids
    mesh = run_mesh(settings)
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
    # On one CPU device the co-moment is a NumPy array whose Gram BLAS adds in place
    # (`sslsim_jax.host_stats`: twice as fast as XLA's matmuls there).
    on_host = settings.stat_shards == 1 and host_stats.applies(mesh, np.float32)
    state = state_lib.init_state(sizes, settings, entries, mesh, attention_pairs, host=on_host)
    if state_path:
        state = state_lib.load_checkpoint(state_path, state)
    if on_host:  # host arrays from `init_state` or the checkpoint (`state._place`)
        update = _host_update
    elif settings.stat_shards == 1:  # where the donating updates leave them
        state.moments = jax.device_put(state.moments, replicated)
    if settings.stat_shards == 1:
        state.replicates = jax.device_put(state.replicates, replicated)
    start = state.done
    lengths = [u.num_samples for u in utterances]
    batches = plan_batches(lengths, settings)
    seconds = [sum(lengths[i] for i in b) / 16000 for b in batches]
    chosen = None
    if state.rbf is not None:  # this share's frames of the run's subsample
        every_id, every_length = run_lengths(utterances, ids)
        drawn = dict(zip(every_id, rbf_plan(entries, every_length, settings), strict=True))
        chosen = [drawn[i] for i in ids]
    check_forward(entries, lengths, batches, settings, mesh)
    bar = tqdm(
        total=round(sum(seconds), 1),
        initial=round(sum(seconds[: state.done]), 1),
        unit="s",
        desc="extracting (audio seconds)",
        disable=not progress,
    )
    last = time.monotonic()
    pending = []  # (entry, device NaN/Inf flags [layers, B], batch paths) not read yet
    # Each collective program settles before the next in a multi-process CPU run.
    settle = distributed.settle
    # Decoding runs a couple of batches ahead on a thread; closed however the loop ends.
    with contextlib.closing(prefetch(batches, utterances, start=state.done)) as decoded:
        for index, batch in enumerate(batches):
            if index < state.done:
                continue
            samples = next(decoded)
            paths = [utterances[i].path for i in batch]
            # Silent dummies fill the batch to its compiled size (`inputs.padded_batch`, a
            # multiple of the device count): a valid length (one receptive field), weight 0
            # everywhere below.
            dummies = padded_batch(len(batch), multiple) - len(batch)
            waves = samples + [np.zeros(field, np.float32)] * dummies
            real = np.arange(len(waves)) < len(batch)  # [B]
            columns, mask, maps = [], None, {}
            raw, lens = audio.pad(waves, multiple_of=PAD_MULTIPLE, steps=PAD_STEPS)
            for entry in entries:
                padded = audio.normalize(raw, lens) if entry.normalize else raw
                out = entry.model.intermediates(
                    distributed.shard_batch(padded, mesh),
                    lens,
                    attentions=settings.attention,
                    logits=False,  # models of one layout share the compiled encoder
                )
                frame_mask = host_frame_mask(entry, raw.shape[1], lens, real)  # [B, T]
                mask = frame_mask.reshape(-1)  # [B, T] -> [B*T]; identical for every model
                if on_host:  # NumPy views of the CPU buffers, for NumPy statistics
                    layers = _host_layers(entry, out)
                    pending.append((entry, _host_bad_frames(layers, frame_mask), paths))
                    columns += layers
                else:
                    # No host sync per model: the mask comes from the lengths, the NaN/Inf
                    # flags stay on the device until `_raise_if_bad` reads them.
                    flags = _bad_frames(entry, out, jnp.asarray(frame_mask))
                    pending.append((entry, flags, paths))
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
            if chosen is not None:
                t = len(mask) // len(waves)
                rows = np.concatenate([chosen[i] + b * t for b, i in enumerate(batch)])
                picked = np.concatenate([np.asarray(c[rows]) for c in columns], axis=1)
                state.rbf[state.rbf_filled : state.rbf_filled + len(rows)] = picked
                state.rbf_filled += len(rows)
            # [B*T, ΣD] (padded layout when sharded)
            z = np.concatenate(columns, axis=1) if on_host else join(columns)
            state.moments = settle(update(state.moments, z, jnp.asarray(mask)))
            w = None  # [B, R] each utterance's bootstrap weights
            if settings.bootstrap:
                w = np.stack(
                    [poisson_weights(settings.seed, ids[i], settings.bootstrap) for i in batch]
                )
                w = np.pad(w, ((0, dummies), (0, 0)))  # [B, R]
            if state.replicates is not None:
                t = len(mask) // len(waves)
                frame_w = np.repeat(w, t, axis=0).T * mask  # [R, B*T]
                state.replicates = settle(
                    update_replicates(state.replicates, z, jnp.asarray(frame_w))
                )
            stacked_w = None if w is None else attention_weights(w)  # [1 + R, B]
            for (a, b, method), s in state.heads.items():
                state.heads[a, b, method] = settle(
                    _head_updater(mesh)(
                        s, maps[a], maps[b], frame_lengths, dummies, stacked_w, method=method
                    )
                )
            if state.attention_maps is not None:
                batch_maps = [maps[e.name] for e in entries]
                if w is None:
                    state.attention_maps = _map_updater(mesh)(
                        state.attention_maps, batch_maps, frame_lengths
                    )
                else:  # stacked like the head sums: the full data, then the replicates
                    state.attention_maps = _weighted_map_updater(mesh)(
                        state.attention_maps, batch_maps, frame_lengths, stacked_w
                    )
                settle(state.attention_maps)
            # One sync per batch: bounds the work queued ahead, and a failed device allocation
            # raises here (reading an output buffer first would wait for it forever, XLA CPU).
            jax.block_until_ready(state.moments)
            state.frames += int(mask.sum())
            state.done = index + 1
            bar.update(round(seconds[index], 1))
            bar.set_postfix(utterances=sum(len(b) for b in batches[: index + 1]))
            now = time.monotonic()
            last_batch = index == len(batches) - 1
            final = last_batch and finished is None
            save = state_path and (final or now - last >= settings.checkpoint_seconds)
            if save or last_batch or len(pending) >= CHECK_EVERY * len(entries):
                _raise_if_bad(pending)  # before a checkpoint: it never holds NaN statistics
            if save:
                state_lib.save_checkpoint(state_path, state)
                last = now
    bar.close()
    ran = state.done > start
    if on_host:
        state.moments = host_stats.mirror_upper(state.moments)
    elif settings.stat_shards == 1:  # upper blocks (streamed or from a checkpoint) made whole
        state.moments = _mirror(mesh)(state.moments)
    if settings.stat_shards == 1 and state.replicates is not None:
        state.replicates = _mirror(mesh)(state.replicates)
    state = state_lib.fetch(state)
    if ran and finished is not None:
        finished(state)
    return state
