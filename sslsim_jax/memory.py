"""Memory a run needs, and the memory and cores this process may use: checks made before the
first batch.

Estimates are in bytes, for float32 activations, from the shapes alone (no tracing): they are
used to stop early with a message that names the setting to change, instead of an allocation
failure deep inside XLA — or a hang, see below. Each formula is checked against XLA's
``memory_analysis()`` of the compiled computation in ``tests/test_memory.py``.

Why the check must come before the forward pass (jaxlib 0.10.2, CPU): when XLA cannot allocate
an *output* buffer of a computation (e.g. the [L, B, H, T, T] attention maps of a long
utterance), ``jax.block_until_ready`` on the outputs raises ``RESOURCE_EXHAUSTED``, but
``np.asarray`` of any output waits forever: numpy reads the array through the buffer protocol,
which blocks on the buffer's memory becoming available, and the failed execution never makes it
available. A failed allocation of XLA's *temporary* buffer is reported either way.

Shape letters: B batch, S samples, T frames, D hidden, H heads, L layers, N frames, R replicates.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Mapping, Sequence

import jax

from sslsim_jax.audio import SAMPLE_RATE
from sslsim_jax.models.config import ModelConfig
from sslsim_jax.models.modules import DEFAULT_ATTENTION_BLOCK

__all__ = [
    "attention_map_bytes",
    "activation_bytes",
    "check_forward_memory",
    "max_frames_that_fit",
    "available_memory",
    "usable_cores",
    "device_memory",
    "bootstrap_bytes",
    "format_bytes",
]

FLOAT32 = 4
# cgroup files hold 2^63 rounded down to a page for "no limit"; anything this large is none.
_NO_LIMIT = 1 << 60


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: "14.4 GB", "512.0 MB", "10.2 kB", "512 bytes"."""
    if n >= 1e8:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e5:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{int(n)} bytes"


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")


def attention_map_bytes(config: ModelConfig, frames: int, batch: int) -> int:
    """Bytes of one forward's attention maps [L, B, H, T, T] (float32).

    Args:
        config: the model.
        frames: T, frames of the longest utterance of the batch.
        batch: B, utterances per batch.
    """
    _check_positive(frames=frames, batch=batch)
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    return FLOAT32 * layers * batch * heads * int(frames) ** 2


def _samples(config: ModelConfig, frames: int) -> int:
    """Fewest samples S that give ``frames`` frames."""
    return (int(frames) - 1) * config.frame_stride + config.receptive_field


