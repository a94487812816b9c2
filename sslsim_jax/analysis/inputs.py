"""The analysis's inputs: the audio list, each process's share, batches and bootstrap weights.

Every model must see the same frames: utterances shorter than the models' receptive field are
dropped (with a warning), and models whose conv stacks disagree on an utterance's frame count
are refused.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sslsim_jax import audio, sources
from sslsim_jax.analysis.networks import ModelEntry
from sslsim_jax.analysis.settings import AnalysisError, Settings

# Padded lengths are rounded up on a grid (`audio.padded_length`): multiples of 0.25 s up to
# 4 s, then of 0.5 s up to 8 s, and so on (at most 12.5 % padding above 4 s), so batches of
# similar lengths share one compiled shape: each new shape costs a compilation (10-60 s on a
# GPU).
PAD_MULTIPLE = 4000


PAD_STEPS = 16


def padded_batch(n: int, multiple: int = 1) -> int:
    """The batch size a batch of ``n`` utterances runs at: the next size of the form 2^k or
    3·2^k (1, 2, 3, 4, 6, 8, 12, 16, …; at most a third is padding), rounded up to a multiple
    of the device count. The extra rows are silent zero-weight utterances, so the compiled
    shapes are (this small set) × (the length grid)."""
    if n < 1 or multiple < 1:
        raise ValueError(f"expected n >= 1 and multiple >= 1, got {n}, {multiple}")
    power = 1 << (n - 1).bit_length()  # the next power of two >= n
    size = 3 * power // 4 if power >= 4 and 3 * power // 4 >= n else power
    return -size % multiple + size


def plan_batches(lengths: Sequence[int], settings: Settings) -> list[list[int]]:
    """Length-bucketed batches of the utterances (`audio.make_batches`)."""
    return audio.make_batches(
        lengths, batch_seconds=settings.batch_seconds, multiple_of=PAD_MULTIPLE, steps=PAD_STEPS
    )


def batch_shape(batch: Sequence[int], lengths: Sequence[int], multiple: int) -> tuple[int, int]:
    """(B, S): the compiled shape a batch runs at (`padded_batch`, `audio.padded_length`)."""
    longest = max(lengths[i] for i in batch)
    return padded_batch(len(batch), multiple), audio.padded_length(longest, PAD_MULTIPLE, PAD_STEPS)


def load_audio(
    source: Any,
    entries: Sequence[ModelEntry],
    settings: Settings,
    *,
    shard: tuple[int, int] = (0, 1),
) -> list[audio.Clip]:
    """Plans the utterances from their headers (nothing decoded), drops those too short for a
    frame, and checks every model sees the same frames.

    ``shard=(p, P)`` keeps utterances p, p + P, p + 2P, … of the list (process p of P).
    """
    return load_share(source, entries, settings, shard=shard)[0]


def load_share(
    source: Any,
    entries: Sequence[ModelEntry],
    settings: Settings,
    *,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[audio.Clip], list[int]]:
    """`load_audio`, plus each kept utterance's index in the whole list (which seeds its
    bootstrap weights, so a dropped clip changes no other clip's draws, whatever the process
    count). With several processes a share may hold no usable clip; `analyze` checks the
    total. Memory does not grow with the number of files: a `audio.Clip` is a header."""
    total, plan = sources.catalogue(source)
    if settings.max_utterances is not None:
        total = min(total, settings.max_utterances)
    index, count = shard
    positions = range(index, total, count)
    planned = [plan(i, settings.max_seconds) for i in positions]
    field = max(e.model.config.receptive_field for e in entries)
    try:
        clips = audio.filter_short(planned, min_samples=field)
    except audio.AudioError:
        if count == 1:
            raise
        clips = []
    kept = {id(c) for c in clips}
    ids = [i for i, c in zip(positions, planned, strict=True) if id(c) in kept]
    for c in clips:
        frames = {e.name: e.model.config.num_frames(c.num_samples) for e in entries}
        if len(set(frames.values())) > 1:
            raise AnalysisError(
                f"{c.path}: models disagree on the number of frames ({frames}); their conv "
                f"stacks differ, so frames do not align"
            )
    return clips, ids


def prefetch(
    batches: Sequence[Sequence[int]], clips: Sequence[Any], *, start: int = 0, depth: int = 2
) -> Iterator[list[np.ndarray]]:
    """The samples of each batch from ``start`` on, decoded on a background thread ``depth``
    batches ahead, so decoding overlaps the device work and at most ``depth + 1`` batches of
    audio are in memory. A file that fails to decode raises its error (naming it) when its
    batch is due."""

    def decode(batch):
        return [clips[i].load() for i in batch]

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sslsim-audio") as pool:
        pending = collections.deque(pool.submit(decode, b) for b in batches[start : start + depth])
        ahead = start + depth
        try:
            while pending:
                samples = pending.popleft().result()
                if ahead < len(batches):
                    pending.append(pool.submit(decode, batches[ahead]))
                    ahead += 1
                yield samples
        finally:
            # Leaving early (an error or Ctrl-C in the consumer) drops what is queued.
            for future in pending:
                future.cancel()


def poisson_weights(seed: int, index: int, replicates: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).poisson(1.0, size=replicates).astype(np.float32)
