"""What an analysis accumulates (`State`), its checkpoints, its run key and the process merge.

Resumable: the statistics are checkpointed (atomically, fsynced) under ``OUT/.sslsim_state/``,
keyed by `run_key` (models by weights digest, audio by path, size and modification time, and
the settings that change the statistics); a run started again with the same arguments
continues after the last checkpointed batch and gives the same table as an uninterrupted run
(batches are deterministic and merged in the same order). A checkpoint that cannot be read is
reported by name and that run starts again from its first batch. Statistics split over devices
(``stat_shards`` > 1) stay split and are checkpointed shard by shard: with orbax in one
process, as one ``.npy`` per device piece in a run of several (`_save_pieces`).

Processes (after `sslsim_jax.distributed.initialize`): the statistics of all processes are
merged by a collective on the mesh of every process's devices (`merge_processes`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sslsim_jax import distributed, host_stats, results, sharded, stats
from sslsim_jax.analysis.networks import ModelEntry
from sslsim_jax.analysis.settings import Settings
from sslsim_jax.metrics import attention as attn
from sslsim_jax.metrics import attention_maps, registry

STATE_DIR = ".sslsim_state"


@dataclasses.dataclass
class State:
    """Everything the run accumulates; what a checkpoint holds."""

    done: int
    moments: stats.Moments
    replicates: stats.Moments | None
    heads: dict[tuple[str, str, str], attn.HeadSimilarityState]
    frames: int
    attention_maps: stats.Moments | None = None
    # rbf_cka: the subsampled frames of every network side by side [N, ΣD] (host memory) and
    # how many rows are filled so far.
    rbf: np.ndarray | None = None
    rbf_filled: int = 0


def init_state(sizes, settings, entries, mesh=None, attention_pairs=None, *, host=False) -> State:
    """Empty statistics; with ``settings.stat_shards`` > 1 in the padded layout of
    `sslsim_jax.sharded`, allocated split over ``mesh``; with ``host``, the joint statistics
    as NumPy arrays for `sslsim_jax.host_stats` (checkpoints then load as NumPy arrays too).

    ``attention_pairs``: the (model, model) pairs whose attention heads this state compares
    (default: every pair of ``entries``; a pass of a multi-pass run compares only its own).
    """
    replicates = None
    if settings.stat_shards > 1:
        layout = sharded.Layout(sizes, settings.stat_shards)
        moments = sharded.init(layout, mesh)
        if settings.bootstrap:
            replicates = sharded.init(layout, mesh, settings.bootstrap)
    else:
        moments = host_stats.init(sizes) if host else stats.init(sizes)
        if settings.bootstrap:
            replicates = jax.tree.map(lambda a: jnp.stack([a] * settings.bootstrap), moments)
    # Attention statistics with --bootstrap: the full data and its R replicates, stacked
    # [1 + R, ...] (`extract.attention_weights`).
    stack = 1 + settings.bootstrap if settings.bootstrap else None
    heads = {}
    if settings.attention:
        for i, a in enumerate(entries):
            for b in entries[i:]:
                if attention_pairs is not None and (a.name, b.name) not in attention_pairs:
                    continue
                ha = a.model.config.num_hidden_layers * a.model.config.num_attention_heads
                hb = b.model.config.num_hidden_layers * b.model.config.num_attention_heads
                for method in settings.attention_methods:
                    if method in registry.HEAD_METHODS:
                        heads[a.name, b.name, method] = attn.init_state(ha, hb, replicates=stack)
    maps = None
    if settings.attention and set(settings.attention_methods) & set(registry.MAP_METHODS):
        maps = attention_maps.init(
            [e.model.config.num_hidden_layers for e in entries],
            [e.model.config.num_attention_heads for e in entries],
            replicates=stack,
        )
    rbf = None
    if "rbf_cka" in settings.metrics:
        # [frames, ΣD]: 2.4 GB for the paper's grid; memory the kernel fills as rows arrive
        rbf = host_stats.mapped_zeros((settings.rbf_frames, sum(sizes)), np.float32)
    return State(
        done=0,
        moments=moments,
        replicates=replicates,
        heads=heads,
        frames=0,
        attention_maps=maps,
        rbf=rbf,
    )


_MOMENT_FIELDS = ("count", "mean", "comoment", "row_cross", "row_gram")
# The State fields that hold `stats.Moments` (or None).
_MOMENTS = ("moments", "replicates", "attention_maps")


_HEAD_FIELDS = ("total", "count", "skipped")


def _head_key(key: tuple[str, str, str]) -> str:
    return "heads." + "\x1f".join(key)


def flatten(state: State) -> dict[str, np.ndarray]:
    """The state as named host arrays (what a ``.npz`` checkpoint holds)."""
    return {k: np.asarray(v) for k, v in _arrays(state).items()}


def _place(array: np.ndarray, like: Any) -> jax.Array:
    """``array`` on the devices of ``like`` when that is split over several (sharded
    statistics: straight to their devices, never whole on one); else a default-device array.
    An array of a piece folder (`_OnDisk`) is read piece by piece onto ``like``'s devices."""
    if isinstance(like, np.ndarray):  # host statistics (`init_state(host=True)`) stay on the host
        return host_stats.host_array(array, like.dtype)
    if isinstance(array, _OnDisk):
        if not is_split(like):
            raise ValueError(f"{array.name} is split in the checkpoint, not in this run")
        return array.place(like.sharding)
    if isinstance(like, jax.Array) and len(like.sharding.device_set) > 1:
        return jax.device_put(array, like.sharding)
    return jnp.asarray(array)