def _conv_peak(config: ModelConfig, frames: int, batch: int) -> int:
    """Bytes of the conv feature encoder's largest step: a layer's input and output, plus 1.5
    more output-sized arrays for the norm and activation (XLA fuses part of them; the first
    layer dominates: S/5 steps × C channels)."""
    length, channels, peak = _samples(config, frames), 1, 0
    for dim, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True):
        out = (length - k) // s + 1
        peak = max(peak, length * channels + (5 * out * dim) // 2)
        length, channels = out, dim
    return FLOAT32 * batch * peak


def activation_bytes(
    config: ModelConfig,
    frames: int,
    batch: int,
    *,
    attentions: bool,
    layers: int | None = None,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> int:
    """Peak bytes of one forward pass (`sslsim_jax.intermediates.forward`), float32.

    The outputs (``layers`` hidden states [B, T, D]; with ``attentions`` the maps
    [L, B, H, T, T]) plus the largest working set: the conv feature encoder's biggest layer, or
    a transformer block's — two score-sized arrays [B, H, Q, T] (scores and probabilities; Q = T
    with maps or for T ≤ ``attention_block``, else the block), the feed-forward's [B, T, I] and
    a few [B, T, D]. Parameters are not included.

    Args:
        config: the model.
        frames: T, frames of the longest utterance of the batch.
        batch: B, utterances per batch.
        attentions: whether the attention maps are returned.
        layers: hidden states returned (default: all L + 1).
        attention_block: the model's ``attention_block`` (None: never blocked).

    Returns:
        Bytes; within a factor of about 1.5 above XLA's ``temp + output`` sizes (tests).
    """
    _check_positive(frames=frames, batch=batch)
    t, b = int(frames), int(batch)
    d, h = config.hidden_size, config.num_attention_heads
    layers = config.num_hidden_layers + 1 if layers is None else int(layers)
    outputs = FLOAT32 * layers * b * t * d
    queries = t
    if not attentions and attention_block is not None and t > attention_block:
        queries = int(attention_block)
    if attentions:
        outputs += attention_map_bytes(config, t, b)
    block = FLOAT32 * b * (2 * h * queries * t + t * config.intermediate_size + 4 * t * d)
    return outputs + max(_conv_peak(config, t, b), block)


def max_frames_that_fit(
    config: ModelConfig,
    batch: int,
    *,
    attentions: bool,
    limit_bytes: int,
    layers: int | None = None,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> int:
    """The most frames T whose `activation_bytes` are at most ``limit_bytes`` (0 if none)."""
    kw = dict(attentions=attentions, layers=layers, attention_block=attention_block)
    if activation_bytes(config, 1, batch, **kw) > limit_bytes:
        return 0
    lo, hi = 1, 2
    while activation_bytes(config, hi, batch, **kw) <= limit_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the estimate grows with T: bisect on [lo fits, hi does not]
        mid = (lo + hi) // 2
        fits = activation_bytes(config, mid, batch, **kw) <= limit_bytes
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


def check_forward_memory(
    configs: Sequence[ModelConfig] | Mapping[str, ModelConfig],
    longest_samples: int,
    batch: int,
    *,
    attentions: bool,
    limit_bytes: int,
    limit_description: str = "available memory",
    layers: int | None = None,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> None:
    """Raises ValueError, naming ``--max-seconds``, when a forward pass cannot fit.

    Call before the first batch with the longest (cropped) utterance: the models run one at a
    time, so each must fit on its own.

    Args:
        configs: the models' configs (a mapping names them in the message).
        longest_samples: S of the longest utterance, at 16 kHz.
        batch: B, utterances per batch.
        attentions: whether attention maps are requested.
        limit_bytes: memory one forward pass may use (e.g. `available_memory`).
        limit_description: what the limit is, for the message.
        layers, attention_block: as in `activation_bytes`.

    Raises:
        ValueError: with the utterance's length in seconds, the estimate, the limit and the
            longest ``--max-seconds`` that fits.
    """
    _check_positive(longest_samples=longest_samples, batch=batch, limit_bytes=limit_bytes)
    named = configs.items() if isinstance(configs, Mapping) else enumerate(configs, 1)
    kw = dict(attentions=attentions, layers=layers, attention_block=attention_block)
    seconds = longest_samples / SAMPLE_RATE
    for name, config in named:
        frames = config.num_frames(longest_samples)
        if frames < 1:
            continue
        need = activation_bytes(config, frames, batch, **kw)
        if need <= limit_bytes:
            continue
        fit = max_frames_that_fit(config, batch, limit_bytes=limit_bytes, **kw)
        fit_seconds = math.floor(_samples(config, fit) / SAMPLE_RATE) if fit else 0
        what = "attention maps and activations" if attentions else "activations"
        maps = (
            f" ({format_bytes(attention_map_bytes(config, frames, batch))} of maps)"
            if attentions
            else ""
        )
        crop = (
            f"use --max-seconds {fit_seconds} or less"
            if fit_seconds
            else "no --max-seconds of 1 s or more fits: use a smaller --batch-seconds"
        )
        raise ValueError(
            f"an utterance of {seconds:.1f} s needs about {format_bytes(need)} of {what}{maps} "
            f"in model {name} (batch {batch}), more than the {format_bytes(limit_bytes)} of "
            f"{limit_description}: {crop}" + (" or run without --attention" if attentions else "")
        )


def bootstrap_bytes(width: int, frames: int, replicates: int, chunk: int | None = None) -> int:
    """Temporary bytes of `sslsim_jax.stats.update_replicates` (float32), beyond its inputs
    and outputs: per replicate of a chunk, three [N, D] arrays (the centred frames, their
    weighted copy, one fused product) and two [D, D] co-moments (the batch's and the merged
    one). With one replicate per step XLA also keeps a copy of all R co-moments [R, D, D]
    (measured, jax 0.10.2 CPU), so a chunk of 1 is worth avoiding when R has other divisors.

    Args:
        width: D, the statistics' width (sum of the networks' widths).
        frames: N, frames per update.
        replicates: R.
        chunk: replicates per step as given to ``update_replicates`` (None: its default).
    """
    from sslsim_jax import stats

    _check_positive(width=width, frames=frames, replicates=replicates)
    c = stats.replicate_chunk(width, frames, replicates, chunk=chunk)
    n, d, r = int(frames), int(width), int(replicates)
    extra = FLOAT32 * r * d * d if c == 1 and r > 1 else 0
    return FLOAT32 * c * (3 * n * d + 2 * d * d) + extra


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None  # "max" (cgroup v2) or the v1 "no limit" value
    return int(text)


def _cgroup_limit(cgroup_root: str, proc_cgroup: str) -> tuple[int, str] | None:
    """The smallest memory limit of this process's cgroup and its ancestors (v2 and v1)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        # Inside a container the cgroup namespace may hide the path: the root is then ours.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            file = os.path.join(base, *parts[:depth], name)
            limit = _read_limit(file)
            if limit is not None:
                candidates.append((limit, f"cgroup limit ({file})"))
    return min(candidates) if candidates else None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def available_memory(
    *, cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> tuple[int, str]:
    """The most memory this process may use: (bytes, which limit it is).

    The smallest of the cgroup memory limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, of this process's cgroup and its ancestors), the address-space
    limit (``ulimit -v``, RLIMIT_AS), the data-segment limit (RLIMIT_DATA) and physical RAM.
    A limit, not free memory: other processes' use is not subtracted.

    Args:
        cgroup_root: where the cgroup file systems are mounted.
        proc_cgroup: this process's cgroup membership file.

    Returns:
        (bytes, description), e.g. ``(4294967296, "address-space limit (ulimit -v)")``.
    """
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    candidates = [(ram, "physical RAM")]
    for which, name in (
        (resource.RLIMIT_AS, "address-space limit (ulimit -v)"),
        (resource.RLIMIT_DATA, "data-segment limit (ulimit -d)"),
    ):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY and soft > 0:
            candidates.append((int(soft), name))
    cgroup = _cgroup_limit(cgroup_root, proc_cgroup)
    if cgroup is not None:
        candidates.append(cgroup)
    return min(candidates)


def device_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """The memory one device may use: (bytes, description).

    An accelerator's ``bytes_limit`` from ``device.memory_stats()``; for CPU devices,
    `available_memory` shared evenly by this process's CPU devices (they use the same RAM).

    Args:
        device: default: the first local device.
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} {device.platform} device memory"
    limit, what = available_memory()
    cpus = sum(d.platform == "cpu" for d in jax.local_devices())
    if cpus > 1:
        return limit // cpus, f"{what}, shared by {cpus} CPU devices"
    return limit, what