def _checked(arrays: dict[str, np.ndarray], key: str, like: Any) -> np.ndarray:
    array = arrays[key]
    if np.shape(array) != np.shape(like):
        raise ValueError(f"{key} has shape {np.shape(array)}, expected {np.shape(like)}")
    return array


def restore(arrays: dict[str, np.ndarray], template: State) -> State:
    """The `State` of ``flatten``'s arrays, laid out like ``template`` (shapes checked)."""

    def moments(prefix, like):
        if like is None:
            return None
        return dataclasses.replace(
            like,
            **{
                f: _place(_checked(arrays, f"{prefix}.{f}", getattr(like, f)), getattr(like, f))
                for f in _MOMENT_FIELDS
            },
        )

    heads = {
        key: attn.HeadSimilarityState(
            *(
                jnp.asarray(_checked(arrays, f"{_head_key(key)}.{f}", getattr(s, f)))
                for f in _HEAD_FIELDS
            )
        )
        for key, s in template.heads.items()
    }
    return State(
        done=int(arrays["done"]),
        heads=heads,
        frames=int(arrays["frames"]),
        rbf=None if template.rbf is None else _checked(arrays, "rbf", template.rbf),
        rbf_filled=int(arrays["rbf_filled"]) if template.rbf is not None else 0,
        **{prefix: moments(prefix, getattr(template, prefix)) for prefix in _MOMENTS},
    )


def run_key(entries: Sequence[ModelEntry], utterances, settings: Settings) -> str:
    """Identifies a run's statistics for resumption.

    Models by name, layers, input normalisation and *weights digest* (so weights changed in
    place never reuse old statistics); audio by path, size and modification time of the file
    and the samples kept; the settings that change the statistics. A finished run keeps its
    statistics, so the same command with other ``--metrics`` (or on another number of
    ``--devices``) skips extraction.
    """
    key = {
        "models": [
            (e.name, e.config_hash, e.weights_digest, e.layers, e.normalize) for e in entries
        ],
        "audio": [(u.path, u.identity(), u.num_samples) for u in utterances],
        "settings": settings.extraction_key(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and was set aside; that run starts again."""


def save_checkpoint(path: str, state: State) -> None:
    """Writes ``state`` to ``path`` atomically, fsynced before the rename.

    Statistics split over devices (``stat_shards`` > 1) are written with orbax instead, each
    device's rows apart, into the directory `split_path` (``path`` stays absent): no host
    assembles the whole matrix. In multi-process runs orbax writes only arrays that span every
    process, while each process checkpoints its own share on its own schedule: there each
    process writes its devices' pieces, one ``.npy`` each, into `pieces_path` (`_save_pieces`).
    """
    state = fetch(state)
    if _orbax(state):
        _save_split(split_path(path), state)
        return
    if _pieces(state):
        _save_pieces(pieces_path(path), state)
        return
    arrays = flatten(state)
    results.atomic_write(path, lambda f: results.savez(f, arrays), binary=True, direct=True)


def _orbax(state: State) -> bool:
    """Whether ``state``'s checkpoints are orbax folders (see `save_checkpoint`)."""
    return jax.process_count() == 1 and is_split(state.moments.comoment)


def _pieces(state: State) -> bool:
    """Whether ``state``'s checkpoints are piece folders (`_save_pieces`)."""
    return jax.process_count() > 1 and is_split(state.moments.comoment)


def pieces_path(path: str) -> str:
    """The piece folder of the checkpoint ``path`` (``KEY.npz`` -> ``KEY.pieces``) of split
    statistics in a multi-process run."""
    return path.removesuffix(".npz") + ".pieces"


def _save_pieces(directory: str, state: State) -> None:
    """Writes this process's checkpoint of split statistics without assembling them: each
    distinct device piece of a split array goes to its own ``.npy`` (one piece in host memory
    at a time), the small arrays to ``rest.npz``, and ``manifest.json`` says which piece holds
    which index range. A step folder named by the batches done is written under a temporary
    name and renamed when whole (then older steps are removed), so a killed write leaves the
    previous checkpoint intact."""
    step = os.path.join(directory, str(state.done))
    if os.path.isdir(step):
        return  # this batch count is already written (the same statistics)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix=f".{state.done}.", suffix=".partial")
    manifest, rest = {}, {}
    for name, x in _arrays(state).items():
        if not is_split(x):
            rest[name] = np.asarray(x)
            continue
        pieces = []
        for shard in x.addressable_shards:
            if shard.replica_id:  # the same rows on another "data" device
                continue
            file = f"{name}.{len(pieces)}.npy"
            piece = np.asarray(shard.data)
            results.atomic_write(
                os.path.join(tmp, file),
                lambda f, a=piece: results.write_npy(f, a),
                binary=True,
                direct=True,
            )
            pieces.append({"file": file, "index": _index_ranges(shard.index, x.shape)})
        manifest[name] = {"shape": list(x.shape), "dtype": str(x.dtype), "pieces": pieces}
    results.atomic_write(
        os.path.join(tmp, "rest.npz"), lambda f: results.savez(f, rest), binary=True
    )
    results.write_json(tmp, "manifest.json", manifest)
    os.replace(tmp, step)
    _fsync_directory(directory)
    for old in os.listdir(directory):  # older steps, and writes killed before their rename
        if (old.isdigit() and int(old) != state.done) or old.endswith(".partial"):
            shutil.rmtree(os.path.join(directory, old), ignore_errors=True)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _index_ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """A device piece's index (slices) as [[start, stop], ...] over every axis of ``shape``."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


class _OnDisk:
    """A split array of a piece folder, read piece by piece as it is placed (`_place`)."""

    def __init__(self, directory: str, name: str, entry: dict) -> None:
        self.shape = tuple(entry["shape"])
        self.dtype = np.dtype(entry["dtype"])
        self.name = name
        self._files = {
            tuple(map(tuple, p["index"])): os.path.join(directory, p["file"])
            for p in entry["pieces"]
        }

    def place(self, sharding: jax.sharding.Sharding) -> jax.Array:
        def piece(index):
            key = tuple(map(tuple, _index_ranges(index, self.shape)))
            if key not in self._files:
                raise ValueError(f"{self.name}: no piece {list(key)} in the checkpoint")
            data = np.load(self._files[key], mmap_mode="r")
            want = tuple(b - a for a, b in key)
            if data.shape != want or data.dtype != self.dtype:
                raise ValueError(f"{self.name}: piece {list(key)} is {data.shape} {data.dtype}")
            return data

        return jax.make_array_from_callback(self.shape, sharding, piece)


def _load_pieces(directory: str, template: State) -> State:
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    if not steps:
        return template
    step = os.path.join(directory, str(max(steps)))
    with open(os.path.join(step, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with np.load(os.path.join(step, "rest.npz")) as saved:
        arrays: dict[str, Any] = {k: saved[k] for k in saved.files}
    arrays |= {name: _OnDisk(step, name, entry) for name, entry in manifest.items()}
    return restore(arrays, template)


def split_path(path: str) -> str:
    """The orbax directory of the checkpoint ``path`` (``KEY.npz`` -> ``KEY.orbax``) when the
    statistics are split over devices."""
    return path.removesuffix(".npz") + ".orbax"


def _arrays(state: State) -> dict[str, Any]:
    """`flatten`'s names, arrays left where they are (device arrays stay on their devices)."""
    arrays: dict[str, Any] = {"done": np.array(state.done), "frames": np.array(state.frames)}
    if state.rbf is not None:
        arrays["rbf"], arrays["rbf_filled"] = state.rbf, np.array(state.rbf_filled)
    for prefix in _MOMENTS:
        m = getattr(state, prefix)
        if m is not None:
            for field in _MOMENT_FIELDS:
                arrays[f"{prefix}.{field}"] = getattr(m, field)
    for key, s in state.heads.items():
        for field in _HEAD_FIELDS:
            arrays[f"{_head_key(key)}.{field}"] = getattr(s, field)
    return arrays


def _manager(directory: str):
    """An orbax manager of one process's checkpoints (the last one kept): steps are batches
    done; each write goes to a new step directory, finalised by a rename, so a killed write
    leaves the previous checkpoint intact."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    os.makedirs(directory, exist_ok=True)  # orbax creates no root for one active process
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        enable_async_checkpointing=False,
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"sslsim-{me}"
        ),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save_split(directory: str, state: State) -> None:
    import orbax.checkpoint as ocp

    with _manager(directory) as manager:
        if manager.latest_step() == state.done:
            return  # this batch count is already written (the same statistics)
        manager.save(state.done, args=ocp.args.StandardSave(_arrays(state)))
        manager.wait_until_finished()


def _load_split(directory: str, template: State) -> State:
    import orbax.checkpoint as ocp

    def abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)

    target = {}
    for key, x in _arrays(template).items():
        target[key] = abstract(x)
    with _manager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            return template
        loaded = manager.restore(step, args=ocp.args.StandardRestore(target))
    return restore(loaded, template)


class CheckpointSaver:
    """Writes checkpoints on a background thread, one at a time (`save_checkpoint`).

    ``with CheckpointSaver() as saver: saver.save(path, state)`` returns at once; `wait` (and
    leaving the block) waits for the write and raises its error, if any. Used for the last
    checkpoint of a pass, which the metrics need not wait for.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sslsim-save")
        self._pending: concurrent.futures.Future | None = None

    def save(self, path: str, state: State) -> None:
        self.wait()
        self._pending = self._pool.submit(save_checkpoint, path, state)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _allocate(shape, dtype) -> np.ndarray:
    """Memory for a checkpoint's array: a large one in `host_stats.mapped_zeros` (where host
    statistics stay, `_place`, without another copy)."""
    if math.prod(shape) * np.dtype(dtype).itemsize >= 1 << 24:
        return host_stats.mapped_zeros(shape, dtype)
    return np.empty(shape, dtype)


def load_checkpoint(path: str, template: State) -> State:
    """The checkpointed state at ``path``, or ``template`` when there is none.

    A file that cannot be read (truncated, empty, from another layout) is renamed to
    ``path + ".bad"`` with a warning that names it, and the run starts from ``template``:
    a damaged checkpoint never blocks later runs and is never half used.
    """
    split, pieces = _orbax(template), _pieces(template)
    if split or pieces:
        path = split_path(path) if split else pieces_path(path)
        if not os.path.isdir(path):
            return template
    elif not os.path.isfile(path):
        return template
    try:
        if split:
            state = _load_split(path, template)
        elif pieces:
            state = _load_pieces(path, template)
        else:
            state = restore(results.read_npz(path, allocate=_allocate), template)
    except Exception as e:  # zipfile, pickle, orbax, shape and key errors alike: the file is bad
        bad = path + ".bad"
        if os.path.isdir(bad):
            shutil.rmtree(bad)
        os.replace(path, bad)
        warnings.warn(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); moved to {bad}, "
            "starting that part again",
            CheckpointWarning,
            stacklevel=2,
        )
        return template
    return state


def merge_processes(state: State, settings: Settings) -> State:
    """The statistics of every process's utterances, on every process.

    A collective on the mesh of all processes' devices (`stats.psum` over ``"data"``, after
    each process re-centres its accumulators on the global mean): no process gathers the
    others' statistics. Unsplit statistics come back as host arrays; statistics split over
    ``"stats"`` (``stat_shards`` > 1) stay split over this process's devices, so no host ever
    holds the whole co-moment.
    """
    if jax.process_count() == 1:
        return state
    local = distributed.make_mesh(settings.devices, local=True, stat_shards=settings.stat_shards)
    world = distributed.make_mesh(settings.devices, stat_shards=settings.stat_shards)
    specs = _merge_specs(state, settings)
    rbf, filled = None, 0
    if state.rbf is not None:  # rbf_cka's frame subsample: each process's rows, one after another
        counts = distributed.allgather_json(int(state.rbf_filled))
        start, filled = sum(counts[: jax.process_index()]), sum(counts)
        rbf = host_stats.mapped_zeros(state.rbf.shape, state.rbf.dtype)
        rbf[start : start + state.rbf_filled] = state.rbf[: state.rbf_filled]
    parts = (state.moments, state.replicates, state.heads, state.attention_maps, rbf)
    on_world = jax.tree.map(lambda x, spec: _to_world(x, spec, local, world), parts, specs)
    # One contributor per process: the other "data" rows of a process hold copies of its
    # statistics.
    rows = world.shape[distributed.DATA] // jax.process_count()
    first = np.asarray([i % rows == 0 for i in range(world.shape[distributed.DATA])])
    first = jax.make_array_from_callback(
        first.shape, NamedSharding(world, PartitionSpec(distributed.DATA)), lambda i: first[i]
    )
    merged = _merger(world, specs, stacked_maps(state))(first, *on_world)
    moments, replicates, heads, maps, rbf = jax.tree.map(
        lambda x, spec: _to_local(x, spec, local), merged, specs
    )
    out = State(
        done=state.done,
        moments=moments,
        replicates=replicates,
        heads=heads,
        frames=sum(distributed.allgather_json(int(state.frames))),
        attention_maps=maps,
        rbf=None if rbf is None else distributed.fetch_replicated(rbf),
        rbf_filled=filled,
    )
    return out if settings.stat_shards > 1 else fetch(out)


def _merge_specs(state: State, settings: Settings):
    """PartitionSpecs of (moments, replicates, heads, attention_maps, rbf) on the run's
    mesh."""

    def moments(m, leading=0):
        if m is None:
            return None
        if settings.stat_shards > 1:
            return sharded._specs(m, leading)
        return jax.tree.map(lambda _: PartitionSpec(), m)

    heads = jax.tree.map(lambda _: PartitionSpec(), state.heads)
    return (
        moments(state.moments),
        moments(state.replicates, 1),
        heads,
        moments(state.attention_maps, stacked_maps(state)),
        None if state.rbf is None else PartitionSpec(),
    )


def stacked_maps(state: State) -> int:
    """1 when ``state``'s attention-map statistics are stacked with their bootstrap replicates
    ([1 + R, ...], `init_state`), else 0: their leading axes."""
    return int(state.attention_maps is not None and state.attention_maps.count.ndim == 1)


def _to_world(x: Any, spec: PartitionSpec, local: Mesh, world: Mesh) -> jax.Array:
    """This process's array (laid out by ``spec`` on its own mesh) as its rows of a global
    [data, ...] array over every process's devices."""
    x = jax.device_put(x, NamedSharding(local, spec))
    sharding = NamedSharding(world, PartitionSpec(distributed.DATA, *spec))
    shape = (world.shape[distributed.DATA], *x.shape)
    # Each of this process's devices takes the piece of x its index names, copied there when x
    # has that piece on another device only: the world array is assembled by index, never by
    # the order or number of x's shards (one two-process run once saw a 2-device put come back
    # with 1 shard; not reproduced).
    pieces = {_index_key(s.index): s.data for s in x.addressable_shards}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        piece = pieces.get(_index_key(index[1:]))
        if piece is None:
            raise RuntimeError(
                f"merging processes: no shard of a {x.shape} array for index {index[1:]} "
                f"(shards on {[str(s.device) for s in x.addressable_shards]})"
            )
        if piece.devices() != {device}:
            piece = jax.device_put(piece, device)
        arrays.append(piece[None])
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _index_key(index: tuple[slice, ...]) -> tuple:
    """A hashable form of a shard index (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop, s.step) for s in index)


def _to_local(x: jax.Array, spec: PartitionSpec, local: Mesh) -> jax.Array:
    """A global array copied along ``"data"`` as an array on this process's mesh."""
    return jax.make_array_from_single_device_arrays(
        x.shape, NamedSharding(local, spec), [s.data for s in x.addressable_shards]
    )


def _merger(world: Mesh, specs, stacked: int) -> Callable:
    """The jitted collective merge of (moments, replicates, heads, attention maps, rbf rows);
    ``stacked``: `stacked_maps`."""
    data, split = distributed.DATA, distributed.STATS

    def moments_psum(m: stats.Moments) -> stats.Moments:
        rows = m.comoment.shape[0]
        start = jax.lax.axis_index(split) * rows
        return stats.psum(
            m, data, start=start, reduce=functools.partial(jax.lax.psum, axis_name=split)
        )

    def body(first, moments, replicates, heads, maps, rbf):
        def own(tree):  # [1, ...] -> [...], zero unless this row is its process's first
            keep = first[0]
            return jax.tree.map(lambda a: jnp.where(keep, a[0], jnp.zeros_like(a[0])), tree)

        moments, replicates, heads, maps, rbf = own((moments, replicates, heads, maps, rbf))
        return (
            moments_psum(moments),
            None if replicates is None else jax.vmap(moments_psum)(replicates),
            jax.tree.map(lambda a: jax.lax.psum(a, data), heads),
            None if maps is None else (jax.vmap(moments_psum) if stacked else moments_psum)(maps),
            None if rbf is None else jax.lax.psum(rbf, data),  # rows of one process each
        )

    leading = jax.tree.map(lambda spec: PartitionSpec(data, *spec), specs)
    mapped = jax.shard_map(
        body,
        mesh=world,
        in_specs=(PartitionSpec(data), *leading),
        out_specs=specs,
        check_vma=False,
    )
    return jax.jit(mapped)


def is_split(x: Any) -> bool:
    """``x`` is a device array split over several devices (rows of sharded statistics)."""
    return (
        isinstance(x, jax.Array)
        and len(x.sharding.device_set) > 1
        and not x.sharding.is_fully_replicated
    )


def fetch(state: State) -> State:
    """The statistics as host arrays, so the metrics run once rather than on every device.

    Statistics split over devices (``stat_shards`` > 1) stay where they are: the metrics are
    computed from the shards (`sslsim_jax.sharded`) and no host assembles the whole matrix.
    """

    def host(tree):
        return jax.tree.map(lambda x: x if is_split(x) else distributed.fetch_replicated(x), tree)

    return dataclasses.replace(
        state,
        moments=host(state.moments),
        replicates=host(state.replicates),
        heads=distributed.fetch_replicated(state.heads),
        attention_maps=distributed.fetch_replicated(state.attention_maps),
    )
